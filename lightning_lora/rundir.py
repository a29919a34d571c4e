"""Run directories: never shared, never silently reused.

- ``${fresh_dir:PATTERN}`` (the default ``hydra.run.dir`` and ``hydra.sweep.dir``) claims a new directory with an
  atomic ``mkdir``: two runs started in the same second get ``PATTERN`` and ``PATTERN-2``.
- A fresh run (``resume: null``) refuses a directory that already holds a run, unless ``overwrite: true``
  (the old run's outputs are then removed first); ``resume=last`` continues in it.
- Rank 0 holds ``.lightning_lora.lock`` (``flock``, removed when the run ends) in the run directory for the run's
  lifetime: a second run there refuses with the holder's PID, and the start-up clean-up of stale temporaries runs
  only under the lock.
- ``RunDirGuard`` (a Hydra callback) makes the same checks before Hydra writes ``.hydra/`` into the directory, so a
  refused run leaves an existing directory byte-identical; ``train.run`` makes them again for Python callers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf.errors import OmegaConfBaseException

from lightning_lora.errors import UserError, find_user_error

#: what a run writes into its directory; any of them present means the directory holds a run
RUN_MARKERS = ("config.yaml", "metrics.json", "command.txt", "adapters", "checkpoints", "lora_ckpts", "samples")
#: removed with the markers by ``overwrite=true`` (Hydra's ``.hydra/`` and job log are Hydra's own)
RUN_OUTPUTS = (*RUN_MARKERS, "environment.json", "model_summary.txt", "failed.json",
               "tensorboard", "csv", "mlruns", "wandb")  # the loggers' folders (conf/logger/)
LOCK_FILE = ".lightning_lora.lock"
#: Lightning's SLURM requeue checkpoint: a directory holding one is continued by Lightning, not started afresh
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"
_MAX_SUFFIX = 10_000


# ---------------------------------------------------------------------------- a new directory per run
def fresh_dir(pattern: str, given: str | None = None) -> str:
    """``${fresh_dir:PATTERN[,GIVEN]}``: ``GIVEN`` when set (e.g. ``paths.run_dir``: one directory per SLURM job,
    the same after a requeue); else a directory that did not exist, created now: ``PATTERN``, or ``PATTERN-2``,
    ``PATTERN-3``, ... when another run claimed it first. Registered with OmegaConf's cache, so every read of the
    key in one config (Hydra reads it several times; a sweep's jobs copy the cache) gives the same directory."""
    if given:
        return str(given)
    base = Path(str(pattern))
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, _MAX_SUFFIX):
            candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
            with contextlib.suppress(FileExistsError):
                candidate.mkdir()
                return str(candidate)
    except OSError as exc:
        raise UserError(f"cannot create a run directory {base}: {exc.strerror or exc}; set hydra.run.dir "
                        "(hydra.sweep.dir for -m) to a writable place") from None
    raise UserError(f"{base}: {_MAX_SUFFIX} run directories of that name already exist; set hydra.run.dir")


# ---------------------------------------------------------------------------- names for the trackers
def _shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies under it (``outputs/2026-01-31/12-00-00``)."""
    absolute = Path(path).resolve()
    with contextlib.suppress(ValueError):
        return absolute.relative_to(Path.cwd().resolve()).as_posix()
    return absolute.as_posix()


def run_name(output_dir: str) -> str:
    """``${run_name:${paths.output_dir}}``: a logger's run name, the run directory as the user finds it."""
    return _shown(output_dir)


def sweep_name(default: str | None = None) -> str | None:
    """``${sweep_name:DEFAULT}``: the sweep directory of a multirun's job (``outputs/multirun/<date>/<time>``), a
    logger's group or experiment, so one sweep's jobs sit together; ``DEFAULT`` for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return default
    hydra = HydraConfig.get()
    # the job's directory less its subdir (hydra.sweep.subdir); hydra.sweep.dir itself is not read again: its
    # ${fresh_dir:...} would claim another directory outside the launcher's resolver cache
    levels = len(Path(str(hydra.sweep.subdir)).parts)
    return _shown(Path(hydra.runtime.output_dir).parents[levels - 1])


# ---------------------------------------------------------------------------- checks
def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str = "run directory", key: str = "hydra.run.dir") -> None:
    """One line when ``path`` cannot be a run directory: a file, not writable, or not creatable."""
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory; give {key} a directory")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise UserError(f"{what} {path} {why}; choose a writable place ({key}=...)")


def run_outputs(path: Path, names: tuple[str, ...] = RUN_MARKERS) -> list[str]:
    """The run outputs present in ``path`` (directories with a trailing ``/``)."""
    return [f"{n}/" if (path / n).is_dir() else n for n in names if os.path.lexists(path / n)]


def check_overwrite(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"overwrite={value!r} must be true or false")
    return value


def check_fresh(path: Path, resume: str | None, overwrite: bool) -> None:
    """A fresh run (``resume`` null) refuses a directory holding another run's outputs unless ``overwrite``."""
    if resume or overwrite or not path.is_dir() or any(path.glob(HPC_CHECKPOINTS)):
        return
    if found := run_outputs(path):
        raise UserError(f"run directory {path} already holds a run ({', '.join(found)}); continue it with "
                        "resume=last, pick a new directory (hydra.run.dir=...), or replace it with overwrite=true")


