"""The TRELLIS SLat demo's appearance classes and their judge: colour patterns painted on the surface voxels of the
demo's solids, as structured latents in a stand-in encoding, with condition tokens that name the pattern, and a
judge that says which pattern a sampled latent shows by its distance to every pattern's template.

- Patterns (:data:`PATTERNS`): a colour (RGB in [-1, 1]) per voxel as a function of its position: uniform red,
  uniform blue, a vertical grey ramp (the base's classes) and horizontal stripes of green and white two voxels
  high (the one a LoRA teaches).
- Latents: ``coords`` [N, 3] the surface voxels of a sphere, box or cylinder of a random size on a 16³ grid (the
  structure is given, as TRELLIS's second stage is given the first's), ``feats`` [N, 8] the voxel colours through a
  fixed orthonormal projection to eight channels, scaled to unit variance (:func:`decode_colours` inverts it).
- Condition tokens: a fixed random token set per pattern (seeded) plus a little noise per object.
- The judge (:func:`judge`) knows nothing of any model: the colours decoded from a sample are compared with every
  pattern painted on the same voxels; the class is the most similar one (cosine over every voxel's colour), or
  ``None`` when even that is below ``min_cosine``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lightning_lora.checks import choice, positive_int
from lightning_lora.data.trellis import (
    COND_DIR,
    SLAT_MODEL,
    _occupancy,
    _surface,
    voxel_colour_picture,
    write_npz,
)
from lightning_lora.demos.digest import arrays_digest
from lightning_lora.fileio import atomic_directory, atomic_write_text

RESOLUTION = 16  # the structured-latent grid (TRELLIS's is 64; small enough for minutes on a CPU)
CHANNELS = 8  # as TRELLIS's structured latents
COND_TOKENS = 8
COND_DIM = 64
PATTERNS = ("red", "blue", "gradient", "stripes")
#: the classes the base is trained on, and the one a LoRA teaches it
BASE_PATTERNS = ("red", "blue", "gradient")
NEW_PATTERN = "stripes"
SOLIDS = ("sphere", "box", "cylinder")  # the structures the patterns are painted on
SIZE_RANGE = (0.6, 0.9)
STRIPE_VOXELS = 4  # each stripe's height in voxels
#: the grey ramp runs from black to white over heights -RAMP_HEIGHT..RAMP_HEIGHT (a box, 0.3-0.45 high each way,
#: still spans most of it)
RAMP_HEIGHT = 0.5
TOKEN_NOISE = 0.05
CLASS_TOKEN_SEED = 1  # the pattern token sets: one table for the base, the LoRA data and the judge's conditions
PROJECTION_SEED = 0
#: the judge's bar: the cosine of two different patterns on one solid is at most 0.17 (stripes vs. plain green:
#: 0.33), of a random sample's colours and any pattern ~0.03
MIN_COSINE = 0.5
MEASURE_SIZE = 0.8  # the size of the solids the judged samples are drawn on


# --------------------------------------------------------------------------- patterns, latents, conditions
def pattern_colours(pattern: str, coords: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """[N, 3] RGB in [-1, 1] of ``pattern`` on voxels ``coords`` [N, 3] (axis 2 is vertical)."""
    choice(pattern, "pattern", PATTERNS)
    z = np.asarray(coords, dtype=np.int64)[:, 2]
    out = np.empty((len(z), 3), dtype=np.float32)
    if pattern == "red":
        out[:] = (1.0, -1.0, -1.0)
    elif pattern == "blue":
        out[:] = (-1.0, -1.0, 1.0)
    elif pattern == "gradient":
        out[:] = np.clip(((z + 0.5) / resolution * 2 - 1) / RAMP_HEIGHT, -1, 1)[:, None]
    else:
        white = (z // STRIPE_VOXELS) % 2 == 1
        out[:] = np.where(white[:, None], np.float32([1, 1, 1]), np.float32([-1, 1, -1]))
    return out


def projection(channels: int = CHANNELS, seed: int = PROJECTION_SEED) -> np.ndarray:
    """[channels, 3]: orthonormal columns scaled so that colours of unit size give features of unit variance."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((channels, 3)))
    return (q * np.sqrt(channels / 3)).astype(np.float32)


def encode_colours(rgb: np.ndarray) -> np.ndarray:
    """[N, 3] colours -> [N, CHANNELS] structured-latent features."""
    return (np.asarray(rgb, np.float32) @ projection().T).astype(np.float32)


def decode_colours(feats: np.ndarray) -> np.ndarray:
    """[N, CHANNELS] features -> [N, 3] colours (the least-squares inverse of :func:`encode_colours`)."""
    p = projection()
    return (np.asarray(feats, np.float32) @ p / float(p[:, 0] @ p[:, 0])).astype(np.float32)


def class_tokens(seed: int = CLASS_TOKEN_SEED) -> np.ndarray:
    """[patterns, T, D]: the fixed token set of each pattern of ``PATTERNS``."""
    return np.random.default_rng(seed).standard_normal((len(PATTERNS), COND_TOKENS, COND_DIM)).astype(np.float32)


