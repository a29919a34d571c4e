"""The ``lightning-lora`` command: ``extract``, ``validate``, ``inspect``, ``merge``, ``combine``, ``sample``.

Generic over model families: it works on checkpoints (``.safetensors``, weights-only torch files, diffusers
folders, TRELLIS json+safetensors pairs) and on LoRA files in the layouts of ``adapters.formats``.
A bad input prints ``error: <one line>`` to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import pickle
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightning_lora.errors import UserError
from lightning_lora.fileio import path_bytes

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage dump -> one clear line
        raise UserError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------- helpers
def _progress(desc: str):
    from tqdm.auto import tqdm

    def wrap(items: Iterable) -> Iterable:
        return tqdm(items, desc=desc, unit="module", file=sys.stderr, disable=None, leave=False)

    return wrap


def _check_out(path: Path, overwrite: bool, flag: str = "--out") -> None:
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it or choose another path")


def _device(name: str) -> str:
    import torch

    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device={name!r} is unknown; valid: cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available here; use --device cpu")
    return name


def _weighted(spec: str, flag: str) -> tuple[Path, float]:
    """``path`` or ``path:scale`` (a colon followed by something that is not a number stays in the path)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            value = float(tail)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(value):
            raise UserError(f"{flag} {spec}: the scale {tail!r} must be a finite number")
        return Path(path), value
    return Path(spec), 1.0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _open_pair(base: str, tuned: str):
    from lightning_lora.adapters.checkpoints import check_same_keys, open_weights

    b, t = open_weights(base), open_weights(tuned)
    check_same_keys(b, t)
    return b, t


def _write_formats(out: Path, modules, fmt: str | None, all_modules, base_name: str | None) -> list[Path]:
    from lightning_lora.adapters import formats

    if fmt is None:
        return []
    target = formats.extra_output_path(out, fmt)
    if fmt == "peft":
        formats.write_peft_dir(target, modules, base_model=base_name, all_modules=all_modules)
    elif fmt == "kohya":
        formats.write_kohya(target, modules)
    else:
        formats.write_diffusers(target, modules)
    return [target]


# ---------------------------------------------------------------------------- extract
def cmd_extract(args: argparse.Namespace) -> int:
    from lightning_lora.adapters import formats
    from lightning_lora.adapters.checkpoints import module_weights
    from lightning_lora.adapters.extract import extract_lora, parse_rank

    rank = parse_rank(args.rank, "--rank")
    conv_rank = parse_rank(args.conv_rank, "--conv-rank") if args.conv_rank is not None else rank
    device = _device(args.device)
    if args.threads is not None:
        import torch

        if args.threads <= 0:
            raise UserError(f"--threads={args.threads} must be a positive integer")
        torch.set_num_threads(args.threads)
    if args.min_diff < 0:
        raise UserError(f"--min-diff={args.min_diff} must be >= 0")
    if args.clamp_quantile is not None and not 0.0 < args.clamp_quantile <= 1.0:
        raise UserError(f"--clamp-quantile={args.clamp_quantile} must be in (0, 1], e.g. 0.99")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the LoRA file is written as .safetensors")
    _check_out(out, args.overwrite)
    if args.format:
        _check_out(formats.extra_output_path(out, args.format), args.overwrite, "--format output")
    base, tuned = _open_pair(args.base, args.tuned)
    result = extract_lora(base, tuned, rank=rank, conv_rank=conv_rank, min_diff=args.min_diff,
                          modules=args.modules, method=args.method, device=device,
                          clamp_quantile=args.clamp_quantile, progress=_progress("extract"))
    if not result.factors:
        raise UserError(f"no weight of {args.tuned} differs from the base by more than --min-diff={args.min_diff}")
    all_modules = list(module_weights(base))
    identity = {"base": base.path.name, "tuned": tuned.path.name, "base_kind": base.kind,
                "extracted_rank": "full" if rank is None else str(rank),
                "extracted_conv_rank": "full" if conv_rank is None else str(conv_rank), "method": args.method,
                "singular_values": "split symmetrically (sqrt(S) in each factor)"}
    formats.write_lora_file(out, result.factors, family=args.family, base_model=identity, all_modules=all_modules)
    extra = _write_formats(out, result.factors, args.format, all_modules, base.path.name)
    errors = [r.rel_error for r in result.results]
    worst = max(result.results, key=lambda r: r.rel_error)
    params = sum(f.numel() for f in result.factors.values())
    print(f"extracted {len(result.factors)} modules ({len(result.skipped_small)} unchanged within "
          f"--min-diff={args.min_diff:g}) with method={args.method}"
          + (f" ({result.fallbacks} redone with the full SVD)" if result.fallbacks else ""))
    print(f"relative error: mean {sum(errors) / len(errors):.4g}, worst {worst.rel_error:.4g} ({worst.name})")
    print(f"parameters: {params:,}; wrote {out}" + "".join(f", {p}" for p in extra))
    return 0


