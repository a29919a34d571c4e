"""The ``lightning-lora`` command, called in-process through ``main([...])`` (plus one real subprocess)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import Net, low_rank, net_pair, net_with
from safetensors.torch import load_file, save_file

from lightning_lora.adapters import load_lora_weights
from lightning_lora.cli import main

REPO = Path(__file__).resolve().parents[1]

# one intra-op thread: on a busy 2-core machine torch's multi-threaded SVD can be 100x slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pair(tmp_path):
    base, tuned = net_pair()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path, base, tuned


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _extract(capsys, d: Path, *extra, out: str = "lora.safetensors") -> Path:
    rc, stdout, err = run(capsys, "extract", "--base", d / "base.safetensors", "--tuned", d / "tuned.safetensors",
                          "--out", d / out, *extra)
    assert rc == 0, err
    assert "extracted 3 modules" in stdout
    return d / out


def test_extract_full_rank_then_merge_gives_tuned(pair, capsys):
    d, base, tuned = pair
    lora = _extract(capsys, d, "--rank", "full")
    rc, _, err = run(capsys, "merge", "--base", d / "base.safetensors", "--lora", lora, "--out", d / "m.safetensors")
    assert rc == 0, err
    merged = load_file(d / "m.safetensors")
    assert set(merged) == set(base)
    for k in base:
        want = tuned[k] if k != "norm.weight" else base[k]  # 1-D weights are not LoRA targets
        assert torch.allclose(merged[k], want, atol=1e-5), k


def test_extract_low_rank_loads_and_reproduces_outputs(pair, capsys):
    d, base, tuned = pair
    lora = _extract(capsys, d, "--rank", "6", "--conv-rank", "4", "--format", "peft")
    tuned["norm.weight"] = base["norm.weight"]
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        want = net_with(tuned)(x)
        for path in (lora, d / "lora_peft"):
            assert torch.allclose(load_lora_weights(net_with(base), path)(x), want, atol=1e-5)
    rc, out, _ = run(capsys, "inspect", lora)
    assert rc == 0
    assert "format: lightning_lora single file" in out
    assert "r=3 alpha=3: 1 module" in out and "r=4 alpha=4: 1 module" in out and "r=6 alpha=6: 1 module" in out
    assert "modules: 3" in out and "parameters: 761" in out  # 3·(3+16) + 4·(16·9+8) + 6·(8+8)
    assert "base=base.safetensors" in out and "tuned=tuned.safetensors" in out
    rc, out, _ = run(capsys, "inspect", d / "lora_peft")
    assert rc == 0 and "format: PEFT directory" in out and "modules: 3" in out


def test_randomized_and_module_filter(pair, capsys):
    d, _, _ = pair
    rc, out, err = run(capsys, "extract", "--base", d / "base.safetensors", "--tuned", d / "tuned.safetensors",
                       "--out", d / "c.safetensors", "--modules", "*conv*", "--method", "randomized", "--rank", "2")
    assert rc == 0, err
    assert "extracted 1 modules" in out
    from lightning_lora.adapters.formats import read_lora

    assert list(read_lora(d / "c.safetensors").modules) == ["block.conv"]


def test_validate_reports_errors_and_layer_names(pair, capsys):
    d, _, _ = pair
    lora = _extract(capsys, d, "--rank", "2", "--conv-rank", "2")  # conv delta has rank 3: not exact
    rc, out, err = run(capsys, "validate", "--base", d / "base.safetensors", "--tuned", d / "tuned.safetensors",
                       "--lora", lora, "--report", d / "r.csv", "--threshold", "0.05")
    assert rc == 0, err
    with open(d / "r.csv") as f:
        rows = {r["module"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"proj", "block.conv", "block.pw"}
    assert float(rows["proj"]["rel_error"]) < 1e-5 and float(rows["block.pw"]["rel_error"]) < 1e-5
    conv_err = float(rows["block.conv"]["rel_error"])
    assert 0.05 < conv_err < 1 and rows["block.conv"]["ok"] == "0"
    assert float(rows["block.conv"]["energy_retained"]) == pytest.approx(1 - conv_err**2, rel=1e-3)
    assert "success rate 2/3" in out and "block.conv" in out.split("worst modules:")[1].splitlines()[1]
    assert (d / "lora_layers.txt").read_text().split() == ["block.conv", "block.pw", "proj"]


def test_combine_concat_equals_applying_both(pair, capsys):
    d, _, _ = pair
    a = _extract(capsys, d, "--rank", "2", out="a.safetensors")
    b = _extract(capsys, d, "--rank", "3", "--format", "kohya", out="b.safetensors")
    rc, out, err = run(capsys, "combine", f"{a}:0.5", f"{d / 'b.kohya.safetensors'}:-1.25", "--out",
                       d / "c.safetensors")
    assert rc == 0, err
    assert "into 3 modules" in out
    base = d / "base.safetensors"
    assert run(capsys, "merge", "--base", base, "--lora", f"{a}:0.5", "--lora", f"{b}:-1.25",
               "--out", d / "m2.safetensors")[0] == 0
    assert run(capsys, "merge", "--base", base, "--lora", d / "c.safetensors", "--out", d / "m1.safetensors")[0] == 0
    m1, m2, b0 = load_file(d / "m1.safetensors"), load_file(d / "m2.safetensors"), load_file(base)
    for k in m1:
        assert torch.allclose(m1[k], m2[k], atol=1e-5), k
    assert not torch.allclose(m1["block.conv.weight"], b0["block.conv.weight"])
    rc, out, _ = run(capsys, "combine", a, b, "--out", d / "s.safetensors", "--method", "svd", "--rank", "2")
    assert rc == 0 and "r=2 x3" in out


def test_torch_checkpoint_and_folder_and_trellis_pair(tmp_path, capsys):
    base, tuned = net_pair()
    torch.save({"state_dict": base, "epoch": 3}, tmp_path / "base.ckpt")
    torch.save(tuned, tmp_path / "tuned.pt")
    lora = tmp_path / "l.safetensors"
    rc, _, err = run(capsys, "extract", "--base", tmp_path / "base.ckpt", "--tuned", tmp_path / "tuned.pt",
                     "--out", lora, "--rank", "full")
    assert rc == 0, err
    rc, _, err = run(capsys, "merge", "--base", tmp_path / "base.ckpt", "--lora", lora, "--out", tmp_path / "m.pt")
    assert rc == 0, err
    whole = torch.load(tmp_path / "m.pt", weights_only=True)
    assert whole["epoch"] == 3  # the Lightning-style wrapper is kept
    merged = whole["state_dict"]
    assert set(merged) == set(base) and torch.allclose(merged["block.conv.weight"], tuned["block.conv.weight"],
                                                       atol=1e-5)
    # diffusers-style folders: keys get the sub-folder prefix; the merged folder keeps the layout
    for name, state in (("b", base), ("t", tuned)):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "text_encoder").mkdir()
        save_file(state, tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")
        save_file({"emb.weight": torch.ones(4, 4)}, tmp_path / name / "text_encoder" / "model.safetensors")
        (tmp_path / name / "model_index.json").write_text("{}")
    rc, _, err = run(capsys, "extract", "--base", tmp_path / "b", "--tuned", tmp_path / "t", "--out",
                     tmp_path / "f.safetensors", "--rank", "full", "--format", "diffusers")
    assert rc == 0, err
    keys = load_file(tmp_path / "f.diffusers.safetensors")
    assert "unet.block.conv.lora_A.weight" in keys and len(keys) == 6
    rc, _, err = run(capsys, "merge", "--base", tmp_path / "b", "--lora", tmp_path / "f.diffusers.safetensors",
                     "--out", tmp_path / "merged")
    assert rc == 0, err
    assert (tmp_path / "merged" / "model_index.json").is_file()
    m = load_file(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.allclose(m["proj.weight"], tuned["proj.weight"], atol=1e-5)
    # TRELLIS pair: name the .json, the .safetensors beside it is read
    save_file(base, tmp_path / "ss_flow.safetensors")
    (tmp_path / "ss_flow.json").write_text(json.dumps({"name": "x"}))
    rc, _, err = run(capsys, "merge", "--base", tmp_path / "ss_flow.json", "--lora", lora, "--out",
                     tmp_path / "out" / "ss_flow.safetensors")
    assert rc == 0, err
    assert (tmp_path / "out" / "ss_flow.json").is_file()


# ---------------------------------------------------------------------------- bad input
def _bad_inputs(d: Path, monkeypatch) -> dict[str, tuple[list, str]]:
    base, tuned = net_pair()
    extra = dict(tuned, **{"extra.weight": torch.zeros(2, 2)})
    save_file(extra, d / "extra.safetensors")
    reshaped = dict(tuned, **{"proj.weight": torch.zeros(16, 4)})
    save_file(reshaped, d / "reshaped.safetensors")
    (d / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    torch.save({"state_dict": base, "obj": Net()}, d / "pickled.ckpt")
    other = {"proj.weight": torch.zeros(16, 7), "proj.bias": torch.zeros(16)}
    save_file(other, d / "other_base.safetensors")
    (d / "exists.safetensors").write_bytes(b"")
    save_file({"base_model.model.proj.lora_A.weight": torch.ones(2, 3), "base_model.model.proj.lora_B.weight":
               torch.ones(16, 2), "base_model.model.norm.modules_to_save.default.weight": torch.ones(8)},
              d / "mts.safetensors")
    b, t, lora = str(d / "base.safetensors"), str(d / "tuned.safetensors"), str(d / "lora.safetensors")
    ex = ["extract", "--base", b, "--out", str(d / "new.safetensors")]
    return {
        "keys": ([*ex, "--tuned", str(d / "extra.safetensors")], "different keys: 1 only in tuned, e.g. extra.weight"),
        "shapes": ([*ex, "--tuned", str(d / "reshaped.safetensors")], "proj.weight [16, 3] vs [16, 4]"),
        "rank0": ([*ex, "--tuned", t, "--rank", "0"], "--rank=0"),
        "rank_text": ([*ex, "--tuned", t, "--rank", "big"], "--rank='big'"),
        "conv_rank": ([*ex, "--tuned", t, "--conv-rank", "-2"], "--conv-rank=-2"),
        "junk": ([*ex, "--tuned", str(d / "junk.safetensors")], "neither a safetensors file nor a weights-only"),
        "pickle": (["extract", "--base", str(d / "pickled.ckpt"), "--tuned", t, "--out", str(d / "n.safetensors")],
                   "neither a safetensors file nor a weights-only torch file"),
        "exists": ([*ex[:-1], str(d / "exists.safetensors"), "--tuned", t], "exists; pass --overwrite"),
        "cuda": ([*ex, "--tuned", t, "--device", "cuda"], "CUDA is not available"),
        "other_base": (["merge", "--base", str(d / "other_base.safetensors"), "--lora", lora, "--out",
                        str(d / "m.safetensors")], "not a layer of the base"),
        "wrong_shape": (["merge", "--base", str(d / "reshaped.safetensors"), "--lora", lora, "--out",
                         str(d / "m.safetensors")], "module 'proj' makes a delta of shape [16, 3] but the base weight "
                                                    "'proj.weight' has shape [16, 4]"),
        "missing_lora": (["inspect", str(d / "nope.safetensors")], "not found"),
        "modules_to_save": (["merge", "--base", b, "--lora", str(d / "mts.safetensors"), "--out",
                             str(d / "m.safetensors")], "1 tensors that are not LoRA factors"),
        "junk_lora": (["inspect", str(d / "junk.safetensors")], "not a readable LoRA file"),
        "pickle_lora": (["merge", "--base", b, "--lora", str(d / "pickled.ckpt"), "--out", str(d / "m.safetensors")],
                        "refused: it holds pickled objects"),
        "missing_arg": (["extract", "--base", b], "the following arguments are required"),
        "svd_rank": (["combine", lora, "--out", str(d / "c.safetensors"), "--method", "svd", "--rank", "x"],
                     "--rank='x'"),
    }


BAD = ["keys", "shapes", "rank0", "rank_text", "conv_rank", "junk", "pickle", "exists", "cuda", "other_base",
       "wrong_shape", "missing_lora", "modules_to_save", "junk_lora", "pickle_lora", "missing_arg", "svd_rank"]


def test_bad_inputs_exit_2_with_one_line(pair, capsys, monkeypatch):
    d, _, _ = pair
    _extract(capsys, d, "--rank", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = _bad_inputs(d, monkeypatch)
    assert sorted(cases) == sorted(BAD)
    for name in BAD:
        argv, needle = cases[name]
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
    assert not (d / "new.safetensors").exists() and not (d / "m.safetensors").exists()


def test_overwrite_replaces_output(pair, capsys):
    d, _, _ = pair
    out = d / "o.safetensors"
    out.write_bytes(b"old")
    rc, _, err = run(capsys, "extract", "--base", d / "base.safetensors", "--tuned", d / "tuned.safetensors",
                     "--out", out, "--overwrite")
    assert rc == 0, err
    assert load_file(out)  # a real safetensors file now


def test_inspect_as_a_subprocess(pair, capsys):
    d, _, _ = pair
    lora = _extract(capsys, d, "--rank", "4", "--conv-rank", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lightning_lora.cli", "inspect", str(lora)], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "r=4 alpha=4: 2 modules" in proc.stdout and "r=3 alpha=3: 1 module" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_low_rank_file_for_real_delta(tmp_path, capsys):
    """The 3x3 conv delta here has rank 3; rank 3 reproduces it, rank 1 does not (error named in the output)."""
    base, tuned = net_pair()
    tuned["block.conv.weight"] = base["block.conv.weight"] + low_rank((8, 16, 3, 3), 3, 9)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    rc, out, _ = run(capsys, "extract", "--base", tmp_path / "base.safetensors", "--tuned",
                     tmp_path / "tuned.safetensors", "--out", tmp_path / "x.safetensors", "--conv-rank", "1")
    assert rc == 0
    worst = float(out.split("worst ")[1].split()[0])
    assert 0.05 < worst < 1 and "(block.conv)" in out


def test_inspect_and_merge_files_from_save_lora_weights(tmp_path, capsys):
    """Files written by the training side (save_lora_weights / save_adapter_file) work with the CLI."""
    import copy

    from tiny import TinyDenoiser

    from lightning_lora.adapters import apply_lora_to_model, merge_lora_weights, save_adapter_file, save_lora_weights

    torch.manual_seed(0)
    plain = TinyDenoiser().eval()
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "base.safetensors")
    save_file({f"denoiser.{k}": v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "head.safetensors")
    peft_model = apply_lora_to_model(copy.deepcopy(plain), r=4, lora_alpha=8, init="random")
    save_lora_weights(peft_model, tmp_path / "a.safetensors")
    save_adapter_file(tmp_path / "h.safetensors", {"denoiser": peft_model}, family="tiny")
    rc, out, err = run(capsys, "inspect", tmp_path / "a.safetensors")
    assert rc == 0, err
    assert "r=4 alpha=8: 10 modules" in out and "to_qkv x2" in out
    rc, out, err = run(capsys, "inspect", tmp_path / "h.safetensors")
    assert rc == 0 and "family: tiny" in out and "modules: 10" in out
    want = merge_lora_weights(peft_model, 0.5).state_dict()
    # the head's file (keys denoiser.<module>) also merges into a denoiser-only checkpoint
    for lora, base, prefix in (("a", "base", ""), ("h", "head", "denoiser."), ("h", "base", "")):
        rc, _, err = run(capsys, "merge", "--base", tmp_path / f"{base}.safetensors", "--lora",
                         f"{tmp_path / lora}.safetensors:0.5", "--out", tmp_path / f"m_{lora}{base}.safetensors")
        assert rc == 0, err
        merged = load_file(tmp_path / f"m_{lora}{base}.safetensors")
        for k, v in want.items():
            assert torch.allclose(merged[prefix + k], v, atol=1e-6), k
        assert not torch.allclose(merged[prefix + "blocks.0.self_attn.to_qkv.weight"],
                                  plain.state_dict()["blocks.0.self_attn.to_qkv.weight"])


def test_family_commands_come_from_the_heads_and_only_when_asked_for() -> None:
    """``encode-cond`` is the TRELLIS head's (``TaskHead.commands``); a generic tool never imports a head."""
    from lightning_lora.cli import asks_for_a_head_command, build_parser, head_commands

    assert [c.name for c in head_commands()] == ["encode-cond"]
    assert "encode-cond" in build_parser().format_help()
    assert "encode-cond" not in build_parser(heads=False).format_help()
    assert asks_for_a_head_command(["encode-cond", "root"]) and asks_for_a_head_command(["sample", "sd"])
    assert asks_for_a_head_command(["--help"]) and not asks_for_a_head_command(["--debug", "inspect", "x"])
    code = ("import sys; from lightning_lora import cli; "
            "cli.build_parser(heads=cli.asks_for_a_head_command(['inspect', 'x.safetensors'])); "
            "print(sorted(m for m in sys.modules if m.startswith('lightning_lora.heads')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
