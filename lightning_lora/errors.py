"""Errors that mean 'the user gave bad input': shown as one line, never as a traceback.

``user_message`` is the one rule both entry points (``lightning-lora`` and ``lightning_lora.train``) use to
tell such an error from a bug: a ``UserError``, an ``OSError`` (the system's words and the file) or a refused
pickle, also when Hydra's ``InstantiationException`` wraps it (it does for anything a constructor raises).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

#: the line for a torch file that needs code to load (only tensors are read, never unpickled objects)
REFUSED_PICKLE = ("refused a file holding pickled objects that would run code when loaded (only tensors are read, "
                  "weights_only=True)")


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
    # Hydra's wrapper, told by name so that this module needs no hydra import
    return any(cls.__name__ == "InstantiationException" for cls in type(exc).__mro__)


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


def _describe(exc: BaseException) -> str:
    """The one line for a ``_user_facing`` exception (the file it names included, when it names one)."""
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    if isinstance(exc, pickle.UnpicklingError):
        return _one_line(REFUSED_PICKLE + where)
    if isinstance(exc, OSError):
        return _one_line((exc.strerror or str(exc)) + where)
    return _one_line(str(exc))


def user_message(exc: BaseException) -> str | None:
    """The one line a user sees for ``exc`` (after ``error: ``), or None when ``exc`` is a bug."""
    err = _user_facing(exc)
    return None if err is None else _describe(err)
