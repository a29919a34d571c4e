"""Build a demo base once: ``python -m lightning_lora.demos.pretrain sd|lbm [--out PATH] [--vae-steps N] ...`` or
``python -m lightning_lora.demos.pretrain trellis_ss|trellis_slat [--out PATH] [--steps N] [--judge N]``.

The base is written (atomically) under the cache folder the demo experiments read (``$LIGHTNING_LORA_CACHE`` or
``~/.cache/lightning_lora``), and reused when it is already there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lightning_lora.errors import UserError, user_message
from lightning_lora.extras import first_missing, missing_line

#: family -> the folder name of its base under the cache
BASES = {"sd": "sd_digits_base", "lbm": "lbm_digits_base", "trellis_ss": "trellis_ss_demo_base",
         "trellis_slat": "trellis_slat_demo_base"}
#: family -> the optional packages its base and data need (the digits bases: diffusers and scikit-learn's digits)
NEEDS = {"sd": ("diffusers", "sklearn"), "lbm": ("diffusers", "sklearn"), "trellis_ss": (), "trellis_slat": ()}


def cache_dir() -> Path:
    """The same folder as ``conf/paths``' ``cache_dir``."""
    return Path(os.environ.get("LIGHTNING_LORA_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache/lightning_lora")


def fit_line(scores: dict) -> str:
    """How well the judged samples fit their templates: the SS demo's mean IoU, the SLat demo's mean distance."""
    if "mean_iou" in scores:
        return f"mean IoU {scores['mean_iou']:.2f}"
    return f"mean colour cosine {scores['mean_cosine']:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_lora.demos.pretrain", description=__doc__)
    parser.add_argument("family", choices=sorted(BASES))
    parser.add_argument("--out", type=Path, default=None, help="the base's folder (default: under the cache)")
    parser.add_argument("--vae-steps", type=int, default=None, help="sd, lbm: VAE steps (default: the recipe's)")
    parser.add_argument("--unet-steps", type=int, default=None,
                        help="sd, lbm: UNet/denoiser steps (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="trellis_ss, trellis_slat: denoiser steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", type=int, default=0, metavar="N",
                        help="then judge the base: sd: N samples per digit (plain and red prompts); trellis_ss: N "
                             "samples per shape class; trellis_slat: N samples per pattern; lbm: any N > 0 prints its "
                             "PSNR/SSIM on the held-out digits")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    # the base is a diffusers model and its data scikit-learn's digits: one line naming the extra, not a traceback
    if (module := first_missing(NEEDS[args.family])) is not None:
        print(f"error: {missing_line(module, f'python -m lightning_lora.demos.pretrain {args.family}')}",
              file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or cache_dir() / BASES[args.family]
    start = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731
    steps = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps)) if v is not None}
    try:
        if args.family == "trellis_slat":
            from lightning_lora.demos.trellis_slat_base import ensure_trellis_slat_base

            path = ensure_trellis_slat_base(out, seed=args.seed, log=log,
                                            **({"steps": args.steps} if args.steps else {}))
        elif args.family == "trellis_ss":
            from lightning_lora.demos.trellis_base import ensure_trellis_ss_base

            path = ensure_trellis_ss_base(out, seed=args.seed, log=log, **({"steps": args.steps} if args.steps else {}))
        elif args.family == "lbm":
            from lightning_lora.demos.lbm_base import ensure_lbm_digits_base

            path = ensure_lbm_digits_base(out, seed=args.seed, log=log, **steps)
        else:
            from lightning_lora.demos.sd_base import ensure_sd_digits_base

            path = ensure_sd_digits_base(out, seed=args.seed, log=log, **steps)
    except UserError as err:
        print(user_message(err), file=sys.stderr)
        return 2
    print(f"{args.family} base: {path} ({time.perf_counter() - start:.0f}s)", flush=True)
    if args.judge and args.family in ("trellis_ss", "trellis_slat"):
        if args.family == "trellis_ss":
            from lightning_lora.demos.trellis_demo import judge_base as judge_trellis
        else:
            from lightning_lora.demos.trellis_slat_demo import judge_base as judge_trellis

        scores = judge_trellis(path, args.judge)
        shares = ", ".join(f"{key.removesuffix('_share')} {value:.2f}" for key, value in scores.items()
                           if key.endswith("_share"))
        print(f"judge, {args.judge} samples per class: {scores['metric']} {scores['value']:.2f}; {shares}; "
              f"{fit_line(scores)}", flush=True)
    elif args.judge and args.family == "lbm":
        from lightning_lora.demos.lbm_demo import measure_base

        for transform in ("invert", "relight"):  # its own translation, and the demo LoRA's
            scores = measure_base(path, transform)
            print(f"held-out digits, {transform} targets: PSNR {scores['value']:.2f} dB, SSIM {scores['ssim']:.3f}",
                  flush=True)
    elif args.judge:
        from lightning_lora.demos.sd_demo import judge_base

        for style in ("plain", "red"):
            scores = judge_base(path, style, args.judge)
            print(f"judge, {args.judge} samples per digit, {style} prompts: digit accuracy "
                  f"{scores['digit_accuracy']:.2f}, {style} style share {scores['value']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
