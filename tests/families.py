"""The family matrix: every tiny preset once, as PEFT's tests list their model cases (tests/testing_common.py).

A row is a ``FamilyCase``; ``test_families.py`` runs the shared checks over every row, ``test_strategies.py`` and
``test_reliability.py`` take their family rows from here too. A row names the preset's Hydra overrides, the data
preset a short training run uses, one batch for the head's own ``training_step``, and a probe: a deterministic
forward (eval mode, no dropout, fixed inputs) of every submodule the preset adapts, whose outputs the checks
compare. Builders take a dict of the pytest fixtures the row names in ``fixtures`` (``case_fixtures``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TEXT_BATCH, image_batches, image_text_batch, pairs, random_coords

Fixtures = Mapping[str, Any]
TOY_CONF = Path(__file__).resolve().parent / "toy_family" / "conf"

# A training run of 2 steps through run(cfg) / the CLI: no validation, no previews, one adapter snapshot (final)
# and one resumable checkpoint (step 2), in fp32.
RUN = ("trainer.max_steps=2", "trainer.log_every_n_steps=1", "validate_before=false", "validate_after=false",
       "callbacks.adapter_checkpoint.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=2",
       "~callbacks.progress_bar", "~callbacks.sample_previews", "trainer.precision=32-true")


@dataclass(frozen=True)
class FamilyCase:
    name: str  # the row's id: the model preset (the tiny BERT stands for MiniLM)
    family: str  # the head's family: embedding | diffusion | flow3d | toy
    overrides: Callable[[Fixtures], list[str]]  # compose the preset: what every check builds its head from
    data: tuple[str, ...]  # the data preset at a small size, for the checks that train through run(cfg) / the CLI
    batch: Callable[[Fixtures], Any]  # one batch for the head's own training_step (and the probe's inputs)
    probe: Callable[[Any, Any], tuple[torch.Tensor, ...]]  # (head, batch) -> outputs of the adapted submodules
    adapted: tuple[str, ...]  # the submodules the preset puts LoRA into (one PEFT directory each per snapshot)
    fixtures: tuple[str, ...] = ()  # the pytest fixtures the builders read, besides cache_dir
    slow: bool = False  # every check of the row is slow
    slow_ddp: bool = False  # its 2-process DDP check is slow

    def compose(self, fixtures: Fixtures, *extra: str):
        """The row's composed config (cache under the session's cache_dir) with ``extra`` overrides."""
        from conftest import compose_train

        return compose_train([*self.overrides(fixtures), f"paths.cache_dir={fixtures['cache_dir']}", *extra])

    def run_overrides(self, fixtures: Fixtures) -> list[str]:
        """The overrides of a short training run of this row (preset, data, cache dir), without RUN."""
        return [*self.overrides(fixtures), *self.data, f"paths.cache_dir={fixtures['cache_dir']}"]


def case_fixtures(case: FamilyCase, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The fixtures a row's builders read (``request.getfixturevalue``), plus cache_dir."""
    return {name: request.getfixturevalue(name) for name in ("cache_dir", *case.fixtures)}


# ---------------------------------------------------------------------------- batches and probes
def _ss_batch(_: Fixtures) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x0": torch.randn(2, 8, 16, 16, 16, generator=g), "cond": torch.randn(2, 8, 64, generator=g)}


def _slat_batch(_: Fixtures) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    coords = random_coords(2, 32, 40)
    return {"coords": coords, "feats": torch.randn(coords.shape[0], 8, generator=g),
            "cond": torch.randn(2, 8, 64, generator=g)}


def _embedding_probe(head, batch) -> tuple[torch.Tensor, ...]:
    return head.embed(list(batch["query"]), "query"), head.embed(list(batch["positive"]), "document")


def _sd_probe(head, batch) -> tuple[torch.Tensor, ...]:
    hidden = head.text_encoder(head.tokenize(batch["text"][:2]))[0]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    return hidden, head.unet(x, torch.tensor([10, 700]), hidden).sample


def _sdxl_probe(head, batch) -> tuple[torch.Tensor, ...]:
    hidden, pooled = head._encode_uncached(batch["text"][:2])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    pred = head.unet(x, torch.tensor([10, 700]), hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
    return hidden, pooled, pred.sample


def _lbm_probe(head, _batch) -> tuple[torch.Tensor, ...]:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    return (head.denoiser(x, torch.tensor([250.0, 1000.0]), encoder_hidden_states=None).sample,)


def _ss_probe(head, batch) -> tuple[torch.Tensor, ...]:
    return (head.denoiser(batch["x0"], torch.tensor([300.0, 800.0]), batch["cond"]),)


def _slat_probe(head, batch) -> tuple[torch.Tensor, ...]:
    from lightning_lora.models.trellis import SparseTensor

    x = SparseTensor(batch["coords"], batch["feats"], batch_size=2)
    return (head.denoiser(x, torch.tensor([300.0, 800.0]), batch["cond"]).feats,)


def _toy_batch(_: Fixtures) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(8, 16, generator=g), "y": torch.randn(8, 16, generator=g)}