# ---------------------------------------------------------------------------- validate
def cmd_validate(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.checkpoints import module_weights
    from lightning_lora.adapters.extract import validate_lora
    from lightning_lora.adapters.formats import read_lora, resolve_modules
    from lightning_lora.fileio import atomic_write_text

    if not args.threshold > 0:
        raise UserError(f"--threshold={args.threshold} must be > 0, e.g. 0.05")
    lora_path = Path(args.lora)
    layers_out = Path(args.layers_out) if args.layers_out else lora_path.with_name(lora_path.stem + "_layers.txt")
    report = Path(args.report) if args.report else None
    for p, flag in ((report, "--report"), (layers_out, "--layers-out")):
        if p is not None:
            _check_out(p, args.overwrite, flag)
    base, tuned = _open_pair(args.base, args.tuned)
    lora = read_lora(lora_path)
    weights = module_weights(base)
    names = resolve_modules(lora.modules, weights, where=f"base {base.path.name}", prefixes=lora.submodules)
    results, uncovered = validate_lora(base, tuned, lora.modules, {n: weights[m] for n, m in names.items()},
                                       progress=_progress("validate"))
    ok = [r for r in results if r.rel_error < args.threshold]
    mean = sum(r.rel_error for r in results) / len(results)
    energy = sum(r.energy for r in results) / len(results)
    print(f"modules: {len(results)}; success rate {len(ok)}/{len(results)} = {100 * len(ok) / len(results):.1f}% "
          f"under relative error {args.threshold:g}")
    print(f"relative error: mean {mean:.4g}; energy retained: mean {energy:.4g}")
    print("worst modules:")
    for r in sorted(results, key=lambda r: -r.rel_error)[:5]:
        print(f"  {r.name}: rel_error {r.rel_error:.4g}, energy {r.energy:.4g}, rank {r.rank}, shape {list(r.shape)}")
    if uncovered:
        print(f"not in the LoRA: {len(uncovered)} layers with a non-zero delta, e.g. {', '.join(uncovered[:3])}")
    if report is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["module", "shape", "rank", "rel_error", "energy_retained", "ok"])
        for r in results:
            writer.writerow([r.name, "x".join(map(str, r.shape)), r.rank, f"{r.rel_error:.6g}", f"{r.energy:.6g}",
                             int(r.rel_error < args.threshold)])
        for name in uncovered:
            writer.writerow([name, "", 0, "1", "0", 0])
        atomic_write_text(report, buf.getvalue())
        print(f"wrote {report}")
    atomic_write_text(layers_out, "".join(f"{n}\n" for n in lora.modules))
    print(f"wrote {layers_out}")
    return 0


# ---------------------------------------------------------------------------- inspect
FORMAT_NAMES = {"lightning_lora": "lightning_lora single file", "peft": "PEFT directory", "kohya": "kohya",
                "diffusers": "diffusers", "bare": "bare PEFT keys"}


