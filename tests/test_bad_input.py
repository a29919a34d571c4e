"""The bad-input matrix: damaged, empty, foreign and unsafe files, unwritable outputs and a full disk, against
every ``lightning-lora`` sub-command, ``python -m lightning_lora.train`` and the public Python functions.

Each must fail with exit status 2 (``UserError`` from Python) and one line naming the bad value, show no
traceback unless asked (``--debug`` / ``HYDRA_FULL_ERROR=1``), and leave existing files untouched. What
tests/test_cli.py and tests/test_train.py already cover (bad ranks, key/shape mismatches, a junk file, bad
adapter values, unknown targets, missing data fields) is not repeated here.
"""

from __future__ import annotations

import errno
import io
import os
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from helpers import FullDisk, net_pair
from safetensors.torch import save_file

from lightning_lora.cli import main as cli_main
from lightning_lora.errors import UserError
from lightning_lora.train import _user_error, run

# one intra-op thread: on a busy 2-core machine torch's multi-threaded SVD can be 100x slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tmp_path, capsys):
    """Good base/tuned/LoRA files plus the bad ones; returns (dir, {name: path})."""
    d = tmp_path
    base, tuned = net_pair()
    save_file(base, d / "base.safetensors")
    save_file(tuned, d / "tuned.safetensors")
    assert cli_main(["extract", "--base", str(d / "base.safetensors"), "--tuned", str(d / "tuned.safetensors"),
                     "--out", str(d / "lora.safetensors"), "--rank", "4"]) == 0
    capsys.readouterr()
    bad: dict[str, Path] = {}
    for name in ("lora", "tuned"):  # a safetensors file whose tail was cut (a killed copy)
        data = (d / f"{name}.safetensors").read_bytes()
        bad[f"cut_{name}"] = d / f"cut_{name}.safetensors"
        bad[f"cut_{name}"].write_bytes(data[: len(data) - 64])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:  # a zip archive that is not a torch checkpoint
        z.writestr("notes/readme.txt", "hello")
    for suffix in (".ckpt", ".pt"):
        bad[f"zip{suffix}"] = d / f"archive{suffix}"
        bad[f"zip{suffix}"].write_bytes(buffer.getvalue())
    for suffix in (".safetensors", ".pt", ".ckpt"):
        bad[f"empty{suffix}"] = d / f"empty{suffix}"
        bad[f"empty{suffix}"].write_bytes(b"")
    torch.save([torch.zeros(2)], d / "list.pt")  # weights-only but not a mapping of names to tensors
    bad["list.pt"] = d / "list.pt"
    return d, bad


