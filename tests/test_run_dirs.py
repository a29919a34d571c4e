"""Run directories under hostile use (issue 16, items 3, 5 and 7): never shared, never silently reused, locked
while a run lives in them, files as readable as the umask says, sweeps that survive a bad job, and no empty
snapshot directory after a full disk.

The hostile cases are table entries (``CASES``, ``SWEEP_CASES``), each run in-process through Hydra's real entry
point: exit status 2, the last stderr line one ``error:`` line naming the bad value or directory, no traceback,
and every file that existed before byte-identical afterwards.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FAST
from helpers import FullDisk, assert_one_error_line, file_bytes, net_pair, train_main
from omegaconf import OmegaConf, open_dict

from lightning_lora.fileio import TMP_PREFIX, atomic_directory, atomic_write_bytes, clean_stale_temporaries
from lightning_lora.rundir import LOCK_FILE, RunDirLock, fresh_dir
from lightning_lora.sweep import FAILURE_FILE, SUMMARY_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

#: the shortest real run: 2 steps, snapshots and checkpoints at step 2, no validation passes
SHORT = [*FAST, "trainer.max_steps=2", "validate_before=false", "validate_after=false"]


def _args(tiny_bert: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *SHORT, *extra]


@pytest.fixture(scope="module")
def used_run(tmp_path_factory, tiny_bert, cache_dir) -> Path:
    """A finished run directory (config.yaml, checkpoints/, adapters/, metrics.json, ...), trained once."""
    run_dir = tmp_path_factory.mktemp("used") / "run"
    assert train_main(_args(tiny_bert, cache_dir, f"hydra.run.dir={run_dir}")) == 0
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


# ---------------------------------------------------------------------------- the hostile table
@dataclass
class Scene:
    """What a case's setup gets: where to build, the finished run to copy, and what it must undo."""
    root: Path
    used: Path
    monkeypatch: pytest.MonkeyPatch
    #: processes that hold something for the duration of the case (started by setup, killed after)
    holders: list[subprocess.Popen] = field(default_factory=list)


#: builds what the run is pointed at; returns the overrides and the text the error line must name
Setup = Callable[[Scene], tuple[list[str], str]]


@dataclass
class Case:
    name: str
    kind: str  # silent data loss | traceback->one line | permissions | other
    setup: Setup


def _copy_used(root: Path, used: Path) -> Path:
    target = root / "old"
    shutil.copytree(used, target)
    return target


def _partial_run(*names: str) -> Setup:
    """A directory holding only some of a run's outputs (a run killed early, or a run of another version)."""

    def setup(scene: Scene) -> tuple[list[str], str]:
        target = scene.root / "partial"
        for name in names:
            if name.endswith("/"):
                (target / name / "step_0000002").mkdir(parents=True)
                (target / name / "step_0000002" / "x.safetensors").write_bytes(b"old bytes")
            else:
                target.mkdir(parents=True, exist_ok=True)
                (target / name).write_text("old\n")
        return [f"hydra.run.dir={target}"], "already holds a run"

    return setup


def _used(*extra: str) -> Setup:
    def setup(scene: Scene) -> tuple[list[str], str]:
        target = _copy_used(scene.root, scene.used)
        return [f"hydra.run.dir={target}", *extra], f"run directory {target} already holds a run"

    return setup


_HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, "
         "fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid()); print('held', flush=True); time.sleep(60)")


def _hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding ``directory``'s run lock, as a running training run does."""
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory / LOCK_FILE)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _locked(*extra: str, used: bool = False) -> Setup:
    def setup(scene: Scene) -> tuple[list[str], str]:
        target = _copy_used(scene.root, scene.used) if used else scene.root / "busy"
        proc = _hold_lock(target)
        scene.holders.append(proc)
        return [f"hydra.run.dir={target}", *extra], f"run directory {target} is in use by another run (PID {proc.pid})"

    return setup


def _is_a_file(sub: str = "") -> Setup:
    def setup(scene: Scene) -> tuple[list[str], str]:
        taken = scene.root / "taken"
        taken.write_text("a file where the run directory should be\n")
        return [f"hydra.run.dir={taken / sub if sub else taken}"], str(taken)

    return setup


def _sweep_dir_is_a_file(scene: Scene) -> tuple[list[str], str]:
    (scene.root / "sweep").write_text("not a directory\n")
    return ["-m", "adapter.r=2,4", f"hydra.sweep.dir={scene.root / 'sweep'}"], f"{scene.root / 'sweep'} is a file"


