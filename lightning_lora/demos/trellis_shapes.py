"""The TRELLIS demo's shapes and their judge: procedural solids (sphere, box, cylinder, torus) as sparse-structure
latents in the demo set's stand-in encoding, with condition tokens that name the class, and a judge that says
which class a sampled latent shows by voxel IoU against templates of every class.

- Latents: ``occupancy`` [16³] of a centred solid of a random size, encoded as the TRELLIS demo set encodes it
  (``data/trellis.py``: a fixed random projection of ``2·occupancy - 1`` onto the channels, here one, scaled to
  unit variance; ``decode_demo_ss`` inverts it). Only the size varies, so a tiny base can learn every class
  within minutes on a CPU.
- Condition tokens: a fixed random token set per class (seeded) plus a little noise per object, standing in for
  what an image encoder would say about a picture of that class.
- The judge (:func:`judge`) knows nothing of any model: a grid's class is that of its best-IoU template
  (every class at a range of sizes and one-voxel shifts, and a solid disc, which a torus without its hole is), or
  ``None`` when even that IoU is below ``min_iou``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_lora.checks import choice, positive_int
from lightning_lora.data.trellis import (
    COND_DIR,
    SHAPES,
    SS_MODEL,
    _occupancy,
    decode_demo_ss,
    demo_ss_projection,
    write_npz,
)
from lightning_lora.demos.digest import arrays_digest
from lightning_lora.fileio import atomic_directory, atomic_write_text

RESOLUTION = 16  # the sparse-structure grid, as TRELLIS's
#: latent channels: one (TRELLIS's SS latents have 8); the encoding has rank one across channels anyway, and a
#: 4³ patch of 8 channels (512 numbers) through a small model's 64-128 wide tokens leaves its samples speckled
CHANNELS = 1
COND_TOKENS = 8
COND_DIM = 64
#: the classes the base is trained on, and the one a LoRA teaches it
BASE_SHAPES = ("sphere", "box", "cylinder")
NEW_SHAPE = "torus"
SIZE_RANGE = (0.65, 0.9)  # a solid's size (coordinates in [-1, 1]); the torus's tube stays >= 1.5 voxels thick
TOKEN_NOISE = 0.05  # per-object noise on the class's tokens
CLASS_TOKEN_SEED = 0  # the class token sets: one table for the base, the LoRA data and the judge's conditions
#: the judge's templates: every class at these sizes, shifted by -1, 0, +1 voxel on each axis
TEMPLATE_SIZES = tuple(float(s) for s in np.linspace(0.55, 1.0, 10).round(3))
TEMPLATE_SHIFTS = (-1, 0, 1)
#: template classes that are none of the shapes: a torus with its hole filled is a disc, not a torus
DISTRACTORS = ("disc",)
MIN_IOU = 0.5


# --------------------------------------------------------------------------- shapes, latents, conditions
def class_tokens(seed: int = CLASS_TOKEN_SEED) -> np.ndarray:
    """[classes, T, D]: the fixed token set of each class of ``SHAPES`` (float32, N(0, 1) entries)."""
    return np.random.default_rng(seed).standard_normal((len(SHAPES), COND_TOKENS, COND_DIM)).astype(np.float32)


def _rng(shape: str, seed: int) -> np.random.Generator:
    """A generator of its own per (class, seed), so one class's objects do not depend on which others are made."""
    return np.random.default_rng([SHAPES.index(shape), seed])


def shape_conditions(shape: str, count: int, seed: int) -> np.ndarray:
    """[count, T, D]: the class's tokens with fresh per-object noise (``seed`` picks the noise)."""
    choice(shape, "shape", SHAPES)
    noise = _rng(shape, seed + 7919).standard_normal((count, COND_TOKENS, COND_DIM)).astype(np.float32)
    return class_tokens()[SHAPES.index(shape)][None] + TOKEN_NOISE * noise


def encode_occupancy(occ: np.ndarray, channels: int = CHANNELS) -> np.ndarray:
    """The demo set's stand-in SS encoding of a boolean grid, scaled to unit variance: [channels, R, R, R]
    (``decode_demo_ss`` inverts it: the scale does not change the sign it reads)."""
    projection = demo_ss_projection(channels)[:, 0]
    projection = projection / np.sqrt(np.mean(projection**2))
    return (projection[:, None, None, None] * (2.0 * np.asarray(occ, np.float32)[None] - 1.0)).astype(np.float32)