def _rng(pattern: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([100 + PATTERNS.index(pattern), seed])


def pattern_conditions(pattern: str, count: int, seed: int) -> np.ndarray:
    """[count, T, D]: the pattern's tokens with fresh per-object noise (``seed`` picks the noise)."""
    choice(pattern, "pattern", PATTERNS)
    noise = _rng(pattern, seed + 7919).standard_normal((count, COND_TOKENS, COND_DIM)).astype(np.float32)
    return class_tokens()[PATTERNS.index(pattern)][None] + TOKEN_NOISE * noise


def solid_coords(solid: str, size: float) -> np.ndarray:
    """[N, 3] int32: the surface voxels of a centred solid (the structure a structured latent lives on)."""
    return np.argwhere(_surface(_occupancy(solid, size, np.zeros(3), RESOLUTION))).astype(np.int32)


def pattern_objects(pattern: str, count: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` objects of one pattern: (coords [N, 3], feats [N, C], tokens [T, D]) each, solids in turn."""
    sizes = _rng(pattern, seed).uniform(*SIZE_RANGE, size=count)
    tokens = pattern_conditions(pattern, count, seed)
    out = []
    for i, size in enumerate(sizes):
        coords = solid_coords(SOLIDS[i % len(SOLIDS)], float(size))
        out.append((coords, encode_colours(pattern_colours(pattern, coords)), tokens[i]))
    return out


def patterns_digest(patterns: Sequence[str], seed: int) -> str:
    """The digest (``arrays_digest``) of one object of each solid for each pattern as ``seed`` makes them."""
    return arrays_digest(part for pattern in patterns for obj in pattern_objects(pattern, len(SOLIDS), seed)
                         for part in obj)


def write_patterns_root(folder: str | Path, patterns: Sequence[str], per_pattern: int, seed: int) -> Path:
    """A TRELLIS-layout data root (``metadata.csv``, ``latents/``, ``cond_tokens/``) of ``per_pattern`` objects of
    each pattern, written once (atomically; a complete folder is reused)."""
    folder = Path(folder).expanduser()
    if (folder / "metadata.csv").is_file():
        return folder
    with atomic_directory(folder) as tmp:
        rows = ["sha256,pattern,num_voxels,latent_" + SLAT_MODEL]
        for pattern in patterns:
            for i, (coords, feats, tokens) in enumerate(pattern_objects(pattern, per_pattern, seed)):
                sha = hashlib.sha256(f"{pattern}-{seed}-{i}".encode()).hexdigest()
                write_npz(tmp / "latents" / SLAT_MODEL / f"{sha}.npz", coords=coords, feats=feats)
                write_npz(tmp / COND_DIR / f"{sha}.npz", tokens=tokens)
                rows.append(f"{sha},{pattern},{len(coords)},True")
        atomic_write_text(tmp / "metadata.csv", "\n".join(rows) + "\n")
    return folder


# --------------------------------------------------------------------------- the judge
def judge(samples: Sequence[tuple[np.ndarray, np.ndarray]], min_cosine: float = MIN_COSINE
          ) -> tuple[list[str | None], np.ndarray]:
    """(pattern, cosine) of each (coords [N, 3], feats [N, C]) sample: the pattern painted on the same voxels whose
    colours [N, 3] are most similar to the decoded ones (cosine over all voxels and channels: blind to a uniform
    error of scale, not to a wrong colour or a wrong place), or None when even that is below ``min_cosine``."""
    named, scores = [], []
    for coords, feats in samples:
        rgb = decode_colours(feats).reshape(-1)
        cosines = []
        for pattern in PATTERNS:
            template = pattern_colours(pattern, coords).reshape(-1)
            cosines.append(float(rgb @ template / max(np.linalg.norm(rgb) * np.linalg.norm(template), 1e-12)))
        best = int(np.argmax(cosines))
        named.append(PATTERNS[best] if cosines[best] >= min_cosine else None)
        scores.append(cosines[best])
    return named, np.asarray(scores, dtype=np.float32)


def class_shares(named: Sequence[str | None], patterns: Sequence[str], per_class: int) -> dict[str, float]:
    """Share of each pattern's ``per_class`` consecutive samples judged to be that pattern."""
    positive_int(per_class, "per_class", got=True)
    return {p: float(np.mean([n == p for n in named[i * per_class:(i + 1) * per_class]]))
            for i, p in enumerate(patterns)}


# --------------------------------------------------------------------------- pictures
def colour_rgb(feats: np.ndarray) -> np.ndarray:
    """[N, 3] in [0, 1]: the decoded colours of structured-latent features (the demo preset's ``previews.colours``)."""
    return (np.clip(decode_colours(feats), -1, 1) + 1) / 2


def colour_picture(coords: np.ndarray, feats: np.ndarray, resolution: int = RESOLUTION, panel: int = 48
                   ) -> np.ndarray:
    """[3, H, W] in [0, 1]: the voxels' decoded colours seen front, side and top (``voxel_colour_picture``)."""
    return voxel_colour_picture(coords, colour_rgb(feats), resolution, panel)
