"""TRELLIS training data: the on-disk layout users bring, and a procedural demo set in that same layout.

Layout of one root (several roots are given comma-separated, as TRELLIS's ``--data_dir``)::

    metadata.csv                        sha256, ss_latent_<ss model>, latent_<slat model>, cond_rendered, ...
    ss_latents/<ss model>/<sha256>.npz  mean   [8, 16, 16, 16]   (sparse-structure latent: dense x_0)
    latents/<slat model>/<sha256>.npz   coords [N, 3] int, feats [N, 8]   (structured latent: sparse x_0)
    cond_tokens/<sha256>.npz            tokens [T, D]   (precomputed image-condition tokens, e.g. DINOv2)
    renders_cond/<sha256>/transforms.json, NNN.png     (condition renders: {"frames": [{"file_path": ...}]})

Conditioning comes from one of two places (``cond``): ``tokens`` reads the precomputed tokens (our fast path),
``images`` reads a condition render as TRELLIS does (a random view in training, the first in validation;
cropped to 1.2x the alpha bounding box, resized to ``image_size``, RGB premultiplied by alpha, i.e. composited
on black) and the head encodes it on the fly with its DINOv2 image encoder, a large model forward per sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lora.checks import choice, fraction
from lightning_lora.data.text import read_utf8
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes, atomic_write_text

SS_MODEL = "ss_enc_conv3d_16l8_fp16"
SLAT_MODEL = "dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16"
COND_DIR = "cond_tokens"
RENDERS_DIR = "renders_cond"
KINDS = ("ss", "slat")
CONDS = ("tokens", "images")
CROP_RATIO = 1.2  # TRELLIS crops condition renders to 1.2x the alpha bounding box


def trellis_batch_kind(kind: str, cond: str) -> str:
    """The batches of ``data.kind`` latents with ``data.cond`` conditions (as heads name them in ``batch_kinds``)."""
    choice(kind, "data.kind", KINDS)
    choice(cond, "data.cond", CONDS)
    how = " (encoded by model.image_encoder)" if cond == "images" else ""
    return f"TRELLIS {kind} latents with condition {cond}{how}"


# --------------------------------------------------------------------------- reading
def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def read_metadata(root: Path, column: str, max_num_voxels: int | None = None, also: str | None = None) -> list[str]:
    """sha256 of every row whose ``column`` says the latent exists and, when the metadata has a
    ``num_voxels`` column, with at most ``max_num_voxels`` voxels (as TRELLIS filters its metadata); when the
    metadata has the column ``also`` (e.g. ``cond_rendered``), that one must be true too."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise UserError(f"data root {root} has no metadata.csv (a TRELLIS dataset root holds metadata.csv)")
    reader = _csv_rows(meta)
    fields = reader.fieldnames or []
    if "sha256" not in fields or column not in fields:
        raise UserError(f"{meta}: needs columns 'sha256' and '{column}'; found {', '.join(fields) or 'none'}")
    limit = max_num_voxels if max_num_voxels and "num_voxels" in fields else None
    also = also if also in fields else None
    return [
        row["sha256"] for row in reader
        if _truthy(row[column]) and (limit is None or _csv_number(row, "num_voxels", meta, reader) <= limit)
        and (also is None or _truthy(row[also]))
    ]


def _csv_rows(meta: Path) -> csv.DictReader:
    """A reader over a UTF-8 CSV file (an undecodable byte names the file, line and offset)."""
    return csv.DictReader(io.StringIO(read_utf8(meta), newline=""))


def _csv_number(row: Mapping[str, str | None], column: str, meta: Path, reader: csv.DictReader) -> float:
    """The number in ``row[column]`` (an empty cell is 0); anything else names the file, line, column and value."""
    value = (row.get(column) or "").strip()
    try:
        number = float(value or 0)
    except ValueError:
        number = float("nan")
    if number != number:  # not a number, or NaN spelled out: no filter can compare it
        raise UserError(f"{meta} line {reader.line_num}: column '{column}' must be a number, got {value!r}")
    return number


