"""Errors that mean 'the user gave bad input': shown as one line, never as a traceback.

``user_message`` is the one rule both entry points (``lightning-lora`` and ``lightning_lora.train``) use to
tell such an error from a bug: a ``UserError``, an ``OSError`` (the system's words and the file) or a refused
pickle, also when Hydra's ``InstantiationException`` wraps it (it does for anything a constructor raises).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

#: the line for a torch file that needs code to load (only tensors are read, never unpickled objects)
REFUSED_PICKLE = ("refused a file holding pickled objects that would run code when loaded (only tensors are read, "
                  "weights_only=True)")


#: opcodes that make an unpickler import or call something (what ``weights_only`` refuses beyond its allow-list)
_CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"})


def pickle_runs_code(path: str | os.PathLike) -> bool:
    """Whether a file that ``torch.load(weights_only=True)`` refused is a well-formed pickle (bare, or a torch zip's
    ``data.pkl``) that imports or calls something, i.e. would run code; False for damaged or foreign bytes, which
    the refusal also covers. The pickle is only parsed (``pickletools``), never loaded."""
    try:
        data = Path(path).read_bytes()
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        ops = {op.name for op, _, _ in pickletools.genops(data)}  # raises unless it parses through STOP
    except Exception:
        return False
    return bool(ops & _CODE_OPCODES)


class UserError(ValueError):
    """A bad value from the user (config, path, file). The message is one line naming the value."""


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, then what it was raised from (or during), and so on; each exception once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_instantiation(exc: BaseException) -> bool:
    # Hydra's wrapper, or OmegaConf's around a resolver's error (``${built:...}``), told by name so that this module
    # needs no hydra or omegaconf import
    return any(cls.__name__ in ("InstantiationException", "InterpolationResolutionError") for cls in type(exc).__mro__)


def find_user_error(exc: BaseException) -> UserError | None:
    """The ``UserError`` that is ``exc`` or that ``exc`` was raised from or during, if any."""
    return next((e for e in _chain(exc) if isinstance(e, UserError)), None)


def _user_facing(exc: BaseException) -> BaseException | None:
    """The exception to tell the user about, or None when ``exc`` is a bug (its traceback is the message).

    Only a ``UserError``, an ``OSError``, a refused pickle or Hydra's wrapper count; behind them a
    ``UserError`` wins over the first ``OSError`` or refused pickle of the chain."""
    if not isinstance(exc, (UserError, OSError, pickle.UnpicklingError)) and not _is_instantiation(exc):
        return None
    if (err := find_user_error(exc)) is not None:
        return err
    return next((e for e in _chain(exc) if isinstance(e, (OSError, pickle.UnpicklingError))), None)


#: how torch re-raises an exception from a DataLoader worker: its type around the worker's whole traceback
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback", re.S)


def _message(exc: BaseException) -> str:
    """``str(exc)``; for an error re-raised from a DataLoader worker, the worker's own message (the last line of
    the traceback torch puts in its place, after the exception's name)."""
    text = str(exc)
    if _WORKER_TRACEBACK.match(text):
        last = text.strip().splitlines()[-1]
        return re.sub(r"^[A-Za-z_][\w.]*: ", "", last, count=1)
    return text


def _describe(exc: BaseException) -> str:
    """The one line for a ``_user_facing`` exception (the file it names included, when it names one)."""
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    if isinstance(exc, pickle.UnpicklingError):
        return _one_line(REFUSED_PICKLE + where)
    if isinstance(exc, OSError):
        return _one_line((exc.strerror or str(exc)) + where)
    return _one_line(_message(exc))


def user_message(exc: BaseException) -> str | None:
    """The one line a user sees for ``exc`` (after ``error: ``), or None when ``exc`` is a bug."""
    err = _user_facing(exc)
    return None if err is None else _describe(err)