def _cases(d: Path, bad: dict[str, Path]) -> dict[str, tuple[list, str]]:
    b, t, lora = d / "base.safetensors", d / "tuned.safetensors", d / "lora.safetensors"
    out = d / "existing.safetensors"
    ex = ["extract", "--base", b, "--out", out, "--overwrite"]
    return {
        "inspect cut tail": (["inspect", bad["cut_lora"]], "cut_lora.safetensors"),
        "inspect zip": (["inspect", bad["zip.pt"]], "archive.pt"),
        "inspect empty": (["inspect", bad["empty.safetensors"]], "empty.safetensors"),
        "inspect empty .pt": (["inspect", bad["empty.pt"]], "empty.pt"),
        "inspect list": (["inspect", bad["list.pt"]], "list.pt"),
        "extract cut tail": ([*ex, "--tuned", bad["cut_tuned"]], "cut_tuned.safetensors"),
        "extract zip": ([*ex, "--tuned", bad["zip.ckpt"]], "archive.ckpt"),
        "extract empty": ([*ex, "--tuned", bad["empty.pt"]], "empty.pt"),
        "extract missing": ([*ex, "--tuned", d / "nope.safetensors"], "nope.safetensors"),
        "merge cut lora": (["merge", "--base", b, "--lora", bad["cut_lora"], "--out", out, "--overwrite"],
                           "cut_lora.safetensors"),
        "merge cut base": (["merge", "--base", bad["cut_tuned"], "--lora", lora, "--out", out, "--overwrite"],
                           "cut_tuned.safetensors"),
        "merge zip base": (["merge", "--base", bad["zip.ckpt"], "--lora", lora, "--out", out, "--overwrite"],
                           "archive.ckpt"),
        "merge empty base": (["merge", "--base", bad["empty.ckpt"], "--lora", lora, "--out", out, "--overwrite"],
                             "empty.ckpt"),
        "merge bad scale": (["merge", "--base", b, "--lora", f"{lora}:nan", "--out", out, "--overwrite"], "'nan'"),
        "validate cut lora": (["validate", "--base", b, "--tuned", t, "--lora", bad["cut_lora"]],
                              "cut_lora.safetensors"),
        "validate threshold": (["validate", "--base", b, "--tuned", t, "--lora", lora, "--threshold", "0"],
                               "--threshold=0"),
        "combine empty": (["combine", lora, bad["empty.safetensors"], "--out", out, "--overwrite"],
                          "empty.safetensors"),
        "combine cut": (["combine", bad["cut_lora"], "--out", out, "--overwrite"], "cut_lora.safetensors"),
        "combine bad weight": (["combine", f"{lora}:inf", "--out", out, "--overwrite"], "'inf'"),
        "sample sd missing": (["sample", "sd", "--pretrained", d / "no_sd", "--prompt", "x", "--out", d / "x.png"],
                              "no_sd"),
        "sample lbm source": (["sample", "lbm", "--pretrained", d / "no_lbm", "--source", d / "nope.png", "--out",
                               d / "x.png"], "nope.png"),
        "sample flow3d cond": (["sample", "flow3d", "--cond", d / "nope.npz", "--out", d / "x.npz"], "nope.npz"),
        "sample flow3d lora": (["sample", "flow3d", "--model", "trellis_ss_tiny", "--cond", d / "cond.npz",
                                "--lora", bad["cut_lora"], "--out", d / "x.npz", "--no-png"], "cut_lora"),
    }


def test_cli_matrix(files, capsys) -> None:
    import numpy as np

    d, bad = files
    np.savez(d / "cond.npz", tokens=np.zeros((4, 8), dtype=np.float32))
    existing = d / "existing.safetensors"
    existing.write_bytes(b"keep me")
    before = {p: p.read_bytes() for p in d.iterdir() if p.is_file()}
    results = {}
    for name, (argv, needle) in _cases(d, bad).items():
        rc = cli_main([str(a) for a in argv])
        _, err = capsys.readouterr()
        lines = err.strip().splitlines()
        results[name] = (rc, lines)
        assert rc == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (name, err)
        assert needle in lines[0], (name, lines[0])
    after = {p: p.read_bytes() for p in d.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing replaced, no temporary left
    assert len(results) == 23


def test_cli_debug_shows_the_traceback(files, capsys) -> None:
    _, bad = files
    with pytest.raises(UserError, match="cut_lora.safetensors"):
        cli_main(["inspect", str(bad["cut_lora"]), "--debug"])


def _read_only(monkeypatch, directory: Path) -> None:
    """Make ``directory`` refuse new files: chmod, or for root (who writes anyway) a refusing mkstemp."""
    import lightning_lora.fileio as fileio

    directory.chmod(0o500)
    if os.geteuid() == 0:
        real = fileio.tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == directory.resolve():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).resolve() != directory.resolve())


def test_cli_unwritable_output_directory(files, capsys, monkeypatch) -> None:
    d, _ = files
    ro = d / "ro"
    ro.mkdir()
    _read_only(monkeypatch, ro)
    try:
        rc = cli_main(["extract", "--base", str(d / "base.safetensors"), "--tuned", str(d / "tuned.safetensors"),
                       "--out", str(ro / "x.safetensors")])
    finally:
        ro.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Permission denied" in err[0] and "ro" in err[0]
    assert not list(ro.iterdir())