def rendered_objects(root: Path) -> list[str]:
    """sha256 of every object of ``root``'s metadata.csv that has condition renders (``cond_rendered`` true, when the
    metadata has that column), in metadata order."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise UserError(f"{root} has no metadata.csv (a TRELLIS dataset root holds metadata.csv and {RENDERS_DIR}/)")
    reader = _csv_rows(meta)
    if "sha256" not in (reader.fieldnames or []):
        raise UserError(f"{meta}: needs a 'sha256' column; found {', '.join(reader.fieldnames or []) or 'none'}")
    return [row["sha256"] for row in reader if "cond_rendered" not in row or _truthy(row["cond_rendered"])]


def _npz(path: Path, *keys: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file (all of them when none is named); a missing key names the file, the
    key and the keys it holds."""
    if not path.is_file():
        raise UserError(f"missing data file: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):  # a plain .npy saved under an .npz name
                raise ValueError("an .npy array, not an .npz archive of named arrays")
            if missing := [k for k in keys if k not in data.files]:
                raise UserError(f"{path}: no array '{missing[0]}' (it holds {', '.join(data.files) or 'none'}; "
                                f"needs {', '.join(keys)})")
            return {k: data[k] for k in (keys or data.files)}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"unreadable data file: {path} ({type(exc).__name__}: {exc})") from None


def prepare_cond_image(image: Any, size: int) -> torch.Tensor:
    """A condition render as TRELLIS feeds it to DINOv2: float [3, size, size] in [0, 1].

    An image with alpha is cropped to a square of 1.2x its alpha bounding box (around the box centre; the
    area outside the picture counts as transparent), resized with Lanczos, and its RGB multiplied by alpha
    (composited on black). An image without alpha is only resized.
    """
    from PIL import Image

    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        ys, xs = np.nonzero(np.asarray(image.getchannel("A")))
        if len(xs):
            cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
            half = max(xs.max() - xs.min(), ys.max() - ys.min()) / 2 * CROP_RATIO
            image = image.crop((int(cx - half), int(cy - half), int(cx + half), int(cy + half)))
        image = image.resize((size, size), Image.Resampling.LANCZOS)
        rgba = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return rgba[:3] * rgba[3:]
    image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def read_cond_image(path: Path, size: int) -> torch.Tensor:
    """Read one image file and prepare it (``prepare_cond_image``), naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"missing condition image: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return prepare_cond_image(image, size)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"unreadable condition image: {path} ({exc})") from None


def _missing_renders(transforms: Path) -> UserError:
    what = "folder" if not transforms.parent.is_dir() else "file"
    return UserError(f"missing condition renders {what}: {transforms.parent if what == 'folder' else transforms} "
                     f"(data.cond=images reads {RENDERS_DIR}/<sha256>/transforms.json and its images)")


def cond_views(folder: Path) -> list[Path]:
    """The image files of one object's condition renders, in ``transforms.json`` order."""
    transforms = folder / "transforms.json"
    if not transforms.is_file():
        raise _missing_renders(transforms)
    text = read_utf8(transforms)  # an undecodable byte: file, line and offset
    try:
        frames = json.loads(text)["frames"]
        views = [folder / frame["file_path"] for frame in frames]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"unreadable condition renders: {transforms} (needs {{\"frames\": [{{\"file_path\": "
                        f"...}}]}}; {type(exc).__name__}: {exc})") from None
    if not views:
        raise UserError(f"no condition renders: {transforms} lists no frames")
    return views


