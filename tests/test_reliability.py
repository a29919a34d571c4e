"""Reliability: NaN/Inf guard, determinism and the run's environment record, refusing unsafe pickles, stale
temporary files, SIGTERM and SIGKILL followed by ``resume=last`` (same steps, same adapter bits)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import FAST, REPO, compose_train, run_cli
from families import FamilyCase, case_fixtures, params
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import open_dict
from safetensors.torch import load_file, save_file
from tiny import TinyData, TinyHead

from lightning_lora.adapters import AdapterSpec
from lightning_lora.callbacks import (
    AdapterCheckpoint,
    AtomicCheckpointIO,
    ExactResume,
    NanGuard,
    PreemptionCheckpoint,
    TrainingDiverged,
)
from lightning_lora.callbacks.resume_state import capture_rng, restore_rng
from lightning_lora.cli import main as cli_main
from lightning_lora.errors import UserError
from lightning_lora.fileio import TMP_PREFIX, atomic_directory, atomic_write_bytes, clean_stale_temporaries
from lightning_lora.module import LoRAAdaptationModule
from lightning_lora.train import _user_error, run


# ---------------------------------------------------------------------------- NaN / Inf guard
class FlakyHead(TinyHead):
    """TinyHead whose loss (``kind="loss"``) or LoRA gradients (``kind="grad"``) go non-finite at given steps."""

    def __init__(self, bad_steps: tuple[int, ...] = (3,), kind: str = "loss") -> None:
        super().__init__()
        self.bad_steps, self.kind, self.calls = set(bad_steps), kind, 0

    def training_step(self, batch):
        out = super().training_step(batch)
        if not self.training:  # validation reuses training_step
            return out
        self.calls += 1
        if self.calls in self.bad_steps:
            if self.kind == "loss":
                out.loss = out.loss * float("nan")
            else:  # a finite loss whose gradient is 0 * inf = nan (d/dx sqrt(x) at x = 0)
                pred = self.denoiser(batch["x"], batch["context"])
                out.loss = out.loss + 0.0 * torch.sqrt(pred.sum() * 0.0)
        return out


class Snapshots(Callback):
    """The LoRA tensors after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()
                                           if p.requires_grad}