def cmd_inspect(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.formats import read_lora

    path = Path(args.lora)
    lora = read_lora(path)
    groups = Counter((f.rank, _fmt_num(f.alpha)) for f in lora.modules.values())
    leaves = Counter(m.rsplit(".", 1)[-1] for m in lora.modules)
    params = sum(f.numel() for f in lora.modules.values())
    print(f"file: {path} ({_human(path_bytes(path))})")
    print(f"format: {FORMAT_NAMES[lora.format]}")
    print(f"family: {lora.family or 'unknown'}")
    print(f"modules: {len(lora.modules)}")
    print("rank/alpha:")
    for (r, a), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  r={r} alpha={a}: {n} module{'s' if n != 1 else ''}")
    shown = ", ".join(f"{leaf} x{n}" if n > 1 else leaf for leaf, n in leaves.most_common(12))
    more = len(leaves) - 12
    print(f"targets: {shown}" + (f", ... ({more} more)" if more > 0 else ""))
    print(f"parameters: {params:,}")
    base = {k: v for k, v in (lora.base_model or {}).items() if v}
    print("base model: " + (", ".join(f"{k}={v}" for k, v in sorted(base.items())) if base else "not recorded"))
    for note in lora.notes:
        print(f"note: {note}")
    return 0


def _fmt_num(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.checkpoints import module_weights, open_weights, write_weights_like
    from lightning_lora.adapters.combine import merge_into
    from lightning_lora.adapters.formats import read_lora, resolve_modules

    out = Path(args.out)
    _check_out(out, args.overwrite)
    base = open_weights(args.base)
    if base.kind == "torch" and out.suffix == ".safetensors":
        raise UserError(f"--out {out}: the base is a torch file, so the merged weights are written as one too "
                        "(.pt/.ckpt)")
    weights = module_weights(base)
    parts: dict[str, list] = {}
    for spec in args.lora:
        path, scale = _weighted(spec, "--lora")
        lora = read_lora(path)
        if lora.ignored:
            raise UserError(f"{path} holds {len(lora.ignored)} tensors that are not LoRA factors (e.g. "
                            f"{lora.ignored[0]}); merging only the factors would not reproduce the adapted model")
        names = resolve_modules(lora.modules, weights, where=f"base {base.path.name}", prefixes=lora.submodules)
        for name, module in names.items():
            f, key = lora.modules[name], weights[module]
            if f.weight_shape != base.shape(key):
                raise UserError(f"{path}: module {name!r} makes a delta of shape {list(f.weight_shape)} but the base "
                                f"weight {key!r} has shape {list(base.shape(key))} (an adapter for another model?)")
            parts.setdefault(key, []).append((f, scale))
    updates = {key: merge_into(base.get(key), ps) for key, ps in parts.items()}
    write_weights_like(base, out, updates)
    print(f"merged {len(args.lora)} LoRA(s) into {len(updates)} weights of {base.path.name}; wrote {out}")
    return 0


# ---------------------------------------------------------------------------- combine
def cmd_combine(args: argparse.Namespace) -> int:
    from lightning_lora.adapters.combine import combine_concat, combine_svd
    from lightning_lora.adapters.extract import parse_rank
    from lightning_lora.adapters.formats import read_lora, rename_like, write_lora_file

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the combined LoRA is written as .safetensors")
    _check_out(out, args.overwrite)
    if args.method == "concat" and args.rank is not None:
        raise UserError("--rank applies to --method svd only; concat is exact and its rank is the sum of the ranks")
    inputs, sets = [], []
    for spec in args.adapters:
        path, weight = _weighted(spec, "adapter")
        lora = read_lora(path)
        sets.append(lora)
        inputs.append((lora.modules, weight))
    dotted = sorted({m for s in sets if s.format != "kohya" for m in s.modules})
    inputs = [(rename_like(s, dotted).modules, w) for s, (_, w) in zip(sets, inputs, strict=True)]
    if args.method == "concat":
        modules = combine_concat(inputs)
    else:
        modules = combine_svd(inputs, parse_rank(args.rank if args.rank is not None else "full", "--rank"),
                              device=_device(args.device))
    if not modules:
        raise UserError("the combination is empty (every weight is 0)")
    identity = dict(sets[0].base_model or {})
    identity["combined_from"] = ", ".join(args.adapters)
    identity["combine_method"] = args.method
    families = {s.family for s in sets if s.family}
    write_lora_file(out, modules, family=families.pop() if len(families) == 1 else "", base_model=identity)
    ranks = Counter(f.rank for f in modules.values())
    print(f"combined {len(inputs)} LoRAs ({args.method}) into {len(modules)} modules, ranks "
          + ", ".join(f"r={r} x{n}" for r, n in ranks.most_common()) + f"; wrote {out}")
    return 0


# ---------------------------------------------------------------------------- parser
def _npz_array(path: str, key: str, flag: str):
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{flag}: file not found: {file}")
    with np.load(file, allow_pickle=False) as data:
        if key not in data.files:
            raise UserError(f"{flag}: {file} has no array {key!r}; it has {', '.join(data.files) or 'none'}")
        return data[key]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def cmd_sample_flow3d(args: argparse.Namespace) -> int:
    """Sample TRELLIS latents with an optional LoRA: cond tokens (or an image) in, latents (.npz) and, for the
    demo's tiny presets or with --png, a picture of the sampled voxels out."""
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from lightning_lora.adapters import load_lora_weights, set_adapter_scale
    from lightning_lora.config import register_resolvers
    from lightning_lora.data.trellis import (
        decode_demo_ss,
        png_bytes,
        read_cond_image,
        slat_occupancy,
        voxel_picture,
        write_npz,
    )
    from lightning_lora.fileio import atomic_write_bytes

    out = Path(args.out)
    _check_out(out, args.overwrite)
    cond_path = Path(args.cond)
    image_cond = cond_path.suffix.lower() in IMAGE_SUFFIXES
    if image_cond and not args.image_encoder:
        raise UserError(f"--cond {cond_path} is an image: pass --image-encoder DIR (a local DINOv2-with-registers "
                        "folder) to encode it, or give precomputed tokens (.npz with tokens [T, D])")
    if image_cond and not cond_path.is_file():
        raise UserError(f"--cond: file not found: {cond_path}")
    register_resolvers()
    overrides = [f"model={args.model}", *([f"model.ckpt={args.ckpt}"] if args.ckpt else [])]
    with initialize_config_module("lightning_lora.conf", version_base="1.3"):
        cfg = compose("train", overrides)
    if args.image_encoder:
        with open_dict(cfg):
            cfg.model.image_encoder = {"pretrained": str(args.image_encoder),
                                       "image_size": args.image_size or cfg.model.image_encoder.image_size}
    dense = str(cfg.model.denoiser.get("_target_", "")).endswith("SparseStructureFlowModel")
    demo = args.model.endswith("_tiny")  # the presets the procedural demo set is made for
    png = Path(args.png) if args.png else out.with_suffix(".png") if demo and not args.no_png else None
    if png is not None:
        if dense and not demo:
            raise UserError(f"--png: {args.model} samples a sparse-structure latent, which becomes voxels only "
                            "through TRELLIS's SS decoder (not part of this tool); the picture is drawn for the "
                            "demo's tiny presets, whose stand-in encoding it inverts")
        _check_out(png, args.overwrite, "--png")
    torch.manual_seed(args.base_seed)  # a tiny preset without a checkpoint: the same random base as training
    head = instantiate(cfg.model)
    if args.lora:
        from lightning_lora.adapters.formats import read_lora

        read_lora(args.lora)  # a damaged or unsafe file fails here in one line that names it
        load_lora_weights(head.denoiser, args.lora)
        set_adapter_scale(head.denoiser, args.scale)
    head.eval()
    if image_cond:
        cond = head.encode_images(read_cond_image(cond_path, head.image_encoder.image_size)[None])
    else:
        cond = torch.from_numpy(_npz_array(args.cond, "tokens", "--cond")).float()
        cond = cond[None] if cond.ndim == 2 else cond
    coords = None
    if head.sparse:
        if not args.coords:
            raise UserError(f"{args.model} samples on given voxels: pass --coords FILE.npz with coords [N, 3]")
        xyz = torch.from_numpy(_npz_array(args.coords, "coords", "--coords")).long()
        res = head.denoiser.resolution
        if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0 or xyz.min() < 0 or xyz.max() >= res:
            span = f", range [{int(xyz.min())}, {int(xyz.max())}]" if xyz.numel() else ""
            raise UserError(f"--coords {args.coords}: coords must be a non-empty [N, 3] inside [0, {res}); got shape "
                            f"{tuple(xyz.shape)}{span}")
        if cond.shape[0] != 1:
            raise UserError(f"--coords holds one shape; --cond must be one [T, D] token set, got {tuple(cond.shape)}")
        coords = torch.cat([torch.zeros(len(xyz), 1, dtype=torch.long), xyz], 1)
    latent = head.sample(cond, coords=coords, steps=args.steps, cfg_strength=args.cfg,
                         cfg_interval=tuple(args.cfg_interval), rescale_t=args.rescale_t, seed=args.seed)
    arrays = {"coords": coords[:, 1:].numpy(), "feats": latent.feats.float().numpy()} if coords is not None else {
        "latent": latent.float().numpy()}
    write_npz(out, **arrays)
    print(f"wrote {out} ({', '.join(f'{k} {tuple(v.shape)}' for k, v in arrays.items())})")
    if png is not None:
        if coords is not None:  # a structured latent lives on the given voxels
            grids = [slat_occupancy(arrays["coords"], head.denoiser.resolution)]
        else:  # the demo's stand-in SS encoding, inverted: occupancy per sampled latent
            grids = [decode_demo_ss(item) for item in arrays["latent"]]
        picture = voxel_picture(grids)
        atomic_write_bytes(png, png_bytes(picture))
        print(f"wrote {png} ({picture.width}x{picture.height}: front, side and top views of "
              f"{', '.join(str(int(g.sum())) for g in grids)} voxels)")
    return 0


def _add_lora_folding(parser: argparse.ArgumentParser, formats: str) -> None:
    """``--lora PATH[:WEIGHT]`` (repeatable), ``--scale``, ``--allow-partial``: read by :func:`_scaled_loras`."""
    parser.add_argument("--lora", action="append", metavar="FILE_OR_DIR[:WEIGHT]",
                        help=f"adapter ({formats}); repeat for several, each with its weight")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every LoRA weight (1.0 = as trained)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="apply a LoRA even if some modules match nothing")


def _add_png_output(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--out`` (.png) and ``--overwrite``: read by :func:`_png_out`."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True, help="output .png")
    parser.add_argument("--overwrite", action="store_true")


def _png_out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    _check_out(out, args.overwrite)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the picture is written as .png")
    return out


def _scaled_loras(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """Every ``--lora PATH[:WEIGHT]``, its weight multiplied by ``--scale``."""
    return [(p, w * args.scale) for p, w in (_weighted(spec, "--lora") for spec in args.lora or [])]


def cmd_sample_sd(args: argparse.Namespace) -> int:
    import torch

    from lightning_lora.heads.diffusion import apply_loras, check_pipeline_folder

    out = _png_out(args)
    folder = check_pipeline_folder(args.pretrained)
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.to(_device(args.device))
    loras = _scaled_loras(args)
    for line in apply_loras(pipe, loras, allow_partial=args.allow_partial):
        print(line)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(args.prompt, height=size, width=size, num_inference_steps=args.steps,
                 guidance_scale=args.guidance, generator=torch.Generator("cpu").manual_seed(args.seed),
                 output_type="pt").images[0]
    from lightning_lora.callbacks.sample_previews import png_bytes
    from lightning_lora.fileio import atomic_write_bytes

    atomic_write_bytes(out, png_bytes(image.float().cpu()))
    print(f"wrote {out} ({size}x{size}, {args.steps} steps, guidance {args.guidance:g}, seed {args.seed})")
    return 0


def cmd_sample_lbm(args: argparse.Namespace) -> int:
    """One LBM translation (source image -> target domain) with LoRAs folded into the denoiser at a scale."""
    from PIL import Image

    from lightning_lora.callbacks.sample_previews import png_bytes
    from lightning_lora.data.images import describe_error, load_rgb, to_tensor
    from lightning_lora.fileio import atomic_write_bytes
    from lightning_lora.heads.diffusion import BridgeHead, apply_lbm_loras
    from lightning_lora.models.lbm import check_lbm_folder

    out = _png_out(args)
    if args.steps < 1:
        raise UserError(f"--steps={args.steps} must be >= 1 (LBM translates in 1)")
    source_path = Path(args.source)
    if not source_path.is_file():
        raise UserError(f"--source: file not found: {source_path}")
    try:
        image = load_rgb(source_path)
    except Exception as exc:
        raise UserError(f"--source {source_path}: unreadable image ({describe_error(exc)})") from None
    size = None
    if args.size is not None:  # WIDTHxHEIGHT, or one number for a square
        parts = args.size.lower().split("x")
        try:
            size = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
        except ValueError:
            size = (0, 0)
        if min(size) <= 0:
            raise UserError(f"--size {args.size!r}: give WIDTHxHEIGHT in pixels (e.g. 640x480) or one number")
    check_lbm_folder(args.pretrained, "--pretrained")
    head = BridgeHead(args.pretrained, pixel_loss_weight=0.0, num_inference_steps=args.steps)
    head.eval().to(_device(args.device))
    loras = _scaled_loras(args)
    for line in apply_lbm_loras(head.denoiser, loras, allow_partial=args.allow_partial):
        print(line)
    f = head.vae_factor
    w, h = size or image.size
    w, h = max(f, w // f * f), max(f, h // f * f)  # the VAE needs multiples of its downscale factor
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    result = head.translate(to_tensor(image)[None], args.steps, seed=args.seed)[0]
    atomic_write_bytes(out, png_bytes(((result.cpu() + 1) / 2).clamp(0, 1)))
    print(f"wrote {out} ({w}x{h}, {args.steps} step{'s' if args.steps != 1 else ''}, seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lightning_lora.adapters.extract import METHODS
    from lightning_lora.adapters.formats import OUTPUT_FORMATS

    p = _Parser(prog="lightning-lora", description="LoRA tools: extract, validate, inspect, merge, combine.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    e = sub.add_parser("extract", help="extract a LoRA from a base and a fine-tuned checkpoint by truncated SVD")
    e.add_argument("--base", required=True, help="base weights (.safetensors, .pt/.ckpt/.bin, folder, TRELLIS pair)")
    e.add_argument("--tuned", required=True, help="fine-tuned weights with the same keys and shapes")
    e.add_argument("--out", required=True, help="output LoRA (.safetensors, self-describing)")
    e.add_argument("--rank", default="32", help="rank for linear and 1x1-conv weights, or 'full' (default 32)")
    e.add_argument("--conv-rank", default=None, help="rank for convs with a kernel > 1 (default: --rank)")
    e.add_argument("--min-diff", type=float, default=1e-3, help="skip weights whose delta max-abs is <= this")
    e.add_argument("--clamp-quantile", type=float, default=None,
                   help="clamp factors at this quantile of their absolute values (off by default; hurts accuracy)")
    e.add_argument("--modules", nargs="+", default=None,
                   help="only modules matching a glob ('*attn*') or containing a plain substring ('attn1')")
    e.add_argument("--device", default="cpu", help="cpu or cuda (for the SVDs)")
    e.add_argument("--method", choices=METHODS, default="full",
                   help="full SVD, or randomized (svd_lowrank, checked against the optimum per module)")
    e.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                   help="also write a PEFT directory (<out>_peft/), or a kohya/diffusers file (<out>.<format>."
                        "safetensors)")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the SVDs (1 is often fastest on a busy machine)")
    e.add_argument("--family", default="", help="family recorded in the file's metadata (e.g. sd, trellis)")
    e.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    e.set_defaults(func=cmd_extract)

    v = sub.add_parser("validate", help="per-module reconstruction error of a LoRA against base and tuned weights")
    v.add_argument("--base", required=True)
    v.add_argument("--tuned", required=True)
    v.add_argument("--lora", required=True, help="LoRA file or PEFT directory")
    v.add_argument("--report", default=None, help="write a per-module CSV here")
    v.add_argument("--threshold", type=float, default=0.05, help="relative error counted as a success (0.05)")
    v.add_argument("--layers-out", default=None, help="LoRA layer names, one a line (default <lora>_layers.txt)")
    v.add_argument("--overwrite", action="store_true", help="replace existing report files")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("inspect", help="describe a LoRA file or PEFT directory")
    i.add_argument("lora")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("merge", help="fold LoRAs into base weights (W += scale·alpha/r·B·A), in the base's format")
    m.add_argument("--base", required=True)
    m.add_argument("--lora", required=True, action="append", help="LoRA[:scale]; repeat for several")
    m.add_argument("--out", required=True)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser("combine", help="one LoRA equal to a weighted sum of LoRAs")
    c.add_argument("adapters", nargs="+", help="LoRA[:weight] ...")
    c.add_argument("--out", required=True)
    c.add_argument("--method", choices=("concat", "svd"), default="concat",
                   help="concat: exact, ranks add; svd: the exact sum re-factorised at --rank")
    c.add_argument("--rank", default=None, help="rank for --method svd (default: exact, the sum of the ranks)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_combine)

    sp = sub.add_parser("sample", help="sample with a base model and an optional LoRA (per family)")
    fam = sp.add_subparsers(dest="family", required=True, parser_class=_Parser)
    f3 = fam.add_parser("flow3d", help="TRELLIS latents from condition tokens (Euler flow sampler with CFG)")
    f3.add_argument("--model", default="trellis_slat_tiny", help="model preset (trellis_ss, trellis_slat, *_tiny)")
    f3.add_argument("--ckpt", help="base weights (required by the released presets)")
    f3.add_argument("--lora", help="adapter file or PEFT directory for the denoiser")
    f3.add_argument("--scale", type=float, default=1.0, help="LoRA strength (1.0 = as trained)")
    f3.add_argument("--cond", required=True,
                    help=".npz with tokens [T, D] (or [B, T, D]), or an image (.png/.jpg) with --image-encoder")
    f3.add_argument("--image-encoder", help="local DINOv2-with-registers folder that encodes an image --cond")
    f3.add_argument("--image-size", type=int, default=None,
                    help="pixels the image is resized to for the encoder (default: the preset's, 518)")
    f3.add_argument("--coords", help=".npz with coords [N, 3]: the voxels a structured latent is sampled on")
    f3.add_argument("--steps", type=int, default=25)
    f3.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance strength")
    f3.add_argument("--cfg-interval", type=float, nargs=2, default=[0.0, 1.0], metavar=("LO", "HI"))
    f3.add_argument("--rescale-t", type=float, default=1.0)
    f3.add_argument("--seed", type=int, default=0)
    f3.add_argument("--base-seed", type=int, default=42, help="seed of a random tiny base (the training seed)")
    f3.add_argument("--out", required=True, help="output .npz (latent, or coords + feats)")
    pictures = f3.add_mutually_exclusive_group()
    pictures.add_argument("--png", help="also draw the sampled voxels (front, side, top) here; by default "
                                        "<out>.png for the demo's tiny presets")
    pictures.add_argument("--no-png", action="store_true", help="no picture, even for a tiny preset")
    f3.add_argument("--overwrite", action="store_true")
    f3.set_defaults(func=cmd_sample_flow3d)
    sd = fam.add_parser("sd", help="a Stable Diffusion picture with LoRAs folded in at a scale")
    sd.add_argument("--pretrained", required=True, help="local diffusers Stable Diffusion folder")
    _add_lora_folding(sd, "diffusers/kohya/PEFT/lightning_lora file, or a run's adapters/final")
    sd.add_argument("--prompt", required=True)
    sd.add_argument("--steps", type=int, default=25)
    sd.add_argument("--guidance", type=float, default=7.5)
    sd.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample size x VAE factor")
    sd.add_argument("--seed", type=int, default=0)
    _add_png_output(sd)
    sd.set_defaults(func=cmd_sample_sd)
    lb = fam.add_parser("lbm", help="an LBM image-to-image translation with LoRAs folded in at a scale")
    lb.add_argument("--pretrained", required=True, help="local LBM folder (a .yaml config + model.safetensors)")
    _add_lora_folding(lb, "lightning_lora/PEFT/kohya/diffusers file, an extracted LoRA, or a run's adapters/final")
    lb.add_argument("--source", required=True, help="source image (.png/.jpg/...)")
    lb.add_argument("--steps", type=int, default=1, help="Euler steps over the bridge (LBM: 1)")
    lb.add_argument("--size", default=None, help="WIDTHxHEIGHT to resize the source to (default: its own size, "
                                                 "rounded down to the VAE's factor)")
    lb.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior draw and the bridge noise")
    _add_png_output(lb)
    lb.set_defaults(func=cmd_sample_lbm)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: the traceback of an error instead of one line
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            return int(args.func(args) or 0)
        except Exception as e:  # Hydra's instantiate wraps a UserError raised while a model is built
            cause, seen = e.__cause__, 0
            while type(e).__name__ == "InstantiationException" and cause is not None and seen < 8:
                if isinstance(cause, (UserError, OSError, pickle.UnpicklingError)):
                    raise cause from None
                cause, seen = cause.__cause__, seen + 1
            raise
    except UserError as e:
        if debug:
            raise
        message = " ".join(str(e).split())  # always one line
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except pickle.UnpicklingError as e:  # a torch file that needs code to load: never unpickled
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: refused a file holding pickled objects that would run code when loaded (only tensors are "
              f"read, weights_only=True){where}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # unreadable input, unwritable output, full disk: the system's words, one line
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {' '.join((e.strerror or str(e)).split())}{where}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