def test_disk_full_leaves_the_old_file_and_no_temporary(files, capsys, monkeypatch) -> None:
    import lightning_lora.fileio as fileio

    d, _ = files
    out = d / "merged.safetensors"
    out.write_bytes(b"the previous merge")
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r": io.BufferedWriter(FullDisk(fd)))
    rc = cli_main(["merge", "--base", str(d / "base.safetensors"), "--lora", str(d / "lora.safetensors"), "--out",
                   str(out), "--overwrite"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and str(out) in err[0]
    assert out.read_bytes() == b"the previous merge"
    assert not [p for p in d.iterdir() if p.name.startswith(".tmp-")]


def test_disk_full_during_an_adapter_snapshot_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    from tiny import TinyHead

    import lightning_lora.fileio as fileio
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.module import LoRAAdaptationModule

    module = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=2, alpha=4, init="random"))
    module.save_adapters(tmp_path / "final")
    before = {p: p.read_bytes() for p in (tmp_path / "final").rglob("*") if p.is_file()}
    with torch.no_grad():
        next(p for p in module.parameters() if p.requires_grad).add_(1.0)
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r": io.BufferedWriter(FullDisk(fd)))
    with pytest.raises(OSError, match="No space left on device"):
        module.save_adapters(tmp_path / "final")
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in (tmp_path / "final").rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob(".tmp-*")]


# ---------------------------------------------------------------------------- training entry point
def _peft_dir(path: Path, rows: int = 4, cols: int = 32, family: str | None = None) -> Path:
    """A PEFT directory for the tiny BERT's ``query`` layers (hidden size 32) with the given lora_A shape."""
    import json

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["query"]}))
    tensors = {}
    for layer in range(2):
        key = f"base_model.model.encoder.layer.{layer}.attention.self.query"
        tensors[f"{key}.lora_A.weight"] = torch.zeros(rows, cols)
        tensors[f"{key}.lora_B.weight"] = torch.zeros(32, rows)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def _wide_adapter(tmp: Path, tiny_bert: Path) -> Path:
    """A real adapter snapshot of the tiny BERT whose ``query`` lora_A tensors have 48 columns instead of 32."""
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.heads.embedding import EmbeddingHead
    from lightning_lora.module import LoRAAdaptationModule

    module = LoRAAdaptationModule(EmbeddingHead(str(tiny_bert)), AdapterSpec(r=4, alpha=8, targets=["query"]))
    module.save_adapters(tmp / "wide")
    weights = tmp / "wide" / "encoder" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(weights)
    save_file({k: torch.zeros(v.shape[0], 48) if "lora_A" in k else v for k, v in state.items()}, weights)
    return tmp / "wide"


