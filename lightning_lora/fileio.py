"""Atomic file and directory writes: a reader never sees a half-written file.

Everything the project writes goes to a temporary name in the same directory first and is then renamed,
which is atomic on POSIX file systems. A temporary left behind by a killed write starts with ``.tmp-``
and is never mistaken for a finished file; its name carries the writer's PID, so a clean-up can tell a live
writer's file from a dead one's. What appears under the final name has the mode a plain ``open()`` (or
``mkdir``) would give under the process's umask, and a replaced file or directory keeps its own mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
#: the end of a temporary's name: ``.<writer's pid>-<mkstemp's random part>``, or ``.old-<pid>`` (moved aside)
_WRITER_PID = re.compile(r"\.(?:(\d+)-[a-z0-9_]{8}|old-(\d+))$")


def temporary_prefix(path: Path) -> str:
    """The ``prefix`` for ``mkstemp``/``mkdtemp`` of a temporary that will become ``path``: hidden, marked as a
    temporary, and naming this process (``clean_stale_temporaries`` leaves a live writer's files alone)."""
    return f"{TMP_PREFIX}{path.name}.{os.getpid()}-"


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only swap it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def final_mode(path: Path, directory: bool = False) -> int:
    """The mode for what is about to appear at ``path``: the mode of what is there now (a replaced file keeps
    its own), else what ``open()`` / ``mkdir`` would give under the umask (``mkstemp`` alone gives 0600/0700)."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), dir=path.parent)
    try:
        os.fchmod(fd, final_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # a failed write (ENOSPC, EIO, a quota) names the file it was for; the old file is untouched
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path


def path_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` as a whole when the block succeeds.

    An existing ``path`` is moved aside first and deleted only after the new one is in place, so at
    every moment either the old or the new complete directory exists under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(path), dir=path.parent))
    try:
        os.chmod(tmp, final_mode(path, directory=True))
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def new_directory_or_none(path: str | os.PathLike) -> Iterator[Path]:
    """A block that fills the directory ``path`` piece by piece (each piece atomic): when the block fails and
    ``path`` did not exist before it, ``path`` is removed, so a failed write (a full disk) leaves no empty or
    partial directory behind. An existing ``path`` keeps whatever complete pieces it holds."""
    path = Path(path)
    existed = os.path.lexists(path)
    try:
        yield path
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _writer_alive(name: str) -> bool:
    """Whether the temporary ``name`` records the PID of another process that is running now."""
    match = _WRITER_PID.search(name)
    if match is None:
        return False  # written before names carried a PID: stale by the caller's word
    pid = int(match.group(1) or match.group(2))
    if pid == os.getpid():
        return False  # this process writes nothing while it cleans up: its own leftovers are stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # PermissionError: alive, another user's; OverflowError: not a PID, keep the file
    return True


#: the run directory's sub-directories the project writes into (searched in depth for stale temporaries)
RUN_SUBDIRS = ("checkpoints", "adapters", "samples", "lora_ckpts")


def clean_stale_temporaries(root: str | os.PathLike, subdirs: tuple[str, ...] | None = RUN_SUBDIRS) -> list[Path]:
    """Remove what killed writes left in ``root`` (names starting with ``TMP_PREFIX``); return them.

    ``root`` itself is searched, and ``subdirs`` of it in depth (None: everything under ``root``), so a run
    directory placed among a user's files touches nothing of theirs. A directory that ``atomic_directory``
    had moved aside (``.tmp-<name>.old-<pid>``) whose replacement never arrived is the last complete
    version of ``<name>``: it is moved back instead of deleted. Call this only when no other process writes
    there (at the start of a run, before training, holding the run directory's lock): even then a temporary
    whose name records a writer that is still alive (another process: a tool writing into the directory) is
    left alone.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = TMP_PREFIX + "*"
    if subdirs is None:
        candidates = list(root.rglob(pattern))
    else:
        candidates = list(root.glob(pattern))
        for sub in subdirs:
            if (root / sub).is_dir() and not (root / sub).is_symlink():
                candidates += (root / sub).rglob(pattern)
    found = sorted((p for p in candidates if p.name.startswith(TMP_PREFIX) and not _writer_alive(p.name)),
                   key=lambda p: len(p.parts), reverse=True)  # deepest first
    handled: list[Path] = []
    for stale in found:
        if not os.path.lexists(stale):
            continue  # inside a directory removed above
        name, sep, _pid = stale.name[len(TMP_PREFIX):].rpartition(".old-")
        original = stale.with_name(name) if sep else None
        if original is not None and stale.is_dir() and not os.path.lexists(original):
            os.replace(stale, original)
        elif stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        handled.append(stale)
    return handled
