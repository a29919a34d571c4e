"""Plain helpers shared by several test modules (data builders and small models); fixtures live in conftest.py.

No test module imports another test module: what two of them need lives here, in ``tiny.py`` (the code-built
tiny head) or in ``families.py`` (the family matrix)."""

from __future__ import annotations

import errno
import io
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader


# ---------------------------------------------------------------------------- validation
def validated_loss(module, batches: list) -> float:
    """``val/loss`` of one Lightning validation pass of ``module`` over these ready-made batches."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, DataLoader(batches, batch_size=None))
    return trainer.callback_metrics["val/loss"].item()


# ---------------------------------------------------------------------------- run directories
def adapter_file_shapes(run_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every adapter file a run wrote (snapshots and the family's own formats): relative path -> key -> shape."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(run_dir).rglob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out[str(path.relative_to(run_dir))] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    return out


# ---------------------------------------------------------------------------- embedding batches
TEXT_BATCH = {
    "query": ["sort a list", "open a file", "parse json", "join paths", "read csv", "hash bytes"],
    "positive": ["def sort(xs): ...", "def open_file(p): ...", "def parse(s): ...", "def join(a, b): ...",
                 "def read_csv(p): ...", "def digest(b): ..."],
    "negatives": [["def shuffle(xs): ..."], ["def close(f): ..."], ["def dump(o): ..."], ["def split(p): ..."],
                  ["def write_csv(p): ..."], ["def encode(s): ..."]],
}


def image_text_batch(pictures: list[str]) -> dict[str, list]:
    """Text queries against image documents: both towers (and their LoRA) take part."""
    return {"query": ["a cat", "a red square", "noise"], "positive": [{"image": p} for p in pictures]}


# ---------------------------------------------------------------------------- diffusion batches
def image_batches(n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Captioned 32x32 images in [-1, 1], as the Stable Diffusion head takes them."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"pixel_values": torch.rand(3, 32, 32, generator=g) * 2 - 1, "text": f"a handwritten digit {i % 10}",
             "index": i} for i in range(n)]

    def collate(items):
        return {"pixel_values": torch.stack([r["pixel_values"] for r in items]), "text": [r["text"] for r in items],
                "index": torch.tensor([r["index"] for r in items])}

    return DataLoader(rows, batch_size=batch_size, collate_fn=collate)


def pairs(n: int = 4, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Source/target image pairs for the LBM head (the target is the inverted source)."""
    g = torch.Generator().manual_seed(seed)
    source = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return {"source": source, "target": -source, "index": torch.arange(n)}


# ---------------------------------------------------------------------------- TRELLIS
def random_coords(batch: int, res: int, n: int, seed: int = 0, shuffle_rows: bool = True) -> torch.Tensor:
    """``n`` distinct voxels per item, batch-major; rows inside an item in random (not raster) order."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        lin = torch.randperm(res**3, generator=g)[:n]
        if not shuffle_rows:
            lin = lin.sort().values
        xyz = torch.stack([lin // res**2, (lin // res) % res, lin % res], dim=1)
        rows.append(torch.cat([torch.full((n, 1), b), xyz], dim=1))
    return torch.cat(rows)


# ---------------------------------------------------------------------------- extraction: a small net and deltas
def low_rank(shape: tuple[int, ...], r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], math.prod(shape[1:])
    return (torch.randn(out, r, generator=g) @ torch.randn(r, rest, generator=g)).reshape(shape)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 8, 1)


class Net(nn.Module):
    """`proj` and `block.proj` share a suffix: exact target names matter."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 16)
        self.block = Block()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):  # x [B, 3, 5, 5]
        h = self.block.proj(self.proj(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        h = self.block.pw(self.block.conv(h))
        return self.norm(h.permute(0, 2, 3, 1))


def net_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, tuned) state dicts of ``Net``: low-rank deltas on proj, block.conv, block.pw; the norm moved too."""
    torch.manual_seed(seed)
    base = {k: v.clone() for k, v in Net().state_dict().items()}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["proj.weight"] += low_rank((16, 3), 2, seed + 1)
    tuned["block.conv.weight"] += low_rank((8, 16, 3, 3), 3, seed + 2)
    tuned["block.pw.weight"] += 0.1 * low_rank((8, 8, 1, 1), 2, seed + 3)
    tuned["norm.weight"] += 0.5  # 1-D: not a LoRA target
    return base, tuned


def net_with(state: dict[str, torch.Tensor]) -> Net:
    """A ``Net`` in eval mode holding ``state``."""
    net = Net().eval()
    net.load_state_dict(state)
    return net


# ---------------------------------------------------------------------------- the hostile-input matrix
def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) by relative path, with its bytes: compare before and after a
    failing command to prove nothing was written, replaced or left behind."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_error_line(rc: int, err: str, needle: str, *, code: int = 2, case: str = "") -> None:
    """A user error as the house prints it: exit ``code``, no traceback, and the last line of stderr is one
    ``error:`` line that contains ``needle`` (the bad value or the file it is in)."""
    lines = err.strip().splitlines()
    assert rc == code, (case, rc, err[-3000:])
    assert "Traceback" not in err, (case, err[-3000:])
    assert lines and lines[-1].startswith("error: "), (case, err[-3000:])
    assert needle in lines[-1], (case, needle, lines[-1])


def train_main(argv: list[str]) -> int:
    """``python -m lightning_lora.train ARGV`` in this process (Hydra's own entry point, so Hydra's parsing,
    run directory and error handling are the ones users get); returns the exit status."""
    import logging
    import sys
    from unittest import mock

    from lightning_lora.train import main

    # Hydra points the root and "hydra" loggers at this test's captured streams; put them back afterwards, or later
    # tests log into closed streams ("--- Logging error ---")
    loggers = [logging.getLogger(), logging.getLogger("hydra")]
    saved = [(lg.handlers[:], lg.level) for lg in loggers]
    try:
        with mock.patch.object(sys, "argv", ["lightning_lora.train", *map(str, argv)]):
            try:
                main()
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 0
    finally:
        for lg, (handlers, level) in zip(loggers, saved, strict=True):
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)


# ---------------------------------------------------------------------------- a full disk
class FullDisk(io.RawIOBase):
    """A file object whose writes fail with ENOSPC after ``room`` bytes (what a full disk does)."""

    def __init__(self, fd: int, room: int = 100) -> None:
        self.fd, self.room = fd, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = min(len(data), self.room)
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.write(self.fd, bytes(data[:n]))
        self.room -= n
        return n

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def assert_trellis_base_built_once(ensure, built: Path, again: Path, model_class: str) -> None:
    """A demo base ``ensure(folder, steps=2, log=...)`` wrote ``built`` as a TRELLIS checkpoint pair of
    ``model_class``; built again into ``again`` it is the same bytes, and a third call reuses it without training."""
    import json

    assert built.name == "denoiser.safetensors" and built.with_suffix(".json").is_file()
    assert json.loads(built.with_suffix(".json").read_text())["name"] == model_class
    second = Path(ensure(again, steps=2, log=lambda line: None))
    assert second.read_bytes() == built.read_bytes()
    logged: list[str] = []
    assert ensure(again, steps=2, log=logged.append) == str(second)
    assert logged == []  # built: reused, not trained again