def _train_cases(tmp: Path, tiny_bert: Path | None = None) -> dict[str, tuple[list[str], str]]:
    from tiny import TinyHead

    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.module import LoRAAdaptationModule

    cut = tmp / "cut.safetensors"
    _peft_dir(tmp / "good")
    data = (tmp / "good" / "adapter_model.safetensors").read_bytes()
    cut.write_bytes(data[:-40])
    (tmp / "empty.ckpt").write_bytes(b"")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("x.txt", "not a checkpoint")
    (tmp / "archive.ckpt").write_bytes(buffer.getvalue())
    torch.save({"weights": torch.zeros(2)}, tmp / "foreign.ckpt")  # weights-only, but no Lightning state
    tiny = LoRAAdaptationModule(TinyHead(), AdapterSpec(r=2, alpha=4, init="random"))
    tiny.save_adapter_file(tmp / "tiny_family.safetensors")
    return {
        "init_from cut tail": ([f"adapter.init_from={cut}"], str(cut)),
        "init_from wrong family": ([f"adapter.init_from={tmp / 'tiny_family.safetensors'}"],
                                   "holds a tiny adapter, but this run's model is a embedding head"),
        "init_from shape mismatch": ([f"adapter.init_from={_wide_adapter(tmp, tiny_bert)}"] if tiny_bert else [],
                                     "wide"),
        "init_from missing": ([f"adapter.init_from={tmp / 'nope'}"], str(tmp / "nope")),
        "resume empty": ([f"resume={tmp / 'empty.ckpt'}"], "empty.ckpt"),
        "resume zip": ([f"resume={tmp / 'archive.ckpt'}"], "archive.ckpt"),
        "resume foreign": ([f"resume={tmp / 'foreign.ckpt'}"], "foreign.ckpt"),
        "nan_guard action": (["callbacks.nan_guard.action=ignore"], "callbacks.nan_guard.action='ignore'"),
        "scheduler": (["scheduler.name=cosinus"], "scheduler.name='cosinus'"),
        "adapter every_n_steps": (["callbacks.adapter_checkpoint.every_n_steps=-1"], "every_n_steps=-1"),
    }


TRAIN_CASES = ["init_from cut tail", "init_from wrong family", "init_from shape mismatch", "init_from missing",
               "resume empty", "resume zip", "resume foreign", "nan_guard action", "scheduler",
               "adapter every_n_steps"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_matrix_in_process(fast_cfg, tmp_path, tiny_bert, case) -> None:
    overrides, needle = _train_cases(tmp_path, tiny_bert)[case]
    with pytest.raises(Exception) as info:
        run(fast_cfg([*overrides, "validate_before=false", "validate_after=false"]))
    err = _user_error(info.value)
    assert isinstance(err, UserError), repr(info.value)
    assert needle in str(err) and "\n" not in str(err), str(err)


def test_train_matrix_as_a_subprocess(tmp_path, tiny_bert, cache_dir) -> None:
    """Exit status 2, one line, no traceback; HYDRA_FULL_ERROR=1 shows it; existing run files untouched."""
    from conftest import FAST

    _train_cases(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text("{}\n")
    args = [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST, f"hydra.run.dir={run_dir}",
            "validate_before=false"]
    # overwrite=true: past the used-directory refusal (tests/test_run_dirs.py), to the bad value, which still fails
    # before the old run's files would be removed
    proc = run_cli([*args, f"adapter.init_from={tmp_path / 'cut.safetensors'}", "overwrite=true"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: adapter.init_from=") and "cut.safetensors" in lines[-1]
    proc = run_cli([*args, f"resume={tmp_path / 'archive.ckpt'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: resume: ")
    assert (run_dir / "metrics.json").read_text() == "{}\n"
    proc = run_cli(["adapter.r=0", f"hydra.run.dir={tmp_path / 'r0'}"], env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "adapter.r=0" in proc.stderr


def test_train_unwritable_output_directory(fast_cfg, tmp_path, monkeypatch) -> None:
    from omegaconf import open_dict

    ro = tmp_path / "ro"
    ro.mkdir()
    cfg = fast_cfg()
    with open_dict(cfg):
        cfg.paths.output_dir = str(ro)
    _read_only(monkeypatch, ro)
    try:
        with pytest.raises(UserError, match="is not writable"):
            run(cfg)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_random_bytes_in_a_pt_lora_are_damaged_not_code(files, capsys, command) -> None:
    """Bytes that do not parse as a pickle are a damaged file; only a parsable pickle that imports code is refused
    as code (tests/test_reliability.py covers that one)."""
    d, _ = files
    junk = d / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 3)
    argv = ["inspect", junk] if command == "inspect" else [
        "merge", "--base", d / "base.safetensors", "--lora", junk, "--out", d / "m.safetensors"]
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "not a readable LoRA file" in err and "would run code" not in err, err
    assert not (d / "m.safetensors").exists()
