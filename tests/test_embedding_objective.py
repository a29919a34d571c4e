"""Embedding objective: hard negatives in every denominator, Matryoshka, learnable temperature, gradient cache
(same gradients as the plain step, dropout on), and 2-process gathered negatives equal to one process on the
global batch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TEXT_BATCH

from lightning_lora.errors import UserError
from lightning_lora.heads.embedding import EmbeddingHead, info_nce, matryoshka_info_nce
from lightning_lora.module import HEAD_PARAMETERS, LoRAAdaptationModule

BATCH = TEXT_BATCH  # six code-search rows, one hard negative each


def make_head(tiny_bert: Path, dropout: float = 0.0, **kw) -> EmbeddingHead:
    overrides = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return EmbeddingHead(str(tiny_bert), query_max_length=16, doc_max_length=16, config_overrides=overrides, **kw)


def make_module(head: EmbeddingHead, seed: int = 0, dropout: float = 0.0, dtype=torch.float32):
    torch.manual_seed(seed)
    module = LoRAAdaptationModule(head, {"r": 4, "alpha": 8, "init": "random", "dropout": dropout})
    head.to(dtype)
    return module


def grads_of(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- the loss, by hand
def test_hard_negatives_are_in_every_querys_denominator():
    g = torch.Generator().manual_seed(0)
    q, p, n = (F.normalize(torch.randn(k, 8, generator=g), dim=-1) for k in (3, 3, 2))
    loss = info_nce(q, torch.cat([p, n]), 0.1)
    by_hand = []
    for i in range(3):
        scores = torch.cat([q[i] @ p.T, q[i] @ n.T]) / 0.1  # all positives + all negatives
        by_hand.append(-(scores[i] - torch.logsumexp(scores, 0)))
    assert loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-6)


def test_matryoshka_at_one_dim_is_info_nce_on_truncated_embeddings():
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(4, 16, generator=g), torch.randn(6, 16, generator=g)
    plain = info_nce(F.normalize(q[:, :8], dim=-1), F.normalize(c[:, :8], dim=-1), 0.05)
    assert matryoshka_info_nce(q, c, 0.05, [8], [1.0]).item() == pytest.approx(plain.item(), rel=1e-6)
    both = matryoshka_info_nce(q, c, 0.05, [16, 8], [1.0, 0.5])
    full = info_nce(F.normalize(q, dim=-1), F.normalize(c, dim=-1), 0.05)
    assert both.item() == pytest.approx(full.item() + 0.5 * plain.item(), rel=1e-6)


def test_matryoshka_and_gradient_cache_values_are_checked(tiny_bert):
    with pytest.raises(UserError, match="mrl_weights=.* needs one weight per dim"):
        make_head(tiny_bert, mrl_dims=[32, 16], mrl_weights=[1.0])
    with pytest.raises(UserError, match="gradient_cache.chunk_size=0 must be a positive integer"):
        make_head(tiny_bert, gradient_cache={"chunk_size": 0})
    head = make_head(tiny_bert, mrl_dims=[64, 16])
    with pytest.raises(UserError, match="above the embedding size 32"):
        head.contrastive_loss(BATCH)


def test_validation_reports_every_matryoshka_dim(tiny_bert):
    head = make_head(tiny_bert, mrl_dims=[32, 16, 8])
    out = head.validation_step(BATCH)
    metrics = head.validation_metrics({k: v for k, v in out.items() if k != "loss"})
    assert {"recall@1", "dim16/recall@1", "dim8/mrr@10"} <= set(metrics)
    q, d = out["query_emb"], out["doc_emb"]
    top1 = (F.normalize(q[:, :8], dim=-1) @ F.normalize(d[:, :8], dim=-1).T).argmax(1)
    assert metrics["dim8/recall@1"] == pytest.approx((top1 == torch.arange(6)).float().mean().item())


def test_untrained_adapter_reproduces_the_base_exactly(tiny_bert):
    base = make_head(tiny_bert)
    with torch.no_grad():
        before = base.validation_step(BATCH)
    module = LoRAAdaptationModule(base, {"r": 4, "alpha": 8, "init": "kaiming"})  # B = 0
    module.eval()
    with torch.no_grad():
        after = base.validation_step(BATCH)
    assert torch.equal(before["query_emb"], after["query_emb"]) and torch.equal(before["doc_emb"], after["doc_emb"])


def test_learnable_temperature_trains_and_is_saved_with_the_adapter(tiny_bert, tmp_path):
    head = make_head(tiny_bert, learnable_temperature=True)
    module = make_module(head)
    assert head.log_temperature.requires_grad and "head.log_temperature" in module.trainable_names()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    head.training_step(BATCH).loss.backward()
    optimizer.step()
    assert head.temperature.item() != pytest.approx(0.05)
    module.save_adapters(tmp_path / "snap", step=1)
    assert (tmp_path / "snap" / HEAD_PARAMETERS).is_file()
    fresh = make_head(tiny_bert, learnable_temperature=True)
    make_module(fresh).load_adapters(tmp_path / "snap")
    assert fresh.temperature.item() == pytest.approx(head.temperature.item())


def test_modules_to_save_cannot_also_be_a_target(tiny_bert):
    with pytest.raises(UserError, match="modules_to_save names 'dense', which is also a LoRA target"):
        LoRAAdaptationModule(make_head(tiny_bert), {"r": 4, "modules_to_save": ["dense"]})


# ---------------------------------------------------------------------------- gradient cache
def test_gradient_cache_gives_the_plain_gradients_without_dropout(tiny_bert):
    results = []
    for chunk in (None, 2):
        head = make_head(tiny_bert, gradient_cache={"chunk_size": chunk} if chunk else None)
        module = make_module(head, dtype=torch.float64)
        loss = head.training_step(BATCH).loss
        loss.backward()
        results.append((loss.item(), grads_of(module)))
    (plain_loss, plain), (cached_loss, cached) = results
    assert cached_loss == pytest.approx(plain_loss, rel=1e-10)
    assert plain and all(torch.allclose(cached[k], plain[k], rtol=1e-8, atol=1e-12) for k in plain)


def test_gradient_cache_replays_dropout_exactly(tiny_bert):
    """With dropout on, the cached step equals a plain step that embeds the same chunks with a graph."""
    head = make_head(tiny_bert, dropout=0.1, gradient_cache={"chunk_size": 4})
    module = make_module(head, dropout=0.1, dtype=torch.float64)
    module.train()
    torch.manual_seed(7)
    head.training_step(BATCH).loss.backward()
    cached = grads_of(module)
    module.zero_grad()

    torch.manual_seed(7)  # the reference: same chunks, same RNG order, one big graph
    negatives = [t for row in BATCH["negatives"] for t in row]
    groups = [(BATCH["query"], "query"), (BATCH["positive"], "document"), (negatives, "document")]
    embs = [torch.cat([head.embed(texts[i:i + 4], role) for i in range(0, len(texts), 4)]) for texts, role in groups]
    head.loss_from_embeddings(*embs, BATCH).backward()
    reference = grads_of(module)
    assert all(torch.allclose(cached[k], reference[k], rtol=1e-8, atol=1e-12) for k in reference)
    torch.manual_seed(8)  # and dropout really is on: another seed gives other gradients
    module.zero_grad()
    head.training_step(BATCH).loss.backward()
    assert any(not torch.allclose(grads_of(module)[k], cached[k]) for k in cached)


def test_gradient_cache_is_turned_off_under_fsdp(tiny_bert):
    head = make_head(tiny_bert, gradient_cache={"chunk_size": 2})
    with pytest.warns(UserWarning, match="gradient_cache is turned off under FSDP"):
        head.on_strategy("FSDPStrategy")
    assert head.chunk_size is None


# ---------------------------------------------------------------------------- two processes
def _two_process_worker(rank: int, world: int, store: str, tiny_bert: str, chunk: int | None, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        head = make_head(Path(tiny_bert), gradient_cache={"chunk_size": chunk} if chunk else None, symmetric=True)
        module = make_module(head, dtype=torch.float64)
        half = len(BATCH["query"]) // world
        local = {k: v[rank * half:(rank + 1) * half] for k, v in BATCH.items()}
        loss = head.training_step(local).loss
        loss.backward()
        grads = grads_of(module)
        for g in grads.values():  # what DDP does to gradients: average over processes
            dist.all_reduce(g)
            g /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"loss": mean_loss.item() / world, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("chunk", [None, 2])
def test_two_processes_equal_one_process_on_the_global_batch(tiny_bert, tmp_path, chunk):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.pt"
    mp.spawn(_two_process_worker, args=(2, str(tmp_path / "store"), str(tiny_bert), chunk, str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=True)

    head = make_head(tiny_bert, symmetric=True)
    module = make_module(head, dtype=torch.float64)
    loss = head.training_step(BATCH).loss
    loss.backward()
    single = grads_of(module)
    assert ddp["loss"] == pytest.approx(loss.item(), rel=1e-9)
    assert all(torch.allclose(ddp["grads"][k], single[k], rtol=1e-7, atol=1e-12) for k in single)
    assert math.isfinite(ddp["loss"]) and os.path.exists(out)


def test_gradient_cache_and_matryoshka_through_the_train_entry(fast_cfg):
    from lightning_lora.train import run

    metrics, objects = run(fast_cfg(["model.gradient_cache.chunk_size=4", "model.mrl_dims=[32,16]",
                                     "trainer.precision=bf16-mixed"]))
    module = objects["module"]
    assert metrics["global_step"] == 4
    assert {"val/recall@1", "val/dim16/recall@1"} <= set(metrics["after"])
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)


def test_retrieval_metrics_match_ranks_with_negative_similarities():
    from lightning_lora.heads.embedding import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    q, d = (F.normalize(torch.randn(12, 8, generator=g), dim=-1) for _ in range(2))
    scores = q @ d.T
    assert (scores.diag() < 0).any()  # the case torchmetrics alone counts as "not retrieved"
    rank = (scores > scores.diag()[:, None]).sum(1)  # 0-based rank of each query's own document
    metrics = retrieval_metrics(q, d)
    assert metrics["recall@1"] == pytest.approx((rank < 1).float().mean().item())
    assert metrics["recall@10"] == pytest.approx((rank < 10).float().mean().item())
    assert metrics["mrr@10"] == pytest.approx(torch.where(rank < 10, 1 / (rank + 1), 0.0).mean().item())


@pytest.mark.parametrize("model", ["clip_tiny", "qwen3_vl_tiny"])
def test_vision_language_presets_train_with_vision_lora_and_gradient_cache(model, cache_dir, tmp_path):
    from conftest import compose_train
    from omegaconf import open_dict

    from lightning_lora.train import run

    cfg = compose_train([f"model={model}", "data=digits_retrieval", f"paths.cache_dir={cache_dir}",
                         "model.vision=true", "model.gradient_cache.chunk_size=4", "trainer.max_steps=3",
                         "data.num_images=48", "data.batch_size=8", "~callbacks.progress_bar",
                         "callbacks.adapter_checkpoint.every_n_steps=0", "trainer.precision=32-true"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, objects = run(cfg)
    module = objects["module"]
    assert metrics["global_step"] == 3 and "val/recall@1" in metrics["after"]
    assert set(module.adapters) == {"text" if model == "clip_tiny" else "language", "vision"}
    trained = {n: p for n, p in module.named_parameters() if "lora_B" in n}
    assert any(".vision." in n or "visual" in n or "vision_model" in n for n in trained)
    assert all(p.abs().sum() > 0 for p in trained.values())
    final = tmp_path / "run" / "adapters" / "final"
    # one PEFT directory per adapted tower, and model/: all of them as one PEFT directory of the whole AutoModel
    assert sorted(p.name for p in final.iterdir()) == sorted([*module.adapters, "model"])


def test_vision_lora_under_ddp_when_one_process_sees_no_image(cache_dir, tmp_path):
    """Under 2-process DDP rank 0 gets only image->caption rows and rank 1 only text->text rows, so rank 1's vision
    LoRA has no gradient. DDP (find_unused_parameters=false) must still reduce every parameter: the run finishes
    and the vision LoRA moved (from rank 0's images). Without the module's zero-gradient touch this hangs."""
    import numpy as np
    from conftest import run_cli
    from PIL import Image
    from safetensors.torch import load_file

    # Lightning's DistributedSampler for training: shuffled with the run's seed (epoch 0), rank r takes every
    # second index from r
    rank0 = set(torch.randperm(16, generator=torch.Generator().manual_seed(42)).tolist()[0::2])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        if i in rank0:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            rows.append({"query_image": f"{i}.png", "positive": f"picture number {i}"})
        else:
            rows.append({"query": f"text number {i}", "positive": f"the text {i}"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "ddp"
    proc = run_cli(["model=clip_tiny", "model.vision=true", "data=image_pairs",
                    f"data.train_path={tmp_path}/train.jsonl", "data.batch_size=4", "seed=42",
                    f"paths.cache_dir={cache_dir}", "trainer.max_steps=2",
                    "validate_before=false", "validate_after=false", "~callbacks.progress_bar",
                    "callbacks.adapter_checkpoint.every_n_steps=0", "trainer.precision=32-true", "strategy=ddp",
                    "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}"], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vision = load_file(run_dir / "adapters" / "final" / "vision" / "adapter_model.safetensors")
    assert vision and all(t.abs().sum() > 0 for k, t in vision.items() if "lora_B" in k)
