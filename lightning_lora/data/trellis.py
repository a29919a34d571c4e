"""TRELLIS training data: the on-disk layout users bring, and a procedural demo set in that same layout.

Layout of one root (several roots are given comma-separated, as TRELLIS's ``--data_dir``)::

    metadata.csv                        sha256, ss_latent_<ss model>, latent_<slat model>, cond_rendered, ...
    ss_latents/<ss model>/<sha256>.npz  mean   [8, 16, 16, 16]   (sparse-structure latent: dense x_0)
    latents/<slat model>/<sha256>.npz   coords [N, 3] int, feats [N, 8]   (structured latent: sparse x_0)
    cond_tokens/<sha256>.npz            tokens [T, D]   (precomputed image-condition tokens, e.g. DINOv2)

The condition tokens are our fast path: TRELLIS computes DINOv2 features from ``renders_cond/`` images on
the fly, which costs a large model forward per sample; storing them once makes LoRA runs cheap.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes, atomic_write_text

SS_MODEL = "ss_enc_conv3d_16l8_fp16"
SLAT_MODEL = "dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16"
COND_DIR = "cond_tokens"
KINDS = ("ss", "slat")


# --------------------------------------------------------------------------- reading
def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def read_metadata(root: Path, column: str, max_num_voxels: int | None = None) -> list[str]:
    """sha256 of every row whose ``column`` says the latent exists and, when the metadata has a
    ``num_voxels`` column, with at most ``max_num_voxels`` voxels (as TRELLIS filters its metadata)."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise UserError(f"data root {root} has no metadata.csv (a TRELLIS dataset root holds metadata.csv)")
    with meta.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "sha256" not in fields or column not in fields:
            raise UserError(f"{meta}: needs columns 'sha256' and '{column}'; found {', '.join(fields) or 'none'}")
        limit = max_num_voxels if max_num_voxels and "num_voxels" in fields else None
        return [
            row["sha256"] for row in reader
            if _truthy(row[column]) and (limit is None or int(float(row["num_voxels"] or 0)) <= limit)
        ]


def _npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"missing data file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable data file: {path} ({exc})") from None


class TrellisLatents(Dataset):
    """One item per (root, sha256): the latent x_0 (dense or sparse) and the condition tokens."""

    def __init__(self, items: list[tuple[Path, str]], kind: str, latent_model: str, resolution: int,
                 normalization: dict[str, Sequence[float]] | None) -> None:
        self.items, self.kind, self.latent_model, self.resolution = items, kind, latent_model, resolution
        self.mean = self.std = None
        if normalization:
            self.mean = torch.tensor(normalization["mean"], dtype=torch.float32)
            self.std = torch.tensor(normalization["std"], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.items)

    def paths(self, index: int) -> tuple[Path, Path]:
        root, sha = self.items[index]
        folder = "ss_latents" if self.kind == "ss" else "latents"
        return root / folder / self.latent_model / f"{sha}.npz", root / COND_DIR / f"{sha}.npz"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        latent_path, cond_path = self.paths(index)
        latent, cond = _npz(latent_path), _npz(cond_path)
        item = {"cond": torch.from_numpy(cond["tokens"]).float()}
        if self.kind == "ss":
            item["x0"] = torch.from_numpy(latent["mean"]).float()
            return item
        coords = torch.from_numpy(latent["coords"]).long()
        if coords.ndim != 2 or coords.shape[1] != 3 or coords.min() < 0 or coords.max() >= self.resolution:
            raise UserError(
                f"{latent_path}: coords must be [N, 3] inside [0, {self.resolution}); got shape "
                f"{tuple(coords.shape)}, range [{int(coords.min())}, {int(coords.max())}]"
            )
        feats = torch.from_numpy(latent["feats"]).float()
        if self.mean is not None:
            feats = (feats - self.mean) / self.std
        return {**item, "coords": coords, "feats": feats}


