"""Seed 001 (the LBM LoRA system's README) run against this project, on the tiny LBM.

The seed's shell blocks are below as the seed writes them, run in a directory laid out as the seed's
(``examples/inference/ckpts/relighting/`` = the fine-tuned LBM folder, ``lora/exact_base.ckpt`` and
``lora/checkpoints/exact_base.ckpt`` = the base as one file). Only the program is mapped to ours (``PROGRAMS``):
``python lora/extract_lora_native.py`` -> ``lightning-lora extract``, ``python lora/inference_native.py`` ->
``lightning-lora sample lbm``, ``python lora/test_reconstruction_simple.py`` (which takes no arguments: its inputs
are written in the script) -> ``lightning-lora validate`` with those inputs spelt out. Every flag is the seed's.

``exact_base.ckpt`` is what the scripts' ``create_exact_base_model.py`` saves (yonderwonder-ai/LBM_lora, the seed's
repository): ``torch.save({"model_state_dict": <the LBM model's state dict without LPIPS>, "config": ...,
"source_config": <the LBM config.yaml it was built from>, ...})``, beside ``exact_base.safetensors`` (the same
tensors). A Lightning training checkpoint of LBM (``{"state_dict": {"model.<key>": ...}}``) is taken as well.
"""

from __future__ import annotations

import io
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_one_error_line
from PIL import Image
from safetensors.torch import load_file, save_file

from lightning_lora.cli import main
from lightning_lora.models.lbm import WEIGHTS_FILE
from lightning_lora.models.lbm_tiny import ensure_tiny_lbm, optimal_error, write_tuned_copy

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

DECAY = 0.8  # singular values of every known delta: 1, 0.8, 0.64, ... (write_tuned_copy)

# --------------------------------------------------------------------------- the seed's blocks (trailing spaces cut)
SEED_EXTRACT = r'''
# Extract LoRA
python lora/extract_lora_native.py \
  --base_model_path "lora/exact_base.ckpt" \
  --tuned_model_path "examples/inference/ckpts/relighting/model.safetensors" \
  --save_to "lora/checkpoints/my_lora.safetensors" \
  --rank 32 --conv_rank 16 \ # low rank - efficient but can use heigher rank as well
  --verbose
'''
SEED_VALIDATE = "python lora/test_reconstruction_simple.py"
SEED_INFERENCE = r'''
python lora/inference_native.py \
  --base_model_path "lora/checkpoints/exact_base.ckpt" \
  --lora_path "lora/checkpoints/my_lora.safetensors" \
  --source_image "examples/inference/ckpts/relighting/assets/source_image.jpg" \
  --output_path "lora/assets/output.jpg" \
  --lora_scale 1.0 \
  --verbose
'''
# "Production Usage": without paths these fail in the seed's own script too (--tuned_model_path and --save_to are
# required there); run here with the Quick Start's
SEED_FULL_RANK = "python lora/extract_lora_native.py --rank 9999 --conv_rank 9999"
SEED_DEPLOY = "python lora/extract_lora_native.py --rank 64 --conv_rank 32"  # "For Deployment (Recommended)"
QUICK_START_PATHS = ("--base_model_path lora/exact_base.ckpt --tuned_model_path examples/inference/ckpts/relighting/"
                     "model.safetensors --save_to lora/checkpoints/full.safetensors")

TUNED = "examples/inference/ckpts/relighting/model.safetensors"
PROGRAMS = {
    "python lora/extract_lora_native.py": ["extract"],
    "python lora/inference_native.py": ["sample", "lbm"],
    # the script's own inputs (the Quick Start's files), spelt out with the seed's flag names
    "python lora/test_reconstruction_simple.py": [
        "validate", "--base_model_path", "lora/exact_base.ckpt", "--tuned_model_path", TUNED,
        "--lora_path", "lora/checkpoints/my_lora.safetensors"],
}
SOURCE_SIZE = (20, 24)  # width, height of the seed's source_image.jpg here (multiples of the tiny VAE's factor 2)


def seed_argv(block: str, extra: str = "") -> list[str]:
    """The argv a shell block means: comments dropped (also the seed's ``\\ # ...`` after a line's continuation,
    which as literally typed would pass a lone space and run ``--verbose`` as a second command), continuations
    joined, the program mapped to ours."""
    lines = [re.sub(r"\s#.*$", "", line).rstrip() for line in block.strip().splitlines()
             if not line.lstrip().startswith("#")]
    text = " ".join(line.removesuffix("\\").strip() for line in lines if line)
    program = next(p for p in PROGRAMS if text.startswith(p))
    return [*PROGRAMS[program], *shlex.split(text[len(program):] + " " + extra)]


