"""Command-line options shared by ``lightning-lora``'s tools and the heads' sample commands.

Each ``add_*`` declares a group of options on an argparse parser; the matching reader turns the parsed values
into checked Python values, raising ``UserError`` (one line naming the bad value) for a bad one.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lightning_lora.errors import UserError


def check_out(path: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse to replace an existing output unless ``--overwrite`` was given."""
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; pass --overwrite to replace it or choose another path")


def device(name: str) -> str:
    """``--device``: cpu, cuda or cuda:N, and CUDA must be there to ask for it."""
    import torch

    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device={name!r} is unknown; valid: cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available here; use --device cpu")
    return name


def weighted(spec: str, flag: str) -> tuple[Path, float]:
    """``path`` or ``path:weight``. A tail that is not a number stays in the path only when it looks like one (it
    holds a slash, as in ``hf://org/name`` or ``C:\\dir``) or the whole text names an existing file; otherwise
    ``x:abc`` is a weight that is not a number, said as such (not as a missing file ``x:abc``)."""
    path, sep, tail = spec.rpartition(":")
    if not (sep and path):
        return Path(spec), 1.0
    try:
        value = float(tail)
    except ValueError:
        if "/" in tail or "\\" in tail or Path(spec).exists():
            return Path(spec), 1.0
        raise UserError(f"{flag} {spec}: the weight {tail!r} is not a number; write PATH:WEIGHT, e.g. {path}:0.5"
                        ) from None
    if not math.isfinite(value):
        raise UserError(f"{flag} {spec}: the scale {tail!r} must be a finite number")
    return Path(path), value


def finite_float(text: str) -> float:
    """argparse ``type=``: a finite number (``--scale nan`` would draw a black picture)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer > 0 (``--steps 0`` samples nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def npz_array(path: str, key: str, flag: str):
    """One array of a ``.npz`` file (never unpickled), with one-line errors for a missing file or key."""
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{flag}: file not found: {file}")
    with np.load(file, allow_pickle=False) as data:
        if key not in data.files:
            raise UserError(f"{flag}: {file} has no array {key!r}; it has {', '.join(data.files) or 'none'}")
        return data[key]


def add_lora_folding(parser: argparse.ArgumentParser, formats: str) -> None:
    """``--lora PATH[:WEIGHT]`` (repeatable), ``--scale``, ``--allow-partial``: read by :func:`scaled_loras`."""
    parser.add_argument("--lora", "--lora_path", dest="lora", action="append", metavar="FILE_OR_DIR[:WEIGHT]",
                        help=f"adapter ({formats}); repeat for several, each with its weight")
    parser.add_argument("--scale", "--lora_scale", dest="scale", type=finite_float, default=1.0,
                        help="multiplies every LoRA weight (1.0 = as trained)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="apply a LoRA even if some modules match nothing")
    parser.add_argument("--verbose", action="store_true", help="print one line per module folded in")


def scaled_loras(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """Every ``--lora PATH[:WEIGHT]``, its weight multiplied by ``--scale``."""
    return [(p, w * args.scale) for p, w in (weighted(spec, "--lora") for spec in args.lora or [])]


#: picture formats a sample command writes, told by the ``--out`` suffix (PIL's format names)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def add_image_output(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--out`` (.png/.jpg/.webp; alias ``--output_path``) and ``--overwrite``: read by
    :func:`image_out`."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", "--output_path", dest="out", required=True,
                        help="output picture: .png, .jpg/.jpeg or .webp (the suffix picks the format)")
    parser.add_argument("--overwrite", action="store_true")


def image_out(args: argparse.Namespace) -> Path:
    """The checked ``--out`` of :func:`add_image_output`: a known picture suffix, not an existing file."""
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise UserError(f"--out {out}: unknown picture suffix {out.suffix or '(none)'!r}; valid: "
                        + ", ".join(IMAGE_FORMATS))
    check_out(out, args.overwrite)
    return out


def image_bytes(picture, path: Path) -> bytes:
    """A [3, H, W] float tensor in [0, 1] encoded in the format ``path``'s suffix names (JPEG/WebP at quality 95:
    PIL's default 75 blurs small pictures)."""
    import io

    import torch
    from PIL import Image

    array = (picture.detach().float().cpu().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({} if fmt == "PNG" else {"quality": 95}))
    return buffer.getvalue()