def collate_trellis(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Dense latents are stacked; sparse ones concatenated with the batch index prepended to coords."""
    if not samples:
        raise UserError("empty batch: the data set yielded no samples")
    batch = {"cond": torch.stack([s["cond"] for s in samples])}
    if "x0" in samples[0]:
        batch["x0"] = torch.stack([s["x0"] for s in samples])
        return batch
    batch["coords"] = torch.cat([
        torch.cat([torch.full((len(s["coords"]), 1), i, dtype=torch.long), s["coords"]], 1)
        for i, s in enumerate(samples)
    ])
    batch["feats"] = torch.cat([s["feats"] for s in samples])
    return batch


class TrellisDataModule(pl.LightningDataModule):
    """TRELLIS latents + condition tokens from one or more roots, split into train/val by sha256 hash."""

    def __init__(self, roots: str | Sequence[str], kind: str = "slat", latent_model: str | None = None,
                 resolution: int = 64, normalization: dict[str, Sequence[float]] | None = None,
                 max_num_voxels: int = 32768, batch_size: int = 4, val_batch_size: int | None = None,
                 val_fraction: float = 0.1, num_workers: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise UserError(f"data.kind={kind!r} is unknown; valid: {', '.join(KINDS)}")
        if isinstance(roots, str):
            roots = [r for r in roots.split(",") if r]
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise UserError(f"data.roots: no such directory: {root}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        self.kind = kind
        self.latent_model = latent_model or (SS_MODEL if kind == "ss" else SLAT_MODEL)
        self.resolution, self.normalization, self.max_num_voxels = resolution, normalization, max_num_voxels
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.train_set: TrellisLatents | None = None
        self.val_set: TrellisLatents | None = None

    def _column(self) -> str:
        return f"{'ss_latent' if self.kind == 'ss' else 'latent'}_{self.latent_model}"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        limit = self.max_num_voxels if self.kind == "slat" else None
        items = [(root, sha) for root in self.roots for sha in read_metadata(root, self._column(), limit)]
        if not items:
            raise UserError(f"no samples with {self._column()} in {', '.join(map(str, self.roots))}")
        is_val = [int(hashlib.sha1(sha.encode()).hexdigest(), 16) % 1000 < self.val_fraction * 1000 for _, sha in items]
        make = lambda chosen: TrellisLatents(  # noqa: E731
            chosen, self.kind, self.latent_model, self.resolution, self.normalization
        )
        self.train_set = make([it for it, v in zip(items, is_val, strict=True) if not v])
        self.val_set = make([it for it, v in zip(items, is_val, strict=True) if v])
        for dataset in (self.train_set, self.val_set):  # name a missing file now, not mid-epoch
            for i in range(len(dataset)):
                for path in dataset.paths(i):
                    if not path.is_file():
                        raise UserError(f"missing data file: {path}")

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        drop_last = shuffle and len(dataset) >= batch_size
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, collate_fn=collate_trellis,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False) if len(self.val_set) else []


class TrellisDemoDataModule(TrellisDataModule):
    """The procedural demo set (generated on first use under ``root``), read like any TRELLIS root."""

    def __init__(self, root: str, num_shapes: int = 48, kind: str = "slat", resolution: int = 32,
                 cond_dim: int = 64, cond_tokens: int = 8, **kwargs: Any) -> None:
        folder = Path(root).expanduser() / f"n{num_shapes}_r{resolution}_c{cond_dim}_t{cond_tokens}"
        if not (folder / "metadata.csv").is_file():
            make_trellis_demo(folder, n=num_shapes, resolution=resolution, cond_tokens=cond_tokens, cond_dim=cond_dim)
        super().__init__(str(folder), kind=kind, resolution=resolution, **kwargs)


# --------------------------------------------------------------------------- procedural demo set
SHAPES = ("sphere", "box", "cylinder", "torus")


def _occupancy(shape: str, size: float, center: np.ndarray, resolution: int) -> np.ndarray:
    """Solid occupancy of a primitive on a resolution³ grid, coordinates in [-1, 1]."""
    axis = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    x, y, z = x - center[0], y - center[1], z - center[2]
    if shape == "sphere":
        return x**2 + y**2 + z**2 <= size**2
    if shape == "box":
        return (np.abs(x) <= size) & (np.abs(y) <= 0.7 * size) & (np.abs(z) <= 0.5 * size)
    if shape == "cylinder":
        return (x**2 + y**2 <= (0.6 * size) ** 2) & (np.abs(z) <= size)
    return (np.sqrt(x**2 + y**2) - 0.65 * size) ** 2 + z**2 <= (0.3 * size) ** 2  # torus


def _surface(occ: np.ndarray) -> np.ndarray:
    """Occupied voxels with at least one empty 6-neighbour: the sites a structured latent lives on."""
    padded = np.pad(occ, 1)
    inner = np.ones_like(occ)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return occ & ~inner


def make_trellis_demo(root: str | Path, n: int = 24, resolution: int = 32, ss_resolution: int = 16,
                      channels: int = 8, cond_tokens: int = 8, cond_dim: int = 64, seed: int = 0) -> Path:
    """Write a small deterministic TRELLIS-layout data set of voxelised primitives.

    Latents are stand-ins, not a real VAE's: SLat feats are smooth functions of position and surface normal,
    the SS latent is pooled occupancy through a fixed random projection, and the condition tokens embed the
    shape type and its size (what an image of it would tell), so the condition is informative.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((channels, 1)).astype(np.float32)
    shape_tokens = rng.standard_normal((len(SHAPES), cond_tokens, cond_dim)).astype(np.float32)
    size_token = rng.standard_normal((cond_tokens, cond_dim)).astype(np.float32)
    rows = []
    for i in range(n):
        kind = i % len(SHAPES)
        size = float(rng.uniform(0.45, 0.8))
        center = rng.uniform(-0.1, 0.1, size=3)
        sha = hashlib.sha256(f"{SHAPES[kind]}-{i}-{size:.4f}-{seed}".encode()).hexdigest()
        occ = _occupancy(SHAPES[kind], size, center, resolution)
        coords = np.argwhere(_surface(occ)).astype(np.int32)
        pos = (coords + 0.5) / resolution * 2 - 1
        normal = pos - center
        normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-6
        feats = np.concatenate([pos, normal, np.sin(3 * pos[:, :2])], axis=1)[:, :channels].astype(np.float32)
        pooled = occ.reshape(ss_resolution, resolution // ss_resolution, ss_resolution, resolution // ss_resolution,
                             ss_resolution, resolution // ss_resolution).mean(axis=(1, 3, 5)).astype(np.float32)
        ss = projection[:, :, None, None] * (2 * pooled[None] - 1)
        tokens = shape_tokens[kind] + size * size_token + 0.05 * rng.standard_normal((cond_tokens, cond_dim))
        write_npz(root / "latents" / SLAT_MODEL / f"{sha}.npz", coords=coords, feats=feats)
        write_npz(root / "ss_latents" / SS_MODEL / f"{sha}.npz", mean=ss.astype(np.float32))
        write_npz(root / COND_DIR / f"{sha}.npz", tokens=tokens.astype(np.float32))
        rows.append({"sha256": sha, "shape": SHAPES[kind], "num_voxels": len(coords), "cond_rendered": True,
                     f"ss_latent_{SS_MODEL}": True, f"latent_{SLAT_MODEL}": True})
    lines = [",".join(rows[0])] + [",".join(str(v) for v in row.values()) for row in rows]
    atomic_write_text(root / "metadata.csv", "\n".join(lines) + "\n")
    return root


def write_npz(path: str | Path, **arrays: Any) -> None:
    """``np.savez`` through a temporary file and a rename."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