# --------------------------------------------------------------------------- the seed's directory, tiny
def write_exact_base(folder: Path, path: Path) -> None:
    """The base as the scripts' step 0 saves it: the tensors under ``model_state_dict`` with the config it came
    from (here the tiny model's, whose architecture it describes) and the script's other entries, plus the
    ``.safetensors`` twin."""
    state = load_file(str(folder / WEIGHTS_FILE))
    config = yaml.safe_load((folder / "config.yaml").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": state, "config": {k: v for k, v in config.items() if not isinstance(v, dict)},
                "backbone_signature": "stabilityai/stable-diffusion-xl-base-1.0", "architecture": "LBM",
                "torch_dtype": "torch.float32", "source_config": config, "initialization": "exact_architecture_match",
                "created_from": "inference_config_initialization", "lpips_excluded": True,
                "note": "LPIPS can be loaded separately during training if needed"}, path)
    save_file(state, path.with_suffix(".safetensors"))


def write_lightning_ckpt(folder: Path, path: Path) -> None:
    """The base as LBM's training saves it: a Lightning checkpoint whose state_dict holds the model as ``model.``."""
    state = load_file(str(folder / WEIGHTS_FILE))
    torch.save({"epoch": 0, "global_step": 0, "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("seed001")
    base = Path(ensure_tiny_lbm(root / "base_folder"))
    sizes = write_tuned_copy(base, root / "examples/inference/ckpts/relighting", decay=DECAY)
    for where in ("lora/exact_base.ckpt", "lora/checkpoints/exact_base.ckpt"):
        write_exact_base(base, root / where)
    assets = root / "examples/inference/ckpts/relighting/assets"
    assets.mkdir()
    ramp = np.linspace(0, 255, SOURCE_SIZE[1] * SOURCE_SIZE[0] * 3).reshape(SOURCE_SIZE[1], SOURCE_SIZE[0], 3)
    Image.fromarray(ramp.astype(np.uint8)).save(assets / "source_image.jpg", quality=95)
    state = load_file(str(base / WEIGHTS_FILE))  # which changed weights are spatial convs (kernel > 1)
    kinds = {m: (k, state[f"denoiser.{m}.weight"].ndim == 4 and state[f"denoiser.{m}.weight"][0, 0].numel() > 1)
             for m, k in sizes.items()}
    return {"root": root, "base": base, "sizes": sizes, "kinds": kinds}


@pytest.fixture
def in_seed_dir(seed_dir, monkeypatch) -> dict:
    monkeypatch.chdir(seed_dir["root"])
    return seed_dir


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def expected_rank(shape: list[int], rank: int, conv_rank: int) -> int:
    return conv_rank if len(shape) == 4 and shape[2] * shape[3] > 1 else rank


def hand_bands(errors: list[float]) -> list[int]:
    """Counts per band, as the seed reads them: < 5%, 5-50%, 50-100%, > 100%."""
    return [sum(e < 0.05 for e in errors), sum(0.05 <= e < 0.5 for e in errors),
            sum(0.5 <= e <= 1.0 for e in errors), sum(e > 1.0 for e in errors)]


def printed_bands(out: str) -> list[int]:
    return [int(n) for n in re.findall(r"^  (?:< 5%|5-50%|50-100%|> 100%): [^\n]*?: (\d+)$", out, re.M)]


# --------------------------------------------------------------------------- 1. extract, 2. validate
def test_seed_extract_then_validate(in_seed_dir, capsys):
    sizes, lora = in_seed_dir["sizes"], Path("lora/checkpoints/my_lora.safetensors")
    rc, out, err = run(seed_argv(SEED_EXTRACT), capsys)
    assert rc == 0, err
    assert lora.is_file()
    # --verbose: one line per extracted module, each at its known optimal error (rank 32, 16 for 3x3 convs)
    lines = re.findall(r"^  (denoiser\.\S+): rank (\d+), rel_error (\S+), energy \S+, shape (\[[^\]]*\])$", out, re.M)
    assert {name for name, *_ in lines} == {f"denoiser.{m}" for m in sizes}
    for name, rank, rel, shape in lines:
        k = sizes[name.removeprefix("denoiser.")]
        want = min(k, expected_rank(json.loads(shape), 32, 16))
        assert int(rank) == want
        assert float(rel) == pytest.approx(optimal_error(k, want, DECAY), abs=2e-4)

    rc, out, err = run(seed_argv(SEED_VALIDATE), capsys)
    assert rc == 0, err
    errors = [optimal_error(k, min(k, 32), DECAY) for k in sizes.values()]  # a 3x3 conv at 16: still < 5%
    assert printed_bands(out) == hand_bands(errors) == [len(sizes), 0, 0, 0]
    listed = Path("lora/checkpoints/lora_layer_names.txt").read_text().split()
    assert sorted(listed) == sorted(f"denoiser.{m}" for m in sizes)  # exactly the modules, one a line


@pytest.mark.parametrize(("rank", "scale", "band"), [(4, 1.0, 1), (1, 1.0, 2), (32, 3.0, 3)])
def test_validate_bands_count_hand_computed_errors(in_seed_dir, tmp_path, capsys, rank, scale, band):
    """Low ranks and an over-scaled LoRA land in the seed's other bands, each count as computed by hand."""
    sizes = in_seed_dir["sizes"]
    lora = tmp_path / "lora.safetensors"
    assert main(["extract", "--base_model_path", "lora/exact_base.ckpt", "--tuned_model_path", TUNED,
                 "--save_to", str(lora), "--rank", str(rank), "--conv_rank", str(rank)]) == 0
    if scale != 1.0:  # 3x the best rank-32 delta: error = |3 - 1| = 200% on every module
        assert main(["combine", f"{lora}:{scale}", "--out", str(tmp_path / "x3.safetensors")]) == 0
        lora = tmp_path / "x3.safetensors"
    capsys.readouterr()
    rc, out, err = run(["validate", "--base_model_path", "lora/exact_base.ckpt", "--tuned_model_path", TUNED,
                        "--lora_path", str(lora), "--verbose"], capsys)
    assert rc == 0, err
    errors = [math.hypot(optimal_error(k, min(k, rank), DECAY), (scale - 1) * math.sqrt(
        1 - optimal_error(k, min(k, rank), DECAY) ** 2)) for k in sizes.values()]
    counts = printed_bands(out)
    assert counts == hand_bands(errors) and counts[band] > 0 and sum(counts) == len(sizes)
    per_module = re.findall(r"^  denoiser\.\S+: rel_error (\S+) \(", out, re.M)  # --verbose
    assert sorted(float(e) for e in per_module) == pytest.approx(sorted(errors), abs=2e-4)
    assert (tmp_path / "lora_layer_names.txt").is_file() and (tmp_path / f"{lora.stem}_layers.txt").is_file()


def test_the_base_file_extracts_as_the_folder_does(in_seed_dir, tmp_path):
    """exact_base.ckpt, exact_base.safetensors, a Lightning checkpoint and the LBM folder give the same LoRA."""
    write_lightning_ckpt(in_seed_dir["base"], tmp_path / "last.ckpt")
    outs = {}
    for name, base in (("ckpt", "lora/exact_base.ckpt"), ("safetensors", "lora/exact_base.safetensors"),
                       ("lightning", str(tmp_path / "last.ckpt")), ("folder", str(in_seed_dir["base"]))):
        outs[name] = tmp_path / f"{name}.safetensors"
        assert main(["extract", "--base_model_path", base, "--tuned_model_path", TUNED,
                     "--save_to", str(outs[name]), "--rank", "8", "--conv_rank", "4"]) == 0
    loras = {k: load_file(str(v)) for k, v in outs.items()}
    assert len(loras["folder"]) == 2 * len(in_seed_dir["sizes"])
    for name in ("ckpt", "safetensors", "lightning"):
        assert loras[name].keys() == loras["folder"].keys()
        assert all(torch.equal(loras[name][k], v) for k, v in loras["folder"].items()), name


@pytest.mark.parametrize(("block", "rank", "conv_rank"), [(SEED_FULL_RANK, 9999, 9999), (SEED_DEPLOY, 64, 32)])
def test_seed_production_extractions(in_seed_dir, capsys, block, rank, conv_rank):
    """The "Production Usage" blocks (no paths in the seed: the Quick Start's added); 9999 keeps every singular
    value, 64/32 gives each module its hand-computed optimal error."""
    rc, out, err = run(seed_argv(block, QUICK_START_PATHS), capsys)
    assert rc == 0, err
    worst = float(re.search(r"relative error: mean \S+, worst (\S+)", out).group(1))
    lines = re.findall(r"^  (denoiser\.\S+): rank \d+, rel_error \S+, energy \S+, shape (\[[^\]]*\])$", out, re.M)
    assert not lines  # no --verbose in these blocks
    from safetensors import safe_open

    with safe_open("lora/checkpoints/full.safetensors", "pt") as f:
        modules = {k.rsplit(".lora_", 1)[0] for k in f.keys() if ".lora_" in k}  # noqa: SIM118
    assert len(modules) == len(in_seed_dir["sizes"])
    hand = max(optimal_error(k, min(k, conv_rank if k_is_conv else rank), DECAY)
               for k, k_is_conv in in_seed_dir["kinds"].values())
    assert worst == pytest.approx(hand, abs=1e-5)
    Path("lora/checkpoints/full.safetensors").unlink()


# --------------------------------------------------------------------------- 3. inference
def test_seed_inference_writes_a_jpg_equal_to_the_folder_base(in_seed_dir, tmp_path, capsys):
    lora = Path("lora/checkpoints/my_lora.safetensors")
    if not lora.is_file():  # this test alone: the seed's step 1 first
        assert main(seed_argv(SEED_EXTRACT)) == 0
    capsys.readouterr()
    out_jpg = Path("lora/assets/output.jpg")
    out_jpg.unlink(missing_ok=True)
    rc, out, err = run(seed_argv(SEED_INFERENCE), capsys)
    assert rc == 0, err
    picture = Image.open(out_jpg)
    assert picture.format == "JPEG" and picture.size == SOURCE_SIZE
    n = len(in_seed_dir["sizes"])
    assert len(re.findall(r"^  denoiser\.\S+: rank \d+, alpha \S+, scale 1, shape ", out, re.M)) == n  # --verbose
    assert f"{n} of {n} modules applied" in out
    # the same translation from the LBM folder as base, as PNG: the .ckpt is the same model
    ref = tmp_path / "ref.png"
    assert main(["sample", "lbm", "--pretrained", str(in_seed_dir["base"]), "--lora", str(lora),
                 "--source", "examples/inference/ckpts/relighting/assets/source_image.jpg", "--out", str(ref)]) == 0
    again = tmp_path / "again.png"
    assert main([*seed_argv(SEED_INFERENCE), "--out", str(again)]) == 0  # a later --out wins, as argparse does
    assert np.array_equal(np.asarray(Image.open(ref)), np.asarray(Image.open(again)))
    # the .jpg is that same picture as JPEG at quality 95 (a noisy tiny picture: JPEG itself moves it a lot)
    jpeg = io.BytesIO()
    Image.open(ref).save(jpeg, format="JPEG", quality=95)
    assert np.array_equal(np.asarray(picture), np.asarray(Image.open(jpeg)))
    webp = tmp_path / "output.webp"
    assert main([*seed_argv(SEED_INFERENCE), "--output_path", str(webp)]) == 0
    assert Image.open(webp).format == "WEBP" and Image.open(webp).size == SOURCE_SIZE


def test_unknown_picture_suffix_and_bad_base_file_are_one_line(in_seed_dir, tmp_path, capsys):
    argv = seed_argv(SEED_INFERENCE)
    rc, _, err = run([*argv, "--output_path", str(tmp_path / "out.gif")], capsys)
    assert_one_error_line(rc, err, "unknown picture suffix '.gif'; valid: .png, .jpg, .jpeg, .webp")
    assert not (tmp_path / "out.gif").exists()
    bad = tmp_path / "exact_base.ckpt"
    config = yaml.safe_load((in_seed_dir["base"] / "config.yaml").read_text())
    torch.save({"model_state_dict": {"something.weight": torch.zeros(2, 2)}, "source_config": config}, bad)
    rc, _, err = run([*argv, "--base_model_path", str(bad), "--output_path", str(tmp_path / "o.jpg")], capsys)
    assert_one_error_line(rc, err, "tensors belong to no LBM part, e.g. 'something.weight'")
    code = tmp_path / "code.ckpt"  # a pickle that would run code: refused unread (weights_only=True)
    torch.save({"model_state_dict": {}, "source_config": config, "hook": Path("x")}, code)
    rc, _, err = run([*argv, "--base_model_path", str(code), "--output_path", str(tmp_path / "c.jpg")], capsys)
    assert_one_error_line(rc, err, "not a weights-only torch file")


def test_the_scripts_other_flags_are_aliases():
    """The scripts' flags beyond the README's commands that mean one of ours (extract_lora_native.py's --min_diff,
    inference_native.py's --num_inference_steps), parsed into our options."""
    from lightning_lora.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["extract", "--base_model_path", "b", "--tuned_model_path", "t", "--save_to", "o",
                              "--conv_rank", "8", "--min_diff", "0.01", "--verbose"])
    assert (args.base, args.tuned, args.out, args.conv_rank, args.min_diff, args.verbose) == (
        "b", "t", "o", "8", 0.01, True)
    args = parser.parse_args(["sample", "lbm", "--base_model_path", "b", "--lora_path", "l", "--source_image", "s",
                              "--output_path", "o.jpg", "--lora_scale", "0.5", "--num_inference_steps", "3"])
    assert (args.pretrained, args.lora, args.source, args.out, args.scale, args.steps) == (
        "b", ["l"], "s", "o.jpg", 0.5, 3)


def test_band_edges_as_the_seed_reads_them():
    from lightning_lora.adapters.extract import QUALITY_BANDS, band_counts, quality_band

    edges = [0.0, 0.0499, 0.05, 0.4999, 0.5, 1.0, 1.0001, float("nan")]
    assert [QUALITY_BANDS.index(quality_band(e)) for e in edges] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(band_counts(edges).values()) == [2, 2, 2, 2]


# --------------------------------------------------------------------------- 4. fine-tuning an existing LoRA
# The seed's lora/lora_relight_config.yaml as it shows it (its closing "..." dropped); the test makes the shards
SEED_FINETUNE_CONFIG = '''
train_shards:
  - "test_dataset/train_single.tar"
validation_shards:
  - "test_dataset/val_single.tar"

# Path to the exact base model
base_model_path: "lora/checkpoints/exact_base.ckpt"

# Path to the pre-existing LoRA weights you want to fine-tune
lora_weights_path: "lora/checkpoints/my_lora.safetensors"

# Defines which of the injected LoRA modules should be trained.
# Add the names of layers you want to train into this list.
trainable_lora_modules:
  - "attn1"
  - "attn2"
  - "up_blocks"

# Training parameters
wandb_project: null
batch_size: 4
learning_rate: 0.0002
'''
#: the seed config's keys -> ours (README, "LBM LoRA scripts"); wandb_project: null means no wandb run
SEED_CONFIG_KEYS = {"train_shards": "data.train_shards", "validation_shards": "data.validation_shards",
                    "base_model_path": "model.pretrained", "lora_weights_path": "adapter.init_from",
                    "trainable_lora_modules": "adapter.trainable", "batch_size": "data.batch_size",
                    "learning_rate": "optimizer.lr"}


def seed_config_overrides(text: str) -> list[str]:
    """Hydra overrides for the seed's config: lists of shards joined with '::' (several patterns), other lists as
    lists."""
    overrides = []
    for key, value in yaml.safe_load(text).items():
        if key == "wandb_project":
            assert value is None  # the seed's value; a project name would need logger=wandb
            continue
        if isinstance(value, list):
            value = "::".join(value) if key.endswith("shards") else f"[{','.join(value)}]"
        overrides.append(f"{SEED_CONFIG_KEYS[key]}={value}")
    return overrides


def write_pair_shard(path: Path, n: int, seed: int) -> None:
    import tarfile

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for field in ("source", "target"):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{i:04d}.{field}.png")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))


def test_seed_finetune_config_trains_only_its_layers(in_seed_dir, tmp_path, capsys):
    """Step 4: the seed's config, key for key, fine-tunes the extracted LoRA on its base .ckpt; only the LoRA
    layers whose names hold attn1/attn2/up_blocks move, the others stay bit-identical."""
    from helpers import train_main

    from lightning_lora.adapters.io import read_adapter_file

    lora = Path("lora/checkpoints/my_lora.safetensors")
    if not lora.is_file():
        assert run(seed_argv(SEED_EXTRACT), capsys)[0] == 0
    write_pair_shard(Path("test_dataset/train_single.tar"), 8, 0)
    write_pair_shard(Path("test_dataset/val_single.tar"), 4, 1)
    rc = train_main(["model=lbm_tiny", "data=paired_shards", *seed_config_overrides(SEED_FINETUNE_CONFIG),
                     "trainer.max_steps=2", "trainer.precision=32-true", "scheduler.name=constant",
                     "scheduler.warmup_ratio=0.0", "~callbacks.progress_bar", "~callbacks.sample_previews",
                     "validate_before=false", "validate_after=false", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    _, states, _ = read_adapter_file(lora)
    start = {k.split("denoiser.", 1)[1]: v for k, v in states[""].items() if "lora_" in k}
    final = load_file(tmp_path / "run" / "adapters" / "final" / "denoiser" / "adapter_model.safetensors")
    final = {k.removeprefix("base_model.model."): v for k, v in final.items() if "lora_" in k}
    assert final.keys() == start.keys() and len(final) == 2 * len(in_seed_dir["sizes"])
    chosen = {k for k in final if any(p in k for p in ("attn1", "attn2", "up_blocks"))}
    assert 0 < len(chosen) < len(final)
    for key, value in final.items():
        assert torch.equal(value, start[key]) is (key not in chosen), key