def _tiny_trainer(tmp_path: Path, guard: NanGuard, max_steps: int = 5, extra: list | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
        enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
        callbacks=[AdapterCheckpoint(tmp_path / "adapters", every_n_steps=1),
                   ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="step_{step:07d}",
                                   auto_insert_metric_name=False, every_n_train_steps=1, save_top_k=-1,
                                   save_last=True),
                   guard, *(extra or [])],
    )


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nan_guard_stops_and_names_the_last_good_files(tmp_path, kind) -> None:
    pl.seed_everything(0)
    module = LoRAAdaptationModule(FlakyHead((3,), kind), AdapterSpec(r=2, alpha=4, init="random"))
    snaps = Snapshots()
    trainer = _tiny_trainer(tmp_path, NanGuard(), extra=[snaps])
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit(module, TinyData())
    message = str(info.value)
    assert "\n" not in message and "training stopped at step 3" in message
    assert ("loss is nan" if kind == "loss" else "gradient of") in message
    assert str(tmp_path / "adapters" / "step_0000002") in message
    assert str(tmp_path / "checkpoints" / "last.ckpt") in message
    # nothing of step 3 reached the weights; the named files hold step 2 and nothing later was written
    assert trainer.global_step == 2 and sorted(snaps.after) == [1, 2]
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and torch.equal(p, snaps.after[2][name]), name
    assert not (tmp_path / "adapters" / "final").exists() and not (tmp_path / "adapters" / "step_0000003").exists()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    saved = load_file(tmp_path / "adapters" / "step_0000002" / "denoiser" / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    # the Hydra entry point turns it into one line: it is a UserError
    assert _user_error(info.value) is info.value


def test_nan_guard_skip_drops_only_the_bad_steps(tmp_path) -> None:
    pl.seed_everything(0)
    module = LoRAAdaptationModule(FlakyHead((3, 4)), AdapterSpec(r=2, alpha=4, init="random"))
    snaps, guard = Snapshots(), NanGuard(action="skip")
    trainer = _tiny_trainer(tmp_path, guard, max_steps=6, extra=[snaps])
    trainer.fit(module, TinyData())
    assert trainer.global_step == 6 and guard.skipped_steps == [3, 4]
    for name in snaps.after[2]:  # skipped steps leave every LoRA tensor (and AdamW's moments) as they were
        assert torch.equal(snaps.after[2][name], snaps.after[3][name]) and torch.equal(snaps.after[3][name],
                                                                                      snaps.after[4][name])
        assert not torch.equal(snaps.after[4][name], snaps.after[5][name])
        assert torch.isfinite(snaps.after[6][name]).all()
    assert (tmp_path / "adapters" / "final").is_dir()


def test_nan_guard_skip_gives_up_after_max_skips(tmp_path) -> None:
    module = LoRAAdaptationModule(FlakyHead((2, 3, 4)), AdapterSpec(r=2, alpha=4, init="random"))
    with pytest.raises(TrainingDiverged, match="training stopped at step 4 .* 2 steps in a row were skipped"):
        _tiny_trainer(tmp_path, NanGuard(action="skip", max_skips=2), max_steps=6).fit(module, TinyData())


def test_nan_guard_is_on_by_default_and_validates_its_action() -> None:
    cfg = compose_train()
    assert cfg.callbacks.nan_guard.action == "stop"
    assert {"nan_guard", "preemption_checkpoint", "exact_resume"} <= set(cfg.callbacks)
    with pytest.raises(UserError, match="callbacks.nan_guard.action='ignore' is unknown"):
        NanGuard(action="ignore")


# ---------------------------------------------------------------------------- determinism
def _adapter_tensors(run_dir: Path, which: str = "final") -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted((run_dir / "adapters" / which).rglob("*.safetensors")):
        found.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    assert found
    return found


def _bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_and_config_give_bit_identical_adapters(fast_cfg, tmp_path) -> None:
    dirs = []
    for name in ("a", "b"):
        cfg = fast_cfg(["validate_before=false", "validate_after=false", "adapter.dropout=0.1"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        run(cfg)
        dirs.append(tmp_path / name)
    assert _bit_identical(_adapter_tensors(dirs[0]), _adapter_tensors(dirs[1]))
    env = json.loads((dirs[0] / "environment.json").read_text())
    assert env["seed"] == 42
    assert set(env["versions"]) >= {"torch", "lightning", "peft", "transformers", "diffusers", "hydra-core"}
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["git"] is None or len(env["git"]["revision"]) == 40
    other = fast_cfg(["validate_before=false", "validate_after=false", "adapter.dropout=0.1", "seed=7"])
    with open_dict(other):
        other.paths.output_dir = str(tmp_path / "c")
    run(other)
    assert not _bit_identical(_adapter_tensors(dirs[0]), _adapter_tensors(tmp_path / "c"))


def test_generator_states_survive_a_weights_only_checkpoint(tmp_path) -> None:
    import random

    state = capture_rng()
    torch.save({"rng": state}, tmp_path / "s.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


# ---------------------------------------------------------------------------- untrusted files
class Payload:
    """Unpickling this creates ``marker`` (open(marker, "w")): what any code in a malicious pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    files = {}
    for suffix in (".pt", ".ckpt", ".bin"):
        path = tmp_path / f"evil{suffix}"
        torch.save({"state_dict": {"proj.weight": torch.zeros(2, 2)}, "payload": Payload(marker),
                    "global_step": 1, "loops": {}}, path)
        files[suffix] = path
    good = tmp_path / "good.safetensors"
    save_file({"proj.weight": torch.zeros(2, 2)}, good)
    return marker, files, good


def test_malicious_pickles_are_refused_by_every_cli_loader(evil, tmp_path, capsys) -> None:
    marker, files, good = evil
    np.savez(tmp_path / "cond.npz", tokens=np.zeros((4, 8), dtype=np.float32))
    cases = {
        "inspect": ["inspect", files[".pt"]],
        "merge --base": ["merge", "--base", files[".ckpt"], "--lora", good, "--out", tmp_path / "m.safetensors"],
        "merge --lora": ["merge", "--base", good, "--lora", files[".pt"], "--out", tmp_path / "m.safetensors"],
        "extract --base": ["extract", "--base", files[".ckpt"], "--tuned", good, "--out", tmp_path / "e.safetensors"],
        "extract --tuned": ["extract", "--base", good, "--tuned", files[".bin"], "--out", tmp_path / "e.safetensors"],
        "validate --lora": ["validate", "--base", good, "--tuned", good, "--lora", files[".pt"]],
        "combine": ["combine", files[".pt"], "--out", tmp_path / "c.safetensors"],
        "sample flow3d --lora": ["sample", "flow3d", "--model", "trellis_ss_tiny", "--cond", tmp_path / "cond.npz",
                                 "--lora", files[".pt"], "--out", tmp_path / "s.npz", "--no-png"],
        "sample flow3d --ckpt": ["sample", "flow3d", "--model", "trellis_ss_tiny", "--ckpt", files[".pt"],
                                 "--cond", tmp_path / "cond.npz", "--out", tmp_path / "s.npz", "--no-png"],
    }
    for name, argv in cases.items():
        rc = cli_main([str(a) for a in argv])
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "evil" in lines[0] or "refused a file holding pickled objects" in lines[0], (name, lines[0])
        assert not marker.exists(), name
    assert not any((tmp_path / n).exists() for n in ("m.safetensors", "e.safetensors", "c.safetensors", "s.npz"))


def test_malicious_pickles_are_refused_by_the_python_api(evil, tmp_path) -> None:
    from lightning_lora.adapters import load_lora_weights, read_adapters
    from lightning_lora.adapters.checkpoints import open_weights
    from lightning_lora.adapters.formats import read_lora

    marker, files, _ = evil
    for call in (lambda: read_lora(files[".pt"]), lambda: open_weights(files[".ckpt"]),
                 lambda: read_adapters(files[".pt"]), lambda: load_lora_weights(TinyHead().denoiser, files[".pt"]),
                 lambda: AtomicCheckpointIO().load_checkpoint(files[".ckpt"])):
        with pytest.raises(Exception):  # noqa: B017 - what matters is that nothing ran
            call()
        assert not marker.exists()
    with pytest.raises(UserError, match="refused: it holds pickled objects"):
        AtomicCheckpointIO().load_checkpoint(files[".ckpt"])


@pytest.mark.parametrize("key", ["adapter.init_from", "resume"])
def test_malicious_pickles_are_refused_by_training(fast_cfg, evil, key) -> None:
    marker, files, _ = evil
    path = files[".pt" if key == "adapter.init_from" else ".ckpt"]
    with pytest.raises(Exception) as info:
        run(fast_cfg([f"{key}={path}", "validate_before=false", "validate_after=false"]))
    err = _user_error(info.value)
    assert isinstance(err, UserError), info.value
    assert "\n" not in str(err) and str(path) in str(err) and "refused" in str(err)
    assert not marker.exists()


# ---------------------------------------------------------------------------- stale temporaries
def test_stale_temporaries_are_cleaned_and_a_moved_aside_directory_comes_back(tmp_path) -> None:
    atomic_write_bytes(tmp_path / "checkpoints" / "last.ckpt", b"good")
    (tmp_path / "checkpoints" / f"{TMP_PREFIX}last.ckpt.abc123").write_bytes(b"trunc")  # killed mid-write
    with atomic_directory(tmp_path / "adapters" / "step_0000002") as d:
        (d / "a.safetensors").write_bytes(b"x")
    half = tmp_path / "adapters" / f"{TMP_PREFIX}final.q1w2e3"  # a snapshot directory never renamed
    half.mkdir()
    (half / f"{TMP_PREFIX}adapter_model.safetensors.zz").write_bytes(b"half")
    # killed between "move the old step_0000004 aside" and "rename the new one in": the old one is restored
    aside = tmp_path / "adapters" / f"{TMP_PREFIX}step_0000004.old-4242"
    aside.mkdir()
    (aside / "a.safetensors").write_bytes(b"old")
    (tmp_path / "data").mkdir()  # not a directory the project writes: a user's file there is left alone
    (tmp_path / "data" / f"{TMP_PREFIX}theirs").write_bytes(b"")
    removed = clean_stale_temporaries(tmp_path)
    assert len(removed) == 4
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["adapters", "adapters/step_0000002", "adapters/step_0000002/a.safetensors",
                    "adapters/step_0000004", "adapters/step_0000004/a.safetensors", "checkpoints",
                    "checkpoints/last.ckpt", "data", f"data/{TMP_PREFIX}theirs"]
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"good"
    assert (tmp_path / "adapters" / "step_0000004" / "a.safetensors").read_bytes() == b"old"


# ---------------------------------------------------------------------------- kill and resume
class SlowDown(Callback):
    """Sleeps after every batch so a test can kill the run between checkpoints (used by the subprocess)."""

    def __init__(self, seconds: float = 0.25) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


class SlowWrites(Callback):
    """From step ``after`` on, every file rename of an atomic write waits ``seconds`` first, so a test can kill
    the run while a temporary file is being written (used by the subprocess)."""

    def __init__(self, after: int = 4, seconds: float = 2.0) -> None:
        self.after, self.seconds = after, seconds

    def setup(self, trainer, pl_module, stage) -> None:
        import lightning_lora.fileio as fileio

        replace = os.replace

        def slow_replace(src, dst, *args, **kwargs):
            if trainer.global_step >= self.after:
                time.sleep(self.seconds)
            return replace(src, dst, *args, **kwargs)

        fileio.os = type("os_with_slow_replace", (), {"__getattr__": lambda _, n: getattr(os, n),
                                                      "replace": staticmethod(slow_replace)})()


STEPS = 8  # one epoch of 64 rows in batches of 8: a kill after step 2 resumes mid-epoch


def _train_args(run_dir: Path, tiny_bert: Path, cache_dir: Path) -> list[str]:
    return [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST, f"hydra.run.dir={run_dir}",
            f"trainer.max_steps={STEPS}", "validate_before=false", "validate_after=false", "adapter.dropout=0.1",
            "+callbacks.slow_down._target_=test_reliability.SlowDown", "data.max_train_samples=64"]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "lightning_lora.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared: {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_bert, cache_dir):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    rc, _, err = _finish(_start(_train_args(run_dir, tiny_bert, cache_dir)))
    assert rc == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS
    return run_dir


def _resume_and_compare(run_dir: Path, reference: Path, tiny_bert: Path, cache_dir: Path) -> str:
    rc, out, err = _finish(_start([*_train_args(run_dir, tiny_bert, cache_dir), "resume=last"]))
    assert rc == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == STEPS
    assert not [p for p in run_dir.rglob(TMP_PREFIX + "*")]
    for which in ("step_0000004", "step_0000006", "final"):
        assert _bit_identical(_adapter_tensors(run_dir, which), _adapter_tensors(reference, which)), which
    return out


KILL_POINTS = ["after_checkpoint", pytest.param("mid_step", marks=pytest.mark.slow), "during_write"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_bert, cache_dir, reference_run, point) -> None:
    run_dir = tmp_path / "run"
    extra = ["+callbacks.slow_writes._target_=test_reliability.SlowWrites"] if point == "during_write" else []
    proc = _start([*_train_args(run_dir, tiny_bert, cache_dir), *extra])
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    if point == "mid_step":
        time.sleep(0.6)
    elif point == "during_write":  # a temporary snapshot or checkpoint exists: the write is under way
        deadline = time.time() + 120
        while not [p for p in run_dir.rglob(TMP_PREFIX + "*") if p.is_file()] and time.time() < deadline:
            time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    rc, _, _ = _finish(proc)
    assert rc == -signal.SIGKILL
    killed_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= killed_at < STEPS
    assert not (run_dir / "metrics.json").exists()
    stale = [p for p in run_dir.rglob(TMP_PREFIX + "*")]
    if point == "during_write":
        assert stale, "the kill was meant to land during a write"
    # what a kill during a write leaves behind: a truncated temporary checkpoint and a half snapshot
    (run_dir / "checkpoints" / f"{TMP_PREFIX}last.ckpt.k1ll3d").write_bytes(b"PK\x03\x04trunc")
    (run_dir / "adapters" / f"{TMP_PREFIX}step_0000004.k1ll3d").mkdir(parents=True)
    out = _resume_and_compare(run_dir, reference_run, tiny_bert, cache_dir)
    assert out.count("removed a temporary file of an interrupted write") >= 2
    print(f"kill point {point}: killed after step {killed_at}, {len(stale)} temporaries left by the kill")


def test_sigterm_writes_a_checkpoint_and_resume_is_bit_identical(tmp_path, tiny_bert, cache_dir,
                                                                 reference_run) -> None:
    run_dir = tmp_path / "run"
    proc = _start(_train_args(run_dir, tiny_bert, cache_dir))
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(0.3)  # land between checkpoints (they are every 2 steps)
    proc.send_signal(signal.SIGTERM)
    rc, _, err = _finish(proc)
    assert rc == 143, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: stopped by SIGTERM at step ") and "continue with resume=last" in last_line
    step = int(last_line.split("at step ")[1].split(";")[0])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
    assert 2 <= step < STEPS
    print(f"SIGTERM: checkpoint written at step {step}")
    _resume_and_compare(run_dir, reference_run, tiny_bert, cache_dir)


def test_resume_state_in_process_matches_an_uninterrupted_run(fast_cfg, tmp_path) -> None:
    """In-process variant (no subprocess): stop after 2 of 6 steps, resume from last.ckpt, compare."""
    # a constant schedule: the first part's schedule would otherwise be laid out over its own 2 steps
    common = ["validate_before=false", "validate_after=false", "adapter.dropout=0.1", "trainer.max_steps=6",
              "scheduler.name=constant", "scheduler.warmup_ratio=0"]

    def cfg_for(name: str, extra: list[str]):
        cfg = fast_cfg([*common, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        return cfg

    run(cfg_for("full", []))
    run(cfg_for("part", ["trainer.max_steps=2"]))
    _, objects = run(cfg_for("part", ["resume=last"]))
    exact = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, ExactResume))
    assert exact.exact and exact.skipped_batches == 2
    assert _bit_identical(_adapter_tensors(tmp_path / "part"), _adapter_tensors(tmp_path / "full"))


class _Stream(torch.utils.data.IterableDataset):
    """Items in an order drawn from torch's RNG when a pass starts, each with fresh noise (an augmentation)."""

    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __iter__(self):
        for i in torch.randperm(len(self.items)).tolist():
            item = self.items[i]
            yield {"x": item["x"] + 0.1 * torch.randn_like(item["x"]), "context": item["context"]}


class StreamData(TinyData):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(_Stream(self.items), batch_size=self.batch_size)


@pytest.mark.parametrize("exact", [True, False])
def test_exact_resume_reads_an_iterable_dataset_through_the_trained_batches(tmp_path, exact) -> None:
    def fit(name: str, max_steps: int, ckpt: str | None = None) -> dict[str, torch.Tensor]:
        pl.seed_everything(7)
        module = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=2, alpha=4, dropout=0.2, init="random"))
        extra = [ExactResume()] if exact else []
        trainer = _tiny_trainer(tmp_path / name, NanGuard(), max_steps=max_steps, extra=extra)
        trainer.fit(module, StreamData(), ckpt_path=ckpt)
        if exact and ckpt:
            assert extra[0].skipped_batches == 2 and extra[0].exact
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    full = fit("full", 6)
    fit("part", 2)
    resumed = fit("part", 6, ckpt=str(tmp_path / "part" / "checkpoints" / "last.ckpt"))
    # without ExactResume the resumed run restarts the stream with other random numbers: it must differ
    assert _bit_identical(resumed, full) == exact


def test_preemption_callback_ignores_other_exceptions(tmp_path) -> None:
    module = LoRAAdaptationModule(FlakyHead((2,)), AdapterSpec(r=2, alpha=4, init="random"))
    pre = PreemptionCheckpoint(tmp_path / "pre")
    with pytest.raises(TrainingDiverged):
        _tiny_trainer(tmp_path, NanGuard(), extra=[pre]).fit(module, TinyData())
    assert pre.saved is None and not (tmp_path / "pre").exists()


def test_nonfinite_values_are_named() -> None:
    from lightning_lora.callbacks.nan_guard import _describe

    assert [_describe(v) for v in (math.nan, math.inf, -math.inf)] == ["nan", "+inf", "-inf"]


@pytest.mark.parametrize("fused", [True, False])
def test_nan_guard_check_finds_every_non_finite_gradient_and_leaves_finite_ones_bit_identical(monkeypatch,
                                                                                               fused) -> None:
    from lightning_lora.callbacks import nan_guard

    if not fused:  # the per-tensor route other devices take
        monkeypatch.setattr(nan_guard, "_FUSED_CHECK_DEVICES", ())
    tiny = torch.finfo(torch.float32).tiny / 4  # a subnormal: a check that rescaled would be seen flushing it
    grads = [torch.tensor([[1.5, -0.0], [tiny, -3e38]]), torch.randn(5, dtype=torch.bfloat16), torch.randn(3, 2)]
    before = [g.clone() for g in grads]
    assert not nan_guard._any_non_finite(grads)
    assert all(torch.equal(a, b) and a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32).equal(
        b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32)) for a, b in zip(grads, before, strict=True))
    for which, bad in [(0, math.nan), (1, math.inf), (2, -math.inf)]:
        grads[which].view(-1)[-1] = bad
        assert nan_guard._any_non_finite(grads), (which, bad)
        grads[which].copy_(before[which])