class TrellisLatents(Dataset):
    """One item per (root, sha256): the latent x_0 (dense or sparse) and the condition (tokens or an image)."""

    def __init__(self, items: list[tuple[Path, str]], kind: str, latent_model: str, resolution: int,
                 normalization: dict[str, Sequence[float]] | None, cond: str = "tokens", image_size: int = 518,
                 random_view: bool = True) -> None:
        self.items, self.kind, self.latent_model, self.resolution = items, kind, latent_model, resolution
        self.cond, self.image_size, self.random_view = cond, image_size, random_view
        self.mean = self.std = None
        if normalization:
            self.mean = torch.tensor(normalization["mean"], dtype=torch.float32)
            self.std = torch.tensor(normalization["std"], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.items)

    def paths(self, index: int) -> tuple[Path, Path]:
        """The latent file and the condition file (token .npz, or the renders' ``transforms.json``)."""
        root, sha = self.items[index]
        folder = "ss_latents" if self.kind == "ss" else "latents"
        cond = root / RENDERS_DIR / sha / "transforms.json" if self.cond == "images" else root / COND_DIR / f"{sha}.npz"
        return root / folder / self.latent_model / f"{sha}.npz", cond

    def latent_keys(self) -> tuple[str, ...]:
        return ("mean",) if self.kind == "ss" else ("coords", "feats")

    def check_format(self, index: int) -> None:
        """Read item ``index``'s arrays: a data set in another format (a latent without ``coords``, tokens under
        another name) fails at setup, naming the file and the key, not mid-epoch after the model loaded."""
        latent_path, cond_path = self.paths(index)
        _npz(latent_path, *self.latent_keys())
        if self.cond == "tokens":
            _npz(cond_path, "tokens")

    def _condition(self, cond_path: Path) -> dict[str, torch.Tensor]:
        if self.cond == "tokens":
            return {"cond": torch.from_numpy(_npz(cond_path, "tokens")["tokens"]).float()}
        views = cond_views(cond_path.parent)
        # TRELLIS draws a random view per sample; validation keeps the first so its loss is comparable.
        view = int(torch.randint(len(views), ())) if self.random_view else 0
        return {"cond_image": read_cond_image(views[view], self.image_size)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        latent_path, cond_path = self.paths(index)
        latent = _npz(latent_path, *self.latent_keys())
        item = self._condition(cond_path)
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
    """Dense latents are stacked; sparse ones concatenated with the batch index prepended to coords; condition
    tokens (``cond``) or images (``cond_image``) are stacked."""
    if not samples:
        raise UserError("empty batch: the data set yielded no samples")
    key = "cond_image" if "cond_image" in samples[0] else "cond"
    batch = {key: torch.stack([s[key] for s in samples])}
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
    """TRELLIS latents + conditions from one or more roots, split into train/val by sha256 hash.

    ``cond="tokens"`` reads precomputed condition tokens (batch key ``cond``); ``cond="images"`` reads the
    condition renders (batch key ``cond_image``, float [B, 3, image_size, image_size]) for a head with an
    image encoder (``model.image_encoder``).
    """

    @classmethod
    def batch_kind(cls, cfg: Mapping[str, Any]) -> str:
        """What the module built from ``cfg`` yields (``train.run`` checks it against the head's ``batch_kinds``)."""
        return trellis_batch_kind(cfg.get("kind", "slat"), cfg.get("cond", "tokens"))

    def __init__(self, roots: str | Sequence[str], kind: str = "slat", latent_model: str | None = None,
                 resolution: int = 64, normalization: dict[str, Sequence[float]] | None = None,
                 max_num_voxels: int = 32768, batch_size: int = 4, val_batch_size: int | None = None,
                 val_fraction: float = 0.1, num_workers: int = 0, cond: str = "tokens", image_size: int = 518) -> None:
        super().__init__()
        choice(kind, "data.kind", KINDS)
        choice(cond, "data.cond", CONDS)
        if not image_size > 0:
            raise UserError(f"data.image_size={image_size} must be a positive number of pixels (518 for DINOv2-L)")
        if isinstance(roots, str):
            roots = [r for r in roots.split(",") if r]
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.is_dir():
                raise UserError(f"data.roots: no such directory: {root}")
        fraction(val_fraction, "data.val_fraction")
        self.kind = kind
        self.latent_model = latent_model or (SS_MODEL if kind == "ss" else SLAT_MODEL)
        self.resolution, self.normalization, self.max_num_voxels = resolution, normalization, max_num_voxels
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.cond, self.image_size = cond, image_size
        self.train_set: TrellisLatents | None = None
        self.val_set: TrellisLatents | None = None

    def _column(self) -> str:
        return f"{'ss_latent' if self.kind == 'ss' else 'latent'}_{self.latent_model}"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        limit = self.max_num_voxels if self.kind == "slat" else None
        also = "cond_rendered" if self.cond == "images" else None  # TRELLIS keeps rows with renders only
        items = [(root, sha) for root in self.roots for sha in read_metadata(root, self._column(), limit, also)]
        if not items:
            raise UserError(f"no samples with {self._column()} in {', '.join(map(str, self.roots))}")
        is_val = [int(hashlib.sha1(sha.encode()).hexdigest(), 16) % 1000 < self.val_fraction * 1000 for _, sha in items]
        make = lambda chosen, random_view: TrellisLatents(  # noqa: E731
            chosen, self.kind, self.latent_model, self.resolution, self.normalization, self.cond, self.image_size,
            random_view,
        )
        self.train_set = make([it for it, v in zip(items, is_val, strict=True) if not v], True)
        self.val_set = make([it for it, v in zip(items, is_val, strict=True) if v], False)
        if not len(self.train_set):  # else every epoch would be empty: Lightning ends fit at once, untrained
            raise UserError(f"data.val_fraction={self.val_fraction} puts all {len(items)} samples of "
                            f"{self.data_source()} in validation; lower it or add samples")
        for dataset in (self.train_set, self.val_set):  # name a missing file now, not mid-epoch
            for i in range(len(dataset)):
                latent_path, cond_path = dataset.paths(i)
                if not latent_path.is_file():
                    raise UserError(f"missing data file: {latent_path}")
                if not cond_path.is_file():
                    raise _missing_renders(cond_path) if self.cond == "images" else UserError(
                        f"missing data file: {cond_path}")
        self.train_set.check_format(0)  # one file's keys: cheap, and a wrong format is a whole-set mistake

    def data_source(self) -> str:
        """Where the training samples come from (named when an epoch yields no batch)."""
        return f"data.roots={','.join(map(str, self.roots))}"

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
        if demo_format(folder) < DEMO_FORMAT:  # absent, or written by an older version (no renders)
            make_trellis_demo(folder, n=num_shapes, resolution=resolution, cond_tokens=cond_tokens, cond_dim=cond_dim)
        super().__init__(str(folder), kind=kind, resolution=resolution, **kwargs)


# --------------------------------------------------------------------------- voxel pictures
# (name, depth axis, seen from its high end, horizontal axis, vertical axis); z is up, as in TRELLIS.
VIEWS = (("front", 1, False, 0, 2), ("side", 0, False, 1, 2), ("top", 2, True, 0, 1))
PANEL_GAP = 4  # pixels between the panels of a voxel picture
GAP_VALUE = 64
RENDER_COLOR = np.array([230, 160, 90], dtype=np.float32)  # the demo renders' surface colour


def project_voxels(occ: np.ndarray, view: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic first-hit projection of a boolean grid [R, R, R] along one of ``VIEWS``.

    Returns (shade, hit), both [R, R]: row 0 is the top (highest vertical coordinate), column 0 the lowest
    horizontal coordinate; ``shade`` is 1.0 where the nearest layer is hit, falling linearly to 0.4 for the
    farthest layer, and 0 where the ray meets nothing.
    """
    _, depth_axis, from_high, h_axis, v_axis = view
    volume = np.transpose(np.asarray(occ, dtype=bool), (v_axis, h_axis, depth_axis))
    if from_high:
        volume = volume[:, :, ::-1]
    hit = volume.any(axis=2)
    depth = volume.argmax(axis=2)  # index of the first occupied voxel along the ray
    shade = np.where(hit, 1.0 - 0.6 * depth / max(volume.shape[2] - 1, 1), 0.0)
    return shade[::-1], hit[::-1]


def voxel_picture(grids: Sequence[np.ndarray] | np.ndarray, panel: int = 128) -> Any:
    """A grey-scale PIL image of voxel grids: one row per grid, its front, side and top projections side by side
    (``project_voxels``), each voxel a block of ``max(1, panel // R)`` pixels, panels ``PANEL_GAP`` apart."""
    from PIL import Image

    grids = [np.asarray(grids, dtype=bool)] if np.ndim(grids) == 3 else [np.asarray(g, dtype=bool) for g in grids]
    res = grids[0].shape[0]
    scale = max(1, panel // res)
    size = res * scale
    width, height = len(VIEWS) * size + (len(VIEWS) - 1) * PANEL_GAP, len(grids) * size + (len(grids) - 1) * PANEL_GAP
    canvas = np.full((height, width), GAP_VALUE, dtype=np.uint8)
    for row, grid in enumerate(grids):
        for col, view in enumerate(VIEWS):
            shade, _ = project_voxels(grid, view)
            block = np.round(255 * shade).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            top, left = row * (size + PANEL_GAP), col * (size + PANEL_GAP)
            canvas[top:top + size, left:left + size] = block
    return Image.fromarray(canvas, mode="L")


def voxel_colour_picture(coords: np.ndarray, rgb: np.ndarray, resolution: int, panel: int = 128) -> np.ndarray:
    """[3, H, W] in [0, 1]: voxels ``coords`` [N, 3] in their colours ``rgb`` [N, 3] (in [0, 1]) seen front, side and
    top (``VIEWS``): each pixel the colour of the first voxel its ray meets, darkened with depth as
    ``project_voxels`` shades; panels ``PANEL_GAP`` apart on the picture's grey."""
    coords = np.asarray(coords, dtype=np.int64)
    volume = np.zeros((resolution,) * 3 + (3,), dtype=np.float32)
    occ = np.zeros((resolution,) * 3, dtype=bool)
    volume[tuple(coords.T)] = rgb
    occ[tuple(coords.T)] = True
    scale = max(1, panel // resolution)
    size = resolution * scale
    width = len(VIEWS) * size + (len(VIEWS) - 1) * PANEL_GAP
    canvas = np.full((3, size, width), GAP_VALUE / 255, dtype=np.float32)
    for col, view in enumerate(VIEWS):
        shade, hit = project_voxels(occ, view)
        _, depth_axis, from_high, h_axis, v_axis = view
        colours = np.transpose(volume, (v_axis, h_axis, depth_axis, 3))
        mask = np.transpose(occ, (v_axis, h_axis, depth_axis))
        if from_high:
            colours, mask = colours[:, :, ::-1], mask[:, :, ::-1]
        first = mask.argmax(axis=2)
        seen = np.take_along_axis(colours, first[:, :, None, None], axis=2)[:, :, 0][::-1]
        image = np.where(hit[..., None], seen * (0.5 + 0.5 * shade[..., None]), 0.0).transpose(2, 0, 1)
        left = col * (size + PANEL_GAP)
        canvas[:, :, left:left + size] = image.repeat(scale, 1).repeat(scale, 2)
    return canvas


def colour_image(picture: np.ndarray) -> Any:
    """A [3, H, W] picture in [0, 1] as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(np.round(255 * np.clip(picture, 0, 1)).astype(np.uint8).transpose(1, 2, 0), mode="RGB")


def feature_colours(feats: np.ndarray) -> np.ndarray:
    """[N, 3] in [0, 1]: voxel features [N, C] as colours, the usual picture of a feature field: their first three
    principal directions over the object, each scaled to [0, 1] and signed so that its largest loading is positive
    (the same features always give the same colours). A direction with no spread stays mid-grey."""
    x = np.asarray(feats, dtype=np.float64).reshape(len(feats), -1)
    x = x - x.mean(axis=0) if len(x) else x
    rgb = np.full((len(x), 3), 0.5)
    if len(x) < 2:
        return rgb.astype(np.float32)
    _, spread, directions = np.linalg.svd(x, full_matrices=False)
    for i in range(min(3, len(spread))):
        if spread[i] <= 1e-6 * spread[0]:
            break
        direction = directions[i] * np.sign(directions[i][np.argmax(np.abs(directions[i]))])
        score = x @ direction
        rgb[:, i] = (score - score.min()) / (score.max() - score.min())
    return rgb.astype(np.float32)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def render_cond_view(occ: np.ndarray, view: tuple, size: int) -> Any:
    """A demo condition render: the projection of ``occ`` along ``view`` as an RGBA image (shaded surface
    colour, alpha = silhouette), ``size`` pixels square."""
    from PIL import Image

    shade, hit = project_voxels(occ, view)
    rgba = np.concatenate([shade[..., None] * RENDER_COLOR, 255.0 * hit[..., None]], axis=2)
    image = Image.fromarray(np.round(rgba).astype(np.uint8), mode="RGBA")
    return image.resize((size, size), Image.Resampling.NEAREST)


def slat_occupancy(coords: np.ndarray, resolution: int) -> np.ndarray:
    """Boolean grid [R, R, R] with the voxels ``coords`` [N, 3] set."""
    occ = np.zeros((resolution,) * 3, dtype=bool)
    occ[tuple(np.asarray(coords, dtype=np.int64).T)] = True
    return occ


# --------------------------------------------------------------------------- procedural demo set
SHAPES = ("sphere", "box", "cylinder", "torus")
DEMO_FORMAT = 2  # 2: condition renders (renders_cond/) and demo.json


def demo_format(folder: Path) -> int:
    """Format version of a generated demo folder (0: none there; 1: tokens only, written before renders)."""
    if not (folder / "metadata.csv").is_file():
        return 0
    try:
        return int(json.loads((folder / "demo.json").read_text())["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def demo_ss_projection(channels: int = 8, seed: int = 0) -> np.ndarray:
    """The fixed random projection [channels, 1] the demo uses as its stand-in sparse-structure encoder."""
    return np.random.default_rng(seed).standard_normal((channels, 1)).astype(np.float32)


def decode_demo_ss(latent: np.ndarray, seed: int = 0) -> np.ndarray:
    """Invert the demo's stand-in SS encoding: a latent [C, R, R, R] to occupancy [R, R, R] (voxels more than
    half full). The encoding is ``projection * (2 * pooled - 1)``; projecting back onto it gives 2·pooled - 1."""
    latent = np.asarray(latent, dtype=np.float32)
    projection = demo_ss_projection(latent.shape[0], seed)[:, 0]
    centred = np.tensordot(projection, latent, axes=(0, 0)) / float(projection @ projection)
    return centred > 0


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
                      channels: int = 8, cond_tokens: int = 8, cond_dim: int = 64, seed: int = 0,
                      render_size: int = 64) -> Path:
    """Write a small deterministic TRELLIS-layout data set of voxelised primitives.

    Latents are stand-ins, not a real VAE's: SLat feats are smooth functions of position and surface normal,
    the SS latent is pooled occupancy through a fixed random projection (``demo_ss_projection``; inverted by
    ``decode_demo_ss``), and the condition tokens embed the shape type and its size (what an image of it would
    tell), so the condition is informative. The condition renders (``renders_cond/<sha256>/``) are shaded
    orthographic projections (front, side, top; ``render_size`` pixels, RGBA with the silhouette as alpha).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((channels, 1)).astype(np.float32)  # == demo_ss_projection(channels, seed)
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
        renders = root / RENDERS_DIR / sha
        frames = []
        for v, view in enumerate(VIEWS):
            atomic_write_bytes(renders / f"{v:03d}.png", png_bytes(render_cond_view(occ, view, render_size)))
            frames.append({"file_path": f"{v:03d}.png", "view": view[0]})
        atomic_write_text(renders / "transforms.json", json.dumps({"camera": "orthographic", "frames": frames}))
        rows.append({"sha256": sha, "shape": SHAPES[kind], "num_voxels": len(coords), "cond_rendered": True,
                     f"ss_latent_{SS_MODEL}": True, f"latent_{SLAT_MODEL}": True})
    lines = [",".join(rows[0])] + [",".join(str(v) for v in row.values()) for row in rows]
    description = {"format": DEMO_FORMAT, "resolution": resolution, "ss_resolution": ss_resolution,
                   "channels": channels, "seed": seed, "render_size": render_size, "views": [v[0] for v in VIEWS]}
    atomic_write_text(root / "demo.json", json.dumps(description, indent=1) + "\n")
    atomic_write_text(root / "metadata.csv", "\n".join(lines) + "\n")  # last: marks the set complete
    return root


def write_npz(path: str | Path, **arrays: Any) -> None:
    """``np.savez`` through a temporary file and a rename."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