def shape_objects(shape: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` objects of one class: (latents [N, C, R, R, R], condition tokens [N, T, D], sizes [N])."""
    choice(shape, "shape", SHAPES)
    sizes = _rng(shape, seed).uniform(*SIZE_RANGE, size=count)
    latents = np.stack([encode_occupancy(_occupancy(shape, float(s), np.zeros(3), RESOLUTION)) for s in sizes])
    return latents, shape_conditions(shape, count, seed), sizes


def shapes_digest(shapes: Sequence[str], seed: int) -> str:
    """The digest of one object of each class (latents, condition tokens, size) as ``seed`` makes them."""
    return arrays_digest(part for shape in shapes for part in shape_objects(shape, 1, seed))


def write_shapes_root(folder: str | Path, shapes: Sequence[str], per_shape: int, seed: int) -> Path:
    """A TRELLIS-layout data root (``metadata.csv``, ``ss_latents/``, ``cond_tokens/``) of ``per_shape`` objects of
    each class, written once (atomically; a complete folder is reused)."""
    folder = Path(folder).expanduser()
    if (folder / "metadata.csv").is_file():
        return folder
    with atomic_directory(folder) as tmp:
        rows = ["sha256,shape,size,ss_latent_" + SS_MODEL]
        for shape in shapes:
            latents, tokens, sizes = shape_objects(shape, per_shape, seed)
            for i, (latent, token, size) in enumerate(zip(latents, tokens, sizes, strict=True)):
                sha = hashlib.sha256(f"{shape}-{seed}-{i}".encode()).hexdigest()
                write_npz(tmp / "ss_latents" / SS_MODEL / f"{sha}.npz", mean=latent)
                write_npz(tmp / COND_DIR / f"{sha}.npz", tokens=token)
                rows.append(f"{sha},{shape},{size:.4f},True")
        atomic_write_text(tmp / "metadata.csv", "\n".join(rows) + "\n")
    return folder


# --------------------------------------------------------------------------- the judge
@dataclass(frozen=True)
class Templates:
    """Occupancy templates [K, R³] (bool) and the class of each row."""

    grids: np.ndarray
    classes: tuple[str, ...]


def template_occupancy(shape: str, size: float, center: np.ndarray, resolution: int) -> np.ndarray:
    """A class of ``SHAPES`` as the demo set draws it, or a distractor: ``disc``, the torus's solid hull."""
    if shape != "disc":
        return _occupancy(shape, size, center, resolution)
    axis = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    x, y, z = np.meshgrid(axis - center[0], axis - center[1], axis - center[2], indexing="ij")
    return (x**2 + y**2 <= (0.95 * size) ** 2) & (np.abs(z) <= 0.3 * size)


def shape_templates(resolution: int = RESOLUTION, shapes: Sequence[str] = (*SHAPES, *DISTRACTORS),
                    sizes: Sequence[float] = TEMPLATE_SIZES, shifts: Sequence[int] = TEMPLATE_SHIFTS) -> Templates:
    """Every class at every size, shifted by each of ``shifts`` voxels on each axis (non-empty ones)."""
    grids, classes = [], []
    voxel = 2.0 / resolution
    for shape in shapes:
        for size in sizes:
            for dx in shifts:
                for dy in shifts:
                    for dz in shifts:
                        occ = template_occupancy(shape, float(size), voxel * np.array([dx, dy, dz], float),
                                                 resolution)
                        if occ.any():
                            grids.append(occ.reshape(-1))
                            classes.append(shape)
    return Templates(np.stack(grids), tuple(classes))


_TEMPLATES: dict[int, Templates] = {}


def default_templates(resolution: int = RESOLUTION) -> Templates:
    if resolution not in _TEMPLATES:
        _TEMPLATES[resolution] = shape_templates(resolution)
    return _TEMPLATES[resolution]


def judge(grids: Sequence[np.ndarray] | np.ndarray, templates: Templates | None = None, min_iou: float = MIN_IOU
          ) -> tuple[list[str | None], np.ndarray]:
    """(class, best IoU) of each boolean grid [R, R, R]: the best template's class (a distractor's name when that
    fits best), or None below ``min_iou``."""
    flat = np.stack([np.asarray(g, dtype=bool).reshape(-1) for g in grids]).astype(np.float32)
    templates = templates or default_templates(round(flat.shape[1] ** (1 / 3)))
    t = templates.grids.astype(np.float32)
    inter = flat @ t.T
    union = flat.sum(1, keepdims=True) + t.sum(1)[None] - inter
    iou = inter / np.maximum(union, 1.0)
    best = iou.argmax(1)
    scores = iou[np.arange(len(flat)), best]
    return [templates.classes[b] if s >= min_iou else None for b, s in zip(best, scores, strict=True)], scores


def judge_latents(latents: np.ndarray, min_iou: float = MIN_IOU) -> tuple[list[str | None], np.ndarray, list]:
    """Decode sampled SS latents [N, C, R, R, R] with the demo encoding's inverse, then :func:`judge` them; also
    returns the occupancy grids."""
    grids = [decode_demo_ss(x) for x in np.asarray(latents, dtype=np.float32)]
    named, scores = judge(grids, min_iou=min_iou)
    return named, scores, grids


def class_shares(named: Sequence[str | None], shapes: Sequence[str], per_class: int) -> dict[str, float]:
    """Share of each class's ``per_class`` consecutive samples judged to be that class."""
    positive_int(per_class, "per_class", got=True)
    return {shape: float(np.mean([n == shape for n in named[i * per_class:(i + 1) * per_class]]))
            for i, shape in enumerate(shapes)}
