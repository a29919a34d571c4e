"""Real size, proven on CPU: every real preset, built at its released size from its config with random weights (no
download), takes one LoRA r=16 step on small inputs through ``LoRAAdaptationModule``: the loss is finite, every
``lora_B`` moved, no frozen weight changed. Builders, inputs and the frozen dtype (bf16 for the Qwen3-VL-2B shape)
are ``bench/real_size_bench.py``'s; its table in ``bench/results.md`` has the memory and step times (none asserted
here). Gradient checkpointing is on for the TRELLIS models, whose activations alone would take 8-16 GiB. Slow: about
4 minutes for all on 2 cores, 2 of them TRELLIS-L sparse structure (4096 tokens through a 24-block DiT)."""

from __future__ import annotations

import gc
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench"
PRESETS = ("clip_vit_b32", "sd15", "trellis_slat", "qwen3_vl_2b", "trellis_ss")


@pytest.fixture(scope="module")
def bench():
    """``bench/real_size_bench.py`` (and ``gpu_bench.py``, whose builders it extends) as modules."""
    sys.path.insert(0, str(BENCH))
    try:
        import real_size_bench

        yield real_size_bench
    finally:
        sys.path.remove(str(BENCH))


def digest(t: torch.Tensor) -> str:
    """Hash of a tensor's bytes: the frozen weights are compared without a second copy of the model in memory."""
    return hashlib.blake2b(t.detach().contiguous().view(torch.uint8).numpy(), digest_size=16).hexdigest()


def test_the_presets_are_the_bench_presets(bench) -> None:
    assert set(PRESETS) == set(bench.MODELS)


@pytest.mark.parametrize("model", PRESETS)
def test_one_lora_step_at_real_size(bench, model: str) -> None:
    gb = bench.gb
    torch.manual_seed(0)
    frozen_dtype = bench.frozen_dtypes(model)[0]
    head, batch, _ = gb.build(model, False, bench.BATCH[model], "cpu", frozen_dtype, bench.BUILDERS)
    params, _ = gb.parameter_counts(head)
    module = gb.prepare(head, "lora", checkpointing=model.startswith("trellis"))
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    assert sum(p.numel() for p in module.parameters()) == params + sum(p.numel() for p in trainable.values())
    lora_b = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}
    frozen = {n: digest(p) for n, p in module.named_parameters() if not p.requires_grad}
    assert {p.dtype for n, p in module.named_parameters() if not p.requires_grad and p.ndim == 2} == \
        {getattr(torch, frozen_dtype)}

    _, loss = gb.time_steps(head, module, batch, "cpu", bf16=False, warmup=0, steps=1)

    assert math.isfinite(loss)
    params_now = dict(module.named_parameters())
    unmoved = [n for n, before in lora_b.items() if torch.equal(params_now[n].detach(), before)]
    assert not unmoved, f"{len(unmoved)} of {len(lora_b)} lora_B did not move, e.g. {unmoved[:3]}"
    changed = [n for n, h in frozen.items() if digest(params_now[n]) != h]
    assert not changed, f"frozen weights changed: {changed[:5]}"
    del head, module, params_now, batch
    gc.collect()