def check_fresh_sweep(path: Path, resume: str | None, overwrite: bool) -> None:
    """A fresh sweep (``resume`` null) refuses a sweep directory whose jobs already ran, unless ``overwrite``."""
    if resume or overwrite or not path.is_dir():
        return
    used = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.is_symlink() and run_outputs(d))
    if used:
        jobs = used[0] + (", ..." if len(used) > 1 else "")
        raise UserError(f"sweep directory {path} already holds the runs of a sweep (job {jobs}); pick a new "
                        "directory (hydra.sweep.dir=...), continue them with resume=last, or replace them with "
                        "overwrite=true")


def lock_holder(path: Path) -> int | None:
    """The PID recorded in ``path``'s lock file when another process holds the lock now; else None."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _recorded_pid(fd)
    finally:
        os.close(fd)  # closing drops a lock taken just now
    return None


def _recorded_pid(fd: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    return -1


def _in_use(path: Path, pid: int) -> UserError:
    holder = f"PID {pid}" if pid > 0 else "another process"
    return UserError(f"run directory {path} is in use by another run ({holder}); wait for it to end or pick a new "
                     "directory (hydra.run.dir=...)")


def check_run_dir(path: Path, resume: str | None, overwrite: Any) -> None:
    """Every check of a run directory, writing nothing: what ``RunDirGuard`` runs before Hydra writes there."""
    overwrite = check_overwrite(overwrite)
    check_writable(path)
    if (pid := lock_holder(path)) is not None:
        raise _in_use(path, pid)
    check_fresh(path, resume, overwrite)


# ---------------------------------------------------------------------------- holding a directory
class RunDirLock:
    """An exclusive ``flock`` on ``<run dir>/.lightning_lora.lock`` (which records the holder's PID)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        lock_file = self.path / LOCK_FILE
        while True:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _recorded_pid(fd)
                os.close(fd)
                raise _in_use(self.path, pid) from None
            if _same_file(fd, lock_file):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file while holding it (a run leaves no trace of the lock), then unlock."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                if _same_file(self.fd, self.path / LOCK_FILE):
                    os.unlink(self.path / LOCK_FILE)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _remove_outputs(path: Path) -> list[str]:
    """``overwrite=true``: remove the previous run's outputs (what resume=last or keep_last would pick up)."""
    found = run_outputs(path, RUN_OUTPUTS)
    for name in found:
        target = path / name.rstrip("/")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    return found


@contextlib.contextmanager
def hold_run_dir(path: Path, resume: str | None, overwrite: Any, rank: int = 0) -> Iterator[list[str]]:
    """Check ``path`` (``check_run_dir``), create it and hold its lock while the block runs; yields what
    ``overwrite=true`` removed. Ranks other than 0 only create it: rank 0 (started first) checks and locks."""
    overwrite = check_overwrite(overwrite)
    if rank != 0:
        path.mkdir(parents=True, exist_ok=True)
        yield []
        return
    check_run_dir(path, resume, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(path)
    lock.acquire()
    try:
        check_fresh(path, resume, overwrite)  # again under the lock: a run that finished just now counts
        yield _remove_outputs(path) if overwrite else []
    finally:
        lock.release()


# ---------------------------------------------------------------------------- before Hydra writes
def _global_rank() -> int:
    """The process's rank from the launchers' variables (as Lightning reads it); 0 when none is set."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if (value := os.environ.get(key)) is not None:
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


def _refuse(message: str) -> None:
    # a Hydra callback's exception only becomes a warning: exiting is the one way to stop before Hydra writes
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _or_refuse(check: Callable[[], None]) -> None:
    """Run ``check``; a user error (also the ``fresh_dir`` resolver's, inside OmegaConf's) ends the process."""
    try:
        check()
    except UserError as exc:
        _refuse(str(exc))
    except OmegaConfBaseException as exc:
        if (err := find_user_error(exc)) is None:
            raise
        _refuse(str(err))


class RunDirGuard(Callback):
    """``hydra.callbacks.run_dir_guard``: the run directory's checks before Hydra creates it and writes ``.hydra/``
    there (a single run; a sweep's job directories are new, below a freshly claimed sweep directory)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if _global_rank() != 0:
            return  # a DDP/SLURM process started by rank 0's launcher, in rank 0's directory
        _or_refuse(lambda: check_run_dir(Path(str(config.hydra.run.dir)).absolute(), config.get("resume"),
                                         config.get("overwrite", False)))

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        def check() -> None:
            path = Path(str(config.hydra.sweep.dir)).absolute()
            check_writable(path, "sweep directory", "hydra.sweep.dir")
            check_fresh_sweep(path, config.get("resume"), check_overwrite(config.get("overwrite", False)))

        _or_refuse(check)