# Each row of the family matrix but the tiny BERT (its resume tests above run in the default suite): 6 steps with
# snapshots and checkpoints every 2, dropout on (its RNG must resume too), a constant schedule; embedding rows with
# the gradient cache (its chunks replay the dropout RNG), TRELLIS rows with a random LoRA init.
RESUME = ["trainer.max_steps=6", "validate_before=false", "validate_after=false", "~callbacks.progress_bar",
          "~callbacks.sample_previews", "callbacks.adapter_checkpoint.every_n_steps=2",
          "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.precision=32-true", "scheduler.name=constant",
          "scheduler.warmup_ratio=0.0", "adapter.dropout=0.1"]


def _family_overrides(case: FamilyCase, request) -> list[str]:
    extra = {"embedding": ["model.gradient_cache.chunk_size=4"], "flow3d": ["adapter.init=random"]}
    return [*case.run_overrides(case_fixtures(case, request)), *RESUME, *extra.get(case.family, [])]


def _not_bert(case: FamilyCase) -> bool:
    return case.name != "bert"


@pytest.fixture
def two_threads():
    """Two intra-op threads whatever the machine, so the multi-threaded kernels run too (with one, a kernel whose sums
    race across threads cannot race at all; test_determinism.py looks for those). The subprocess tests above run
    with OMP_NUM_THREADS=1: they prove the resume logic, not thread determinism."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("case", params(slow=lambda case: True, where=_not_bert))
def test_every_family_resumes_bit_identically(tmp_path, case: FamilyCase, request) -> None:
    """Stop after 2 of 6 steps, resume=last, compare with the uninterrupted run (in process)."""
    overrides = _family_overrides(case, request)

    def run_in(name: str, extra: list[str]):
        cfg = compose_train([*overrides, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        return run(cfg)

    run_in("full", [])
    run_in("part", ["trainer.max_steps=2"])
    metrics, objects = run_in("part", ["resume=last"])
    assert metrics["global_step"] == 6
    exact = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, ExactResume))
    assert exact.exact and exact.skipped_batches == 2
    for which in ("step_0000004", "final"):
        assert _bit_identical(_adapter_tensors(tmp_path / "part", which), _adapter_tensors(tmp_path / "full", which))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_checkpoint", "during_write"])
@pytest.mark.parametrize("case", params(where=_not_bert))
def test_every_family_survives_sigkill(tmp_path, case: FamilyCase, point, request) -> None:
    """The subprocess kill test of the tiny BERT, for every row of the family matrix: SIGKILL after the first
    checkpoint or while a file is being written, then resume=last: 6 steps and the uninterrupted run's adapter bits."""
    overrides = [*_family_overrides(case, request), "+callbacks.slow_down._target_=test_reliability.SlowDown"]
    reference, run_dir = tmp_path / "reference", tmp_path / "killed"
    rc, _, err = _finish(_start([*overrides, f"hydra.run.dir={reference}"]))
    assert rc == 0, err[-3000:]
    extra = ["+callbacks.slow_writes._target_=test_reliability.SlowWrites", "+callbacks.slow_writes.after=2"
             ] if point == "during_write" else []
    proc = _start([*overrides, *extra, f"hydra.run.dir={run_dir}"])
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    if point == "during_write":
        deadline = time.time() + 120
        while not [p for p in run_dir.rglob(TMP_PREFIX + "*") if p.is_file()] and time.time() < deadline:
            time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert _finish(proc)[0] == -signal.SIGKILL
    killed_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= killed_at < 6
    assert point != "during_write" or [p for p in run_dir.rglob(TMP_PREFIX + "*")], "the kill missed the write"
    rc, _, err = _finish(_start([*overrides, f"hydra.run.dir={run_dir}", "resume=last"]))
    assert rc == 0, err[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    assert not [p for p in run_dir.rglob(TMP_PREFIX + "*")]
    for which in ("step_0000004", "final"):
        assert _bit_identical(_adapter_tensors(run_dir, which), _adapter_tensors(reference, which)), which
    print(f"{case.name} {point}: killed after step {killed_at}, resumed bit-identically")


def _ddp_resume(tmp_path: Path, tiny_bert: Path, cache_dir: Path, extra: list[str]) -> tuple[Path, Path]:
    """(uninterrupted, resumed) run dirs of a 2-process CPU DDP run of 6 steps; the second stopped after 2
    (mid-epoch: 4 batches per process per epoch) and resumed with resume=last. LoRA dropout draws from each
    process's generators, whose states part ways (each pads its batches to its own lengths)."""
    common = [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST, "validate_before=false",
              "validate_after=false", "adapter.dropout=0.1", "scheduler.name=constant", "scheduler.warmup_ratio=0",
              "trainer.precision=32-true", "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
              "model.query_max_length=64", "model.doc_max_length=128", *extra]  # not cut: lengths vary per batch
    full, part = tmp_path / "full", tmp_path / "part"
    for args in ([f"hydra.run.dir={full}", "trainer.max_steps=6"], [f"hydra.run.dir={part}", "trainer.max_steps=2"],
                 [f"hydra.run.dir={part}", "trainer.max_steps=6", "resume=last"]):
        proc = run_cli([*common, *args], timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((part / "metrics.json").read_text())["global_step"] == 6
    return full, part


def test_ddp_resume_continues_each_processs_data_where_it_stopped(tmp_path, tiny_bert, cache_dir) -> None:
    """Under DDP each process skips its own trained batches (Lightning's DistributedSampler, given to the loader
    before Lightning would inject it) and gets its own generator states back: the resumed adapter equals the
    uninterrupted one bit for bit."""
    full, part = _ddp_resume(tmp_path, tiny_bert, cache_dir, [])
    for which in ("step_0000004", "final"):
        assert _bit_identical(_adapter_tensors(part, which), _adapter_tensors(full, which)), which


@pytest.mark.slow
def test_ddp_resume_without_exact_resume_replays_the_epoch(tmp_path, tiny_bert, cache_dir) -> None:
    """The control: Lightning alone restarts the interrupted epoch from its first batch, so the adapters differ."""
    full, part = _ddp_resume(tmp_path, tiny_bert, cache_dir, ["~callbacks.exact_resume"])
    assert not _bit_identical(_adapter_tensors(part), _adapter_tensors(full))