def _bert(f: Fixtures) -> list[str]:
    return ["model=minilm", f"model.pretrained={f['tiny_bert']}", "model.query_max_length=16",
            "model.doc_max_length=16"]


# ---------------------------------------------------------------------------- the rows
CASES = (
    FamilyCase("bert", "embedding", _bert,
               ("data.batch_size=8", "data.val_batch_size=16", "data.max_train_samples=64",
                "data.max_val_samples=32"),
               lambda _: TEXT_BATCH, _embedding_probe, ("encoder",), fixtures=("tiny_bert",)),
    FamilyCase("clip_tiny", "embedding", lambda _: ["model=clip_tiny", "model.vision=true"],
               ("data=digits_retrieval", "data.num_images=48", "data.batch_size=8"),
               lambda f: image_text_batch(f["pictures"]), _embedding_probe, ("text", "vision"),
               fixtures=("pictures",)),
    FamilyCase("qwen3_vl_tiny", "embedding", lambda _: ["model=qwen3_vl_tiny", "model.vision=true"],
               ("data=digits_retrieval", "data.num_images=48", "data.batch_size=8"),
               lambda f: image_text_batch(f["pictures"]), _embedding_probe, ("language", "vision"),
               fixtures=("pictures",), slow_ddp=True),  # DDP with a vision tower: clip_tiny's row runs it by default
    FamilyCase("sd_tiny", "diffusion", lambda _: ["model=sd_tiny"],
               ("data=digits", "data.num_images=40", "data.batch_size=4"),
               lambda _: next(iter(image_batches(n=4, batch_size=4))), _sd_probe, ("unet",),
               slow_ddp=True),  # DDP over a latent-diffusion head: lbm_tiny's row runs it by default
    # SDXL (two text encoders, size/crop conditioning): every check slow, sd_tiny's row covers the SD head by default.
    # LoRA on the second encoder only: SDXL reads the first one's penultimate layer, so its last layer's LoRA never
    # gets a gradient (tests/test_sdxl.py trains both)
    FamilyCase("sdxl_tiny", "diffusion", lambda _: ["model=sdxl_tiny", "model.train_text_encoder_2=true"],
               ("data=digits", "data.num_images=40", "data.batch_size=4"),
               lambda _: next(iter(image_batches(n=4, batch_size=4))), _sdxl_probe, ("unet", "text_encoder_2"),
               slow=True, slow_ddp=True),
    # webdataset shards: DDP needs samples_per_epoch (each process streams its share)
    FamilyCase("lbm_tiny", "diffusion", lambda _: ["model=lbm_tiny"],
               ("data=digits_pairs", "data.num_images=40", "data.batch_size=4", "data.samples_per_epoch=32"),
               lambda _: pairs(n=4), _lbm_probe, ("denoiser",)),
    FamilyCase("trellis_ss_tiny", "flow3d", lambda _: ["model=trellis_ss_tiny"],
               ("data=trellis_demo", "data.kind=ss", "data.num_shapes=24", "data.batch_size=2"),
               _ss_batch, _ss_probe, ("denoiser",), slow_ddp=True),
    FamilyCase("trellis_slat_tiny", "flow3d", lambda _: ["model=trellis_slat_tiny"],
               ("data=trellis_demo", "data.kind=slat", "data.num_shapes=24", "data.batch_size=2"),
               _slat_batch, _slat_probe, ("denoiser",)),
    # the toy fourth family of tests/toy_family (docs/adding-a-family.md): its presets come from its own conf/
    FamilyCase("toy", "toy", lambda _: [f"hydra.searchpath=[file://{TOY_CONF}]", "model=toy"], ("data=toy",),
               _toy_batch, lambda head, batch: (head.model(batch["x"]),), ("model",), slow_ddp=True),
)
BY_NAME = {case.name: case for case in CASES}


def params(slow: Callable[[FamilyCase], bool] = lambda case: case.slow,
           where: Callable[[FamilyCase], bool] = lambda case: True) -> list[Any]:
    """The rows (those ``where`` keeps) as pytest params (id = the row's name), marked slow where ``slow`` says."""
    return [pytest.param(case, id=case.name, marks=[pytest.mark.slow] if slow(case) else [])
            for case in CASES if where(case)]
