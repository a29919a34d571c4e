"""Hostile config values for ``python -m lightning_lora.train``: each one bad value, run through Hydra's real entry
point in this process, must stop with exit status 2 and one ``error:`` line naming the key and value, without a
traceback, before anything is written into the run directory but Hydra's own files (and, for the checks that need
the built base model, ``environment.json``), and without touching any file that existed before.

A row is ``_c(kind, id, overrides, needle)``; ``base`` names the run the bad value goes into (``bert``: the tiny BERT
with small settings, a ``tests/families.py`` row name, or ``none``). ``kind`` says what the same command did before
the config table (``config_checks.RULES``), as observed at commit 6739495: ``traceback`` (exit 1 and a traceback,
mostly after the run's files were written), ``silent`` (exit 0: trained with the bad value), ``late`` (one line,
exit 2, but after the run wrote files, or not naming the value), ``allocation`` (PEFT allocating r x side: 25 GB for
``adapter.r=100000000``; not rerun), ``guard`` (already one line before anything was written: kept so it stays so).
``<tmp>``, ``<ckpt>`` (a finished rank-8 run) and ``<pairs>`` (a small JSONL file) stand for the module's inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import FAST, write_pairs
from families import BY_NAME, RUN
from helpers import assert_one_error_line, file_bytes, train_main

pytestmark = pytest.mark.usefixtures("one_thread")

#: files a failed run may leave in its run directory: Hydra's (.hydra/, train.log) always; environment.json once the
#: run got past the config checks (the rank and resume checks need the built model)
HYDRA_FILES = ("train.log",)
AFTER_MODEL = ("environment.json",)


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    overrides: tuple[str, ...]
    needle: str
    kind: str = "traceback"
    after_model: bool = False  # the check runs once the base model is built


def _c(kind: str, id: str, overrides: str, needle: str | None = None, base: str = "bert",
       after_model: bool = False) -> Case:
    items = tuple(overrides.split(" "))
    return Case(id, base, items, needle if needle is not None else items[-1].lstrip("+"), kind, after_model)


CASES = [
    # ------------------------------------------------------------ optimizer
    _c("traceback", "lr negative", "optimizer.lr=-1"),
    _c("traceback", "lr word", "optimizer.lr=fast", "optimizer.lr='fast'"),
    _c("traceback", "lr nan", "optimizer.lr=nan"),
    _c("late", "lr inf", "optimizer.lr=inf"),
    _c("silent", "lr zero", "optimizer.lr=0"),
    _c("silent", "lr bool", "optimizer.lr=true", "optimizer.lr=True"),
    _c("traceback", "optimizer typo", "optimizer._target_=torch.optim.Adamm", "optimizer._target_='torch.optim.Adamm'"),
    _c("traceback", "optimizer not one", "optimizer._target_=torch.nn.Linear", "optimizer._target_='torch.nn.Linear'"),
    _c("traceback", "optimizer not partial", "optimizer._partial_=false", "optimizer._partial_=false"),
    _c("traceback", "optimizer unknown arg", "+optimizer.momentumm=0.9", "optimizer.momentumm is not an argument"),
    _c("traceback", "weight decay negative", "optimizer.weight_decay=-0.1"),
    _c("traceback", "weight decay nan", "optimizer.weight_decay=nan"),
    _c("traceback", "betas above one", "+optimizer.betas=[0.9,1.5]", "optimizer.betas[1]=1.5"),
    _c("traceback", "betas one value", "+optimizer.betas=[0.9]", "optimizer.betas=[0.9]"),
    _c("traceback", "eps negative", "+optimizer.eps=-1e-8", "optimizer.eps=-1e-08"),
    _c("traceback", "sgd momentum negative", "optimizer._target_=torch.optim.SGD +optimizer.momentum=-0.5"),
    # ------------------------------------------------------------ scheduler
    _c("guard", "schedule unknown", "scheduler.name=step", "scheduler.name='step'"),
    _c("guard", "warmup ratio above one", "scheduler.warmup_ratio=1.5"),
    _c("guard", "warmup ratio nan", "scheduler.warmup_ratio=nan"),
    _c("traceback", "warmup steps word", "scheduler.warmup_steps=abc", "scheduler.warmup_steps='abc'"),
    _c("guard", "warmup steps negative", "scheduler.warmup_steps=-3"),
    _c("guard", "min lr ratio above one", "scheduler.min_lr_ratio=2"),
    # ------------------------------------------------------------ data
    _c("late", "batch size zero", "data.batch_size=0"),
    _c("late", "batch size word", "data.batch_size=abc", "data.batch_size='abc'"),
    _c("late", "val batch size negative", "data.val_batch_size=-4"),
    _c("late", "workers negative", "data.num_workers=-1"),
    _c("late", "val fraction above one", "data.val_fraction=1.5"),
    _c("late", "max train samples zero", "data.max_train_samples=0"),
    _c("late", "max code lines zero", "data.max_code_lines=0"),
    _c("silent", "shuffle word", "data=pairs data.train_path=<pairs> data.shuffle=maybe", "data.shuffle='maybe'"),
    _c("late", "val path missing", "data=pairs data.train_path=<pairs> data.val_path=<tmp>/nope.jsonl",
       "data.val_path=<tmp>/nope.jsonl"),
    _c("late", "train dir missing", "model=sd_tiny data=image_folder data.train_dir=<tmp>/no_images",
       "data.train_dir=<tmp>/no_images", base="none"),
    _c("late", "roots missing", "model=trellis_slat_tiny data=trellis data.roots=<tmp>/no_root",
       "data.roots=<tmp>/no_root", base="none"),
    _c("late", "digits none", "model=sd_tiny data=digits data.num_images=0", "data.num_images=0", base="none"),
    _c("late", "shards per epoch zero", "model=lbm_tiny data=digits_pairs data.samples_per_epoch=0", base="none"),
    _c("late", "shuffle buffer negative", "model=sd_tiny data=webdataset data.train_shards=<tmp>/x.tar "
       "data.shuffle_buffer=-1", base="none"),
    # ------------------------------------------------------------ trainer
    _c("traceback", "max steps negative", "trainer.max_steps=-5"),
    _c("silent", "max steps zero", "trainer.max_steps=0"),
    _c("silent", "max epochs zero", "trainer.max_epochs=0"),
    _c("traceback", "accumulate zero", "trainer.accumulate_grad_batches=0"),
    _c("silent", "accumulate fraction", "trainer.accumulate_grad_batches=2.5"),
    _c("traceback", "precision unknown", "trainer.precision=17"),
    _c("traceback", "precision word", "trainer.precision=fp16", "trainer.precision='fp16'"),
    _c("traceback", "devices zero", "trainer.devices=0"),
    _c("traceback", "devices word", "trainer.devices=many", "trainer.devices='many'"),
    _c("traceback", "nodes zero", "trainer.num_nodes=0"),
    _c("traceback", "accelerator unknown", "trainer.accelerator=tpuu", "trainer.accelerator='tpuu'"),
    _c("traceback", "accelerator absent", "trainer.accelerator=mps", "trainer.accelerator='mps'"),
    _c("silent", "clip negative", "trainer.gradient_clip_val=-1"),
    _c("traceback", "clip nan", "trainer.gradient_clip_val=nan"),
    _c("traceback", "clip algorithm", "+trainer.gradient_clip_algorithm=max", "trainer.gradient_clip_algorithm='max'"),
    _c("traceback", "val interval zero", "+trainer.val_check_interval=0"),
    _c("traceback", "val interval word", "+trainer.val_check_interval=often", "trainer.val_check_interval='often'"),
    _c("traceback", "limit batches above one", "+trainer.limit_train_batches=1.5"),
    _c("silent", "log interval negative", "trainer.log_every_n_steps=-1"),
    _c("traceback", "val every zero epochs", "trainer.check_val_every_n_epoch=0"),
    _c("silent", "deterministic word", "trainer.deterministic=sometimes", "trainer.deterministic='sometimes'"),
    _c("traceback", "fast dev run negative", "+trainer.fast_dev_run=-1"),
    # ------------------------------------------------------------ seed and switches
    _c("traceback", "seed word", "seed=abc", "seed='abc'"),
    _c("traceback", "seed negative", "seed=-1"),
    _c("silent", "seed fraction", "seed=1.5"),
    _c("silent", "validate word", "validate_before=maybe", "validate_before='maybe'"),
    # ------------------------------------------------------------ an adapter larger than its layer (base built)
    _c("allocation", "rank huge bert", "adapter.r=100000000",
       "adapter.r=100000000 must be smaller than the layers it adapts: embedding.encoder layer "
       "'encoder.layer.0.attention.self.query' is Linear(32 -> 32); valid: r < 32 (the smallest side among them)",
       after_model=True),
    _c("silent", "rank equal to the side", "adapter.r=32", after_model=True),
    _c("silent", "rank per submodule", "+adapter.per_submodule={encoder:{r:64}}", "adapter.per_submodule.encoder.r=64",
       after_model=True),
    *[_c("allocation", f"rank huge {name}", "adapter.r=100000000", base=name, after_model=True)
      for name in ("clip_tiny", "qwen3_vl_tiny", "sd_tiny", "lbm_tiny", "trellis_ss_tiny", "trellis_slat_tiny",
                   "toy")],
    _c("allocation", "conv rank huge", "adapter.conv_rank=100000", "adapter.conv_rank=100000 must be smaller",
       base="sd_tiny", after_model=True),
    # ------------------------------------------------------------ resuming another run's checkpoint
    _c("traceback", "resume other rank", "resume=<ckpt> adapter.r=4",
       "resume=<ckpt> was trained with adapter.r=8, but this run has adapter.r=4"),
    _c("late", "resume dora", "resume=<ckpt> adapter.dora=true",
       "adapter.dora=false, but this run has adapter.dora=true"),
    _c("late", "resume other family", "resume=<ckpt> hydra.searchpath=[file://<toy>] model=toy data=toy",
       "resume=<ckpt> is a checkpoint of the embedding family, but this run's model is of the toy family", base="none"),
    _c("late", "resume fewer targets", "resume=<ckpt> adapter.targets=[query]",
       "the checkpoint trains layer embedder.encoder.encoder.layer.0.attention.self.key of embedding",
       after_model=True),
    _c("traceback", "resume other submodule rank", "resume=<ckpt> +adapter.per_submodule={encoder:{r:4}}",
       "layer embedder.encoder.encoder.layer.0.attention.self.query of embedding.encoder has rank 8 in the "
       "checkpoint and 4 in this run", after_model=True),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bert, cache_dir) -> dict[str, Path]:
    """A finished 2-step rank-8 run (its checkpoint is resumed) and a small pairs file, made once."""
    root = tmp_path_factory.mktemp("hostile_inputs")
    pairs = write_pairs(root / "pairs.jsonl", [{"query": f"q{i}", "positive": f"def f{i}(): ..."} for i in range(8)])
    run_dir = root / "r8"
    rc = train_main([f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", *FAST, "validate_before=false",
                     "validate_after=false", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
    assert rc == 0 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    return {"root": root, "ckpt": run_dir, "pairs": pairs}


def _base(case: Case, request: pytest.FixtureRequest) -> list[str]:
    cache = request.getfixturevalue("cache_dir")
    if case.base == "bert":
        return [f"model.pretrained={request.getfixturevalue('tiny_bert')}", f"paths.cache_dir={cache}", *FAST]
    if case.base == "none":
        return [f"paths.cache_dir={cache}"]
    row = BY_NAME[case.base]
    fixtures = {"cache_dir": cache, **{name: request.getfixturevalue(name) for name in row.fixtures}}
    return [*row.run_overrides(fixtures), *RUN]


def _filled(text: str, inputs: dict[str, Path], tmp: Path) -> str:
    toy = Path(__file__).resolve().parent / "toy_family" / "conf"
    for name, value in (("<tmp>", tmp), ("<ckpt>", inputs["ckpt"]), ("<pairs>", inputs["pairs"]), ("<toy>", toy)):
        text = text.replace(name, str(value))
    return text


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_one_bad_value_is_one_line(case: Case, inputs, tmp_path, request, capsys) -> None:
    if case.id == "accelerator absent" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    before = file_bytes(inputs["root"])
    run_dir = tmp_path / "run"
    overrides = [_filled(o, inputs, tmp_path) for o in case.overrides]
    rc = train_main([*_base(case, request), *overrides, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert_one_error_line(rc, err, _filled(case.needle, inputs, tmp_path), case=case.id)
    written = {name for name in file_bytes(run_dir) if not name.startswith(".hydra/") and name not in HYDRA_FILES}
    assert written <= (set(AFTER_MODEL) if case.after_model else set()), (case.id, written)
    assert file_bytes(inputs["root"]) == before, case.id


KINDS = ("traceback", "silent", "late", "allocation", "guard")


def test_the_matrix_counts() -> None:
    kinds = {kind: sum(case.kind == kind for case in CASES) for kind in KINDS}
    assert len(CASES) >= 45 and sum(kinds.values()) == len(CASES) and len({c.id for c in CASES}) == len(CASES)
    assert kinds == {"traceback": 34, "silent": 13, "late": 17, "allocation": 9, "guard": 5}, kinds


# ---------------------------------------------------------------------------- the same rules from Python
def test_python_callers_get_the_same_lines() -> None:
    from tiny import TinyHead

    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.errors import UserError
    from lightning_lora.module import LoRAAdaptationModule, ScheduleSpec

    with pytest.raises(UserError, match=r"^scheduler.warmup_steps='abc' must be a non-negative integer$"):
        ScheduleSpec(warmup_steps="abc")
    with pytest.raises(UserError, match=r"^adapter.r=16 must be smaller than the layers it adapts: tiny.denoiser "
                                        r"layer 'blocks.0.self_attn.to_qkv' is Linear\(16 -> 48\); valid: r < 16"):
        LoRAAdaptationModule(TinyHead(), AdapterSpec(r=16, targets=["to_qkv", "to_out"]))


def test_the_smaller_side_of_each_layer_kind() -> None:
    from peft import LoraConfig
    from torch import nn

    from lightning_lora.adapters import oversized_rank

    model = nn.ModuleDict({"lin": nn.Linear(8, 4), "conv": nn.Conv2d(2, 16, 3), "emb": nn.Embedding(100, 6)})
    found = oversized_rank(model, LoraConfig(r=6, target_modules=["lin", "conv", "emb"]))
    assert (found.layer, found.shape, found.rank, found.smallest) == ("lin", "Linear(8 -> 4)", 6, 4)
    found = oversized_rank(model, LoraConfig(r=3, target_modules=["conv", "emb"], rank_pattern={"conv": 18}))
    assert (found.layer, found.shape, found.patterned, found.smallest) == (
        "conv", "Conv2d(2 -> 16, kernel 3x3)", True, 16)  # the matrix is 16 x (2*3*3): its smaller side is 16
    assert oversized_rank(model, LoraConfig(r=5, target_modules=["conv", "emb"])) is None
    found = oversized_rank(model, LoraConfig(r=6, target_modules=["emb"]))
    assert (found.shape, found.smallest) == ("Embedding(100, 6)", 6)


@pytest.mark.parametrize(("devices", "needle"), [
    ([0, 1], "trainer.devices=[0, 1] asks for more cuda devices than this machine has (1)"),
    (2, "trainer.devices=2 asks for more cuda devices than this machine has (1)"),
    (0, "trainer.devices=0 must be auto, -1 (all), a number of devices >= 1 or a list"),
    ([0, 0], "trainer.devices=[0, 0] must be auto, -1 (all)"),
    ("0,x", "trainer.devices='0,x' must be auto"),
    (-1, None), ("0,", None), ([0], None), (1, None), ("auto", None),
])
def test_gpu_devices_on_a_one_gpu_machine(monkeypatch, devices, needle) -> None:
    """The GPU side of trainer.devices on a machine with one CUDA device (simulated: no GPU is needed)."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    from lightning_lora import config_checks
    from lightning_lora.errors import UserError

    monkeypatch.setattr(config_checks, "_accelerator_in_use", lambda trainer: "cuda")
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 1))
    if needle is None:
        config_checks.check_devices({"devices": devices, "accelerator": "auto"})
    else:
        with pytest.raises(UserError, match="^" + re.escape(needle)):
            config_checks.check_devices({"devices": devices, "accelerator": "auto"})