def _outputs_is_a_file(*flags: str) -> Setup:
    """The default run (or sweep) directory under a working directory whose ``outputs`` is a file."""

    def setup(scene: Scene) -> tuple[list[str], str]:
        (scene.root / "outputs").write_text("not a directory\n")
        scene.monkeypatch.chdir(scene.root)
        return [*flags], "cannot create a run directory outputs/"

    return setup


def _used_sweep(scene: Scene) -> tuple[list[str], str]:
    sweep = scene.root / "sweep"
    shutil.copytree(scene.used, sweep / "1")
    return ["-m", "adapter.r=2,4", f"hydra.sweep.dir={sweep}"], f"sweep directory {sweep} already holds the runs"


def _read_only(existing: bool) -> Setup:
    def setup(scene: Scene) -> tuple[list[str], str]:
        ro = scene.root / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        if os.geteuid() == 0:  # root writes anyway: the check asks os.access, which says what a user would get
            real = os.access
            scene.monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p).resolve() != ro.resolve() and
                                      real(p, mode, **kw))
        target = ro if existing else ro / "new"
        return [f"hydra.run.dir={target}"], ("is not writable" if existing else f"cannot be created: {ro} is not "
                                             "writable")

    return setup


CASES = [
    Case("fresh run on a finished run directory", "silent data loss", _used()),
    Case("fresh run on a finished run directory, other values", "silent data loss", _used("adapter.r=4", "seed=3")),
    Case("fresh run on a directory with only checkpoints/", "silent data loss", _partial_run("checkpoints/")),
    Case("fresh run on a directory with only adapters/", "silent data loss", _partial_run("adapters/")),
    Case("fresh run on a directory with only lora_ckpts/", "silent data loss", _partial_run("lora_ckpts/")),
    Case("fresh run on a directory with only metrics.json", "silent data loss", _partial_run("metrics.json")),
    Case("fresh run on a directory with only config.yaml", "silent data loss", _partial_run("config.yaml")),
    Case("second run on a directory another run holds", "silent data loss", _locked()),
    Case("resume=last on a directory another run holds", "silent data loss", _locked("resume=last", used=True)),
    Case("overwrite=true on a directory another run holds", "silent data loss",
         _locked("overwrite=true", used=True)),
    Case("fresh sweep on the directory of a finished sweep", "silent data loss", _used_sweep),
    Case("run directory is a file", "traceback->one line", _is_a_file()),
    Case("run directory below a file", "traceback->one line", _is_a_file("sub")),
    Case("sweep directory is a file", "traceback->one line", _sweep_dir_is_a_file),
    Case("default run directory under a file named outputs", "traceback->one line", _outputs_is_a_file()),
    Case("default sweep directory under a file named outputs", "traceback->one line",
         _outputs_is_a_file("-m", "adapter.r=2,4")),
    Case("run directory is read-only", "permissions", _read_only(existing=True)),
    Case("run directory below a read-only one", "permissions", _read_only(existing=False)),
    Case("overwrite is not a boolean", "other",
         lambda scene: ([f"hydra.run.dir={scene.root / 'new'}", "overwrite=maybe"], "overwrite='maybe'")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_run_directory(case, used_run, tiny_bert, cache_dir, tmp_path, capsys, monkeypatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    scene = Scene(root, used_run, monkeypatch)
    try:
        overrides, needle = case.setup(scene)
        before = file_bytes(root)
        capsys.readouterr()
        started = time.monotonic()
        flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m) before the overrides
        rc = train_main([*flags, *_args(tiny_bert, cache_dir), *(o for o in overrides if o not in flags)])
        seconds = time.monotonic() - started
        assert_one_error_line(rc, capsys.readouterr().err, needle, case=case.name)
        assert file_bytes(root) == before, case.name  # nothing written, replaced, or left behind (.hydra/ too)
        print(f"{case.name}: refused in {seconds:.2f} s")
    finally:
        for proc in scene.holders:
            proc.kill()
            proc.wait()
        monkeypatch.undo()
        for path in root.rglob("*"):  # read-only cases: let pytest remove tmp_path
            if path.is_dir():
                path.chmod(0o700)
        root.chmod(0o700)


# ---------------------------------------------------------------------------- sweeps that survive a bad job
SWEEP_CASES = [
    # (name, swept values, index of the bad job, needle of its reason)
    ("the first job is bad", "adapter.r=0,2", 0, "adapter.r=0"),
    ("the last job is bad", "adapter.r=2,-1", 1, "adapter.r=-1"),
]


@pytest.mark.parametrize(("name", "values", "bad", "needle"), SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_a_sweep_survives_a_bad_job(name, values, bad, needle, tiny_bert, cache_dir, tmp_path, capsys) -> None:
    sweep = tmp_path / "sweep"
    rc = train_main(["-m", values, *_args(tiny_bert, cache_dir), f"hydra.sweep.dir={sweep}"])
    out, err = capsys.readouterr()
    assert_one_error_line(rc, err, needle, case=name)
    assert f"1 of 2 sweep jobs failed: job {bad} ({values.split('=')[0]}=" in err.splitlines()[-1]
    with open(sweep / SUMMARY_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1"]
    good = 1 - bad
    assert rows[bad]["status"] == "failed" and needle in rows[bad]["reason"], rows[bad]
    assert "\n" not in rows[bad]["reason"]
    assert rows[good]["status"] == "ok" and rows[good]["reason"] == "" and int(rows[good]["global_step"]) == 2
    assert (sweep / str(good) / "adapters" / "final").is_dir()  # the other job ran to the end
    assert json.loads((sweep / str(bad) / FAILURE_FILE).read_text())["user_error"] is True
    assert f"| {bad} | " in out and "failed: " in out


# ---------------------------------------------------------------------------- a new directory for every run
def test_two_runs_in_the_same_second_get_two_directories(monkeypatch, tmp_path) -> None:
    """With the clock stopped, every composed config claims its own directory; reads within one config agree."""
    import datetime as real_datetime

    import hydra.core.utils as hydra_utils

    class Frozen(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 5, 12, 0, 0)

    monkeypatch.setattr(hydra_utils, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    from hydra.core.utils import setup_globals

    setup_globals()  # Hydra's ${now:...} resolver, reading the frozen clock
    dirs = []
    for _ in range(3):
        cfg = _compose_with_hydra()
        first, again = str(cfg.hydra.run.dir), str(cfg.hydra.run.dir)
        assert first == again
        dirs.append(first)
    assert dirs == ["outputs/2026-12-05/12-00-00", "outputs/2026-12-05/12-00-00-2", "outputs/2026-12-05/12-00-00-3"]
    assert all((tmp_path / d).is_dir() for d in dirs)
    sweeps = [str(_compose_with_hydra().hydra.sweep.dir) for _ in range(2)]
    assert sweeps == ["outputs/multirun/2026-12-05/12-00-00", "outputs/multirun/2026-12-05/12-00-00-2"]


def _compose_with_hydra(*overrides: str):
    from lightning_lora.config import compose_config

    return compose_config(overrides, return_hydra_config=True)


def test_paths_run_dir_is_used_as_given_and_claims_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    cfg = _compose_with_hydra("strategy=slurm")
    assert cfg.hydra.run.dir == "outputs/slurm/77"  # the same after a requeue
    assert not (tmp_path / "outputs" / "slurm").exists() and fresh_dir("x", "given") == "given"


def test_fresh_dir_claims_atomically_under_threads(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: fresh_dir(str(tmp_path / "t")), range(16)))
    assert len(set(claimed)) == 16 and all(Path(c).is_dir() for c in claimed)


def test_same_second_double_launch(tmp_path, tiny_bert, cache_dir) -> None:
    """Two `python -m lightning_lora.train` started together with the default run directory: two directories,
    each holding one whole run (or one refuses with one line); never one directory holding both.

    When they start depends on the machine's load, so every default directory of the next 10 minutes is taken
    beforehand (as by runs started that second): each launch must collide and claim a suffixed name, and two
    launches in one second collide with each other too."""
    import datetime

    now = datetime.datetime.now()
    taken = {tmp_path / "outputs" / t.strftime("%Y-%m-%d") / t.strftime("%H-%M-%S")
             for t in (now + datetime.timedelta(seconds=s) for s in range(-2, 600))}
    for d in taken:
        d.mkdir(parents=True)
    args = [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *SHORT]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", ""))
                                          if p)}
    procs = [subprocess.Popen([sys.executable, "-m", "lightning_lora.train", *args, f"seed={seed}"], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [p.communicate(timeout=600) for p in procs]
    ok = [i for i, p in enumerate(procs) if p.returncode == 0]
    for i, p in enumerate(procs):
        if p.returncode != 0:
            assert_one_error_line(p.returncode, results[i][1], "run directory", case=f"launch {i}")
    assert ok, [r[1][-2000:] for r in results]
    reported = [{line.removeprefix("Run directory: ") for line in results[i][0].splitlines()
                 if line.startswith("Run directory: ")} for i in ok]
    assert all(len(r) == 1 for r in reported)  # the same directory at the start and the end of each run
    dirs = [Path(next(iter(r))) for r in reported]
    assert len(set(dirs)) == len(dirs)  # each finished run names its own directory
    for i, d in zip(ok, dirs, strict=True):
        assert d.name.rsplit("-", 1)[-1].isdigit() and d.parent.parent == tmp_path / "outputs"
        assert d not in taken and OmegaConf.load(d / "config.yaml").seed == i + 1
        assert (d / ".hydra" / "overrides.yaml").read_text().count("seed=") == 1
    assert all(not any(d.iterdir()) for d in taken)  # nothing written into another run's directory
    print("run directories:", [d.name for d in dirs])


# ---------------------------------------------------------------------------- used directories: the allowed ways
def test_resume_last_continues_in_a_used_directory(used_run, tmp_path, tiny_bert, cache_dir) -> None:
    run_dir = _copy_used(tmp_path, used_run)
    assert train_main(_args(tiny_bert, cache_dir, f"hydra.run.dir={run_dir}", "resume=last",
                            "trainer.max_steps=4")) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4
    assert (run_dir / "adapters" / "step_0000004").is_dir() and (run_dir / "adapters" / "step_0000002").is_dir()
    assert not (run_dir / LOCK_FILE).exists()  # released and removed when the run ended


def test_overwrite_true_replaces_the_old_run(used_run, tmp_path, tiny_bert, cache_dir, capsys) -> None:
    run_dir = _copy_used(tmp_path, used_run)
    (run_dir / "adapters" / "step_0000999").mkdir()  # the old run's last snapshot: must not survive
    (run_dir / "notes.txt").write_text("mine\n")  # not a run output: kept
    assert train_main(_args(tiny_bert, cache_dir, f"hydra.run.dir={run_dir}", "overwrite=true", "seed=5")) == 0
    out = capsys.readouterr().out
    assert "overwrite=true: removed the previous run's" in out
    assert sorted(p.name for p in (run_dir / "adapters").iterdir()) == ["final", "step_0000002"]
    assert OmegaConf.load(run_dir / "config.yaml").seed == 5
    assert (run_dir / "notes.txt").read_text() == "mine\n"


def test_hpc_checkpoint_marks_a_requeue_not_a_fresh_run(used_run, tmp_path) -> None:
    from lightning_lora.rundir import check_run_dir

    run_dir = _copy_used(tmp_path, used_run)
    with pytest.raises(Exception, match="already holds a run"):
        check_run_dir(run_dir, None, False)
    (run_dir / "hpc_ckpt_1.ckpt").write_bytes(b"")
    check_run_dir(run_dir, None, False)  # Lightning's SLURM requeue resumes from it


def test_run_in_python_refuses_a_used_directory(used_run, fast_cfg, tmp_path) -> None:
    from lightning_lora.errors import UserError
    from lightning_lora.train import run

    run_dir = _copy_used(tmp_path, used_run)
    before = file_bytes(run_dir)
    cfg = fast_cfg()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    with pytest.raises(UserError, match="already holds a run"):
        run(cfg)
    assert file_bytes(run_dir) == before


# ---------------------------------------------------------------------------- the lock and the clean-up
def test_lock_refuses_a_second_holder_and_is_removed_on_release(tmp_path) -> None:
    from lightning_lora.errors import UserError

    first = RunDirLock(tmp_path)
    first.acquire()
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(UserError, match=f"in use by another run \\(PID {os.getpid()}\\)"):
        RunDirLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    again = RunDirLock(tmp_path)
    again.acquire()
    again.release()


def test_cleanup_never_deletes_a_live_writers_temporary(tmp_path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / "checkpoints").mkdir()
        theirs = tmp_path / "checkpoints" / f"{TMP_PREFIX}last.ckpt.{live.pid}-abcd1234"
        theirs.write_bytes(b"being written by another process")
        aside = tmp_path / "adapters" / f"{TMP_PREFIX}final.old-{live.pid}"
        aside.mkdir(parents=True)
        stale = tmp_path / "checkpoints" / f"{TMP_PREFIX}step_0000002.ckpt.{dead.pid}-zz99yy88"
        stale.write_bytes(b"left by a killed run")
        mine = tmp_path / f"{TMP_PREFIX}metrics.json.{os.getpid()}-qwer5678"
        mine.write_bytes(b"left by this process")
        removed = clean_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted([stale, mine])
        assert theirs.read_bytes() == b"being written by another process" and aside.is_dir()
        assert not (tmp_path / "adapters" / "final").exists()  # not moved back while its writer lives
    finally:
        live.kill()
        live.wait()


def test_temporaries_carry_the_writers_pid(tmp_path, monkeypatch) -> None:
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert seen and seen[0].startswith(f"{TMP_PREFIX}a.bin.{os.getpid()}-")


# ---------------------------------------------------------------------------- permissions as the umask says
@pytest.fixture
def umask():
    """Set the process umask for one test and restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in root.rglob("*")}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_training_writes_files_and_dirs_as_the_umask_says(mask, umask, fast_cfg, tmp_path) -> None:
    from lightning_lora.train import run

    cfg = fast_cfg(["validate_before=false", "validate_after=false", "trainer.max_steps=2"])
    umask(mask)
    run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    modes = _modes(run_dir)
    assert {"config.yaml", "metrics.json", "checkpoints/last.ckpt", "adapters/final",
            "adapters/final/encoder/adapter_model.safetensors"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o777 if (run_dir / name).is_dir() else 0o666) & ~mask}
    assert not wrong, wrong


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_cli_tools_write_as_the_umask_says(mask, umask, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from lightning_lora.cli import main as cli_main

    base, tuned = net_pair()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    umask(mask)
    out = tmp_path / "out"
    assert cli_main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned",
                     str(tmp_path / "tuned.safetensors"), "--out", str(out / "lora.safetensors"), "--rank", "4"]) == 0
    assert cli_main(["merge", "--base", str(tmp_path / "base.safetensors"), "--lora", str(out / "lora.safetensors"),
                     "--out", str(out / "merged.safetensors")]) == 0
    assert cli_main(["combine", str(out / "lora.safetensors"), str(out / "lora.safetensors"), "--out",
                     str(out / "combined.safetensors")]) == 0
    capsys.readouterr()
    modes = _modes(out)
    assert set(modes) >= {"lora.safetensors", "merged.safetensors", "combined.safetensors"}
    assert all(mode == 0o666 & ~mask for mode in modes.values()), {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask


@pytest.mark.parametrize(("mask", "mode"), [(0o077, 0o644), (0o022, 0o600), (0o022, 0o640)])
def test_overwrite_keeps_the_files_own_mode(mask, mode, umask, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from lightning_lora.cli import main as cli_main

    base, tuned = net_pair()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"old")
    target.chmod(mode)
    umask(mask)
    assert cli_main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned",
                     str(tmp_path / "tuned.safetensors"), "--out", str(target), "--rank", "4", "--overwrite"]) == 0
    capsys.readouterr()
    assert target.read_bytes() != b"old" and stat.S_IMODE(target.stat().st_mode) == mode


def test_a_replaced_directory_keeps_its_mode_and_a_new_one_follows_the_umask(umask, tmp_path) -> None:
    umask(0o077)
    with atomic_directory(tmp_path / "new") as tmp:
        (tmp / "f").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o755)
    with atomic_directory(tmp_path / "shared") as tmp:
        (tmp / "f").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o755


def test_full_disk_leaves_no_empty_step_directory(tmp_path, monkeypatch) -> None:
    from tiny import TinyHead

    import lightning_lora.fileio as fileio
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.module import LoRAAdaptationModule

    module = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=2, alpha=4, init="random"))
    module.save_adapters(tmp_path / "adapters" / "step_0000002")
    before = file_bytes(tmp_path)
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r": io.BufferedWriter(FullDisk(fd)))
    with pytest.raises(OSError, match="No space left on device"):
        module.save_adapters(tmp_path / "adapters" / "step_0000004")
    monkeypatch.undo()
    assert not (tmp_path / "adapters" / "step_0000004").exists()
    assert file_bytes(tmp_path) == before and not list(tmp_path.rglob(TMP_PREFIX + "*"))


def test_failure_line_names_the_first_failed_job_and_exits_1_on_a_bug(tmp_path) -> None:
    from lightning_lora.sweep import JobRow, failure_line

    rows = [JobRow("0", ["adapter.r=2"], tmp_path, metrics={"after": {}}),
            JobRow("1", ["adapter.r=0"], tmp_path, failure={"reason": "adapter.r=0 must be ...", "user_error": True}),
            JobRow("2", ["adapter.r=4"], tmp_path, failure={"reason": "KeyError: 'x'", "user_error": False}),
            JobRow("3", ["adapter.r=8"], tmp_path)]  # still running (an asynchronous launcher): not a failure
    line, code = failure_line(rows, tmp_path / SUMMARY_FILE)
    assert code == 1 and line.startswith("2 of 4 sweep jobs failed: job 1 (adapter.r=0): adapter.r=0 must be")
    assert "(and 1 more)" in line and [r.status for r in rows] == ["ok", "failed", "failed", "missing"]
    assert failure_line(rows[:1] + rows[3:], tmp_path) is None
