"""Reading and writing whole-model weights (base and tuned checkpoints) for extraction and merging.

Accepted inputs, all read lazily where the format allows (one tensor at a time from safetensors):
- a ``.safetensors`` file;
- a weights-only torch file (``.pt``/``.pth``/``.ckpt``/``.bin`` or any name): a mapping of names to tensors,
  or a Lightning-style ``{"state_dict": {...}}`` (or ``{"model_state_dict": {...}}``), loaded with
  ``torch.load(weights_only=True)``;
- a diffusers-style folder: every ``*.safetensors`` below it; with more than one file, keys are prefixed by
  the file's relative folder (``unet/diffusion_pytorch_model.safetensors`` -> ``unet.<key>``); a variant file
  (``*.fp16.safetensors``) is skipped when the plain file is next to it;
- a TRELLIS ``<name>.json`` + ``<name>.safetensors`` pair, given by either file.

A training checkpoint often keeps the model under its Lightning module's attribute (``model.<key>``) while the
released weights do not: ``align_prefix`` matches such a pair by dropping that one leading name.

The file type is told from the content, not the suffix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lightning_lora.adapters.finite import require_finite
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory, atomic_write_bytes

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_VARIANT = re.compile(r"\.(fp16|fp32|bf16|ema|non_ema)\.safetensors$")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length and a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < path.stat().st_size and head[8:9] == b"{"


#: what a whole checkpoint named by a Hub repository needs: weights and the configs beside them
WEIGHT_FILES = ("*.safetensors", "*.json", "*.yaml")


class WeightSource:
    """Named tensors of a checkpoint: ``keys()``, ``shape(key)``, ``get(key)`` (one tensor, on CPU)."""

    def __init__(self, path: str | os.PathLike):
        from lightning_lora import hub

        # a Hub repository (its safetensors and configs) or one file of it (with a TRELLIS .json beside, if any)
        self.path = hub.resolve(path, allow_patterns=WEIGHT_FILES, optional_companions=(".json",),
                                fallback_patterns=("*.bin", "*.pt", "*.ckpt"))
        self.kind = ""  # "safetensors", "torch", "folder" or "trellis"
        self.metadata: dict[str, dict[str, str]] = {}  # per file (relative name) for safetensors
        self._where: dict[str, tuple[str, str]] = {}  # key -> (file, key in that file)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[str, object] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        self._container: tuple[dict, str | None] | None = None  # torch file: (whole object, state-dict key)
        self.files: dict[str, Path] = {}
        self.prefix = ""  # a leading name dropped from every key (``drop_prefix``), put back when writing
        self._open()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise UserError(f"weights not found: {path}")
        if path.is_dir():
            self.kind = "folder"
            files = sorted(p for p in path.rglob("*.safetensors") if not p.name.startswith("."))
            files = [p for p in files if not (_VARIANT.search(p.name) and p.with_name(
                _VARIANT.sub(".safetensors", p.name)).is_file())]
            if not files:
                raise UserError(f"{path} is a folder without .safetensors files; give a weights file or a "
                                "diffusers-style folder (e.g. unet/diffusion_pytorch_model.safetensors)")
            for p in files:
                rel = p.relative_to(path)
                folder = rel.parent.as_posix()
                prefix = f"{folder.replace('/', '.')}." if len(files) > 1 and folder != "." else ""
                self._add_safetensors(p, rel.as_posix(), prefix)
            return
        if path.suffix == ".json" and path.with_suffix(".safetensors").is_file():
            path = self.path = path.with_suffix(".safetensors")  # TRELLIS pair: config + weights
        if _is_safetensors(path):
            self.kind = "trellis" if path.with_suffix(".json").is_file() else "safetensors"
            self._add_safetensors(path, path.name, "")
            return
        self.kind = "torch"
        self._tensors, self._container = _load_torch(path)
        self._shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self.files = {path.name: path}

    def _add_safetensors(self, file: Path, rel: str, prefix: str) -> None:
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        self._handles[rel] = handle
        self.files[rel] = file
        self.metadata[rel] = dict(handle.metadata() or {})
        for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
            name = prefix + key
            if name in self._where:
                raise UserError(f"tensor {name!r} is in both {self._where[name][0]} and {rel} under {self.path}")
            self._where[name] = (rel, key)
            self._shapes[name] = tuple(handle.get_slice(key).get_shape())

    # ------------------------------------------------------------------ access
    def keys(self) -> list[str]:
        return list(self._shapes)

    def __iter__(self):
        return iter(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        rel, inner = self._where[key]
        return self._handles[rel].get_tensor(inner)

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        for key in self._shapes:
            yield key, self.get(key)

    def drop_prefix(self, prefix: str) -> None:
        """Name every tensor without ``prefix`` (which every key has), e.g. a Lightning wrapper's ``model.``."""
        cut = len(prefix)
        self._shapes = {k[cut:]: v for k, v in self._shapes.items()}
        self._where = {k[cut:]: v for k, v in self._where.items()}
        if self._tensors is not None:
            self._tensors = {k[cut:]: v for k, v in self._tensors.items()}
        self.prefix += prefix

    def identity(self) -> dict[str, str]:
        """What a LoRA file records about this checkpoint: its name, format and number of tensors."""
        return {"path": self.path.name, "kind": self.kind, "tensors": str(len(self._shapes))}


def _load_torch(path: Path) -> tuple[dict[str, torch.Tensor], tuple[dict, str | None]]:
    def load(**kw):
        return torch.load(path, map_location="cpu", weights_only=True, **kw)

    try:
        try:
            obj = load(mmap=True)
        except (RuntimeError, ValueError):  # legacy (non-zip) files cannot be memory-mapped
            obj = load()
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, BadZipFile, SafetensorError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: neither a safetensors file nor a weights-only torch file ({first[:160]})") from None
    whole, inner = obj, None
    if isinstance(obj, Mapping):  # Lightning's checkpoint, or PyTorch's tutorial convention (and LBM LoRA scripts')
        inner = next((k for k in ("state_dict", "model_state_dict") if isinstance(obj.get(k), Mapping)), None)
        obj = obj[inner] if inner else obj
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path}: expected a mapping of tensor names to tensors, got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors")
    return tensors, (whole, inner)


def open_weights(path: str | os.PathLike) -> WeightSource:
    return WeightSource(path)


def align_prefix(base: WeightSource, tuned: WeightSource) -> str:
    """When one checkpoint's keys are exactly the other's under one more leading name (every key ``model.<key>``,
    as a Lightning module keeps its wrapped model), drop that name there; returns it ("" when nothing changed)."""
    for wrapped, bare in ((base, tuned), (tuned, base)):
        keys = wrapped.keys()
        first = keys[0].split(".", 1)[0] + "." if keys and "." in keys[0] else ""
        if first and all(k.startswith(first) for k in keys) and {k[len(first):] for k in keys} == set(bare.keys()):
            wrapped.drop_prefix(first)
            return first
    return ""


def _named(label: str, source: Any) -> str:
    path = getattr(source, "path", None)
    return label if path is None else f"{label} {path}"


def check_same_keys(base: Any, tuned: Any, limit: int = 3) -> None:
    """UserError naming the first differing keys or shapes of two checkpoints that should match (``WeightSource``s,
    or anything with ``keys()``, iteration and ``shape(key)``)."""
    kb, kt = set(base.keys()), set(tuned.keys())
    only_b, only_t = sorted(kb - kt), sorted(kt - kb)
    if only_b or only_t:
        parts = []
        if only_b:
            parts.append(f"{len(only_b)} only in base, e.g. {', '.join(only_b[:limit])}")
        if only_t:
            parts.append(f"{len(only_t)} only in tuned, e.g. {', '.join(only_t[:limit])}")
        raise UserError(f"{_named('base', base)} and {_named('tuned', tuned)} have different keys: " + "; ".join(parts))
    bad = [k for k in base if base.shape(k) != tuned.shape(k)]
    if bad:
        shown = ", ".join(f"{k} {list(base.shape(k))} vs {list(tuned.shape(k))}" for k in bad[:limit])
        raise UserError(f"base and tuned differ in shape for {len(bad)} tensors: {shown}")


def write_weights_like(source: WeightSource, out: str | os.PathLike, updates: Mapping[str, torch.Tensor]) -> Path:
    """Write ``source``'s tensors with ``updates`` replacing some, in the source's own format and key names.

    safetensors -> safetensors (metadata kept), torch file -> torch file (a plain mapping), folder -> folder
    (other files copied), TRELLIS pair -> pair (the ``.json`` copied next to the output ``.safetensors``).
    """
    out = Path(out)
    require_finite(updates.items(), "merged weight", hint="; nothing was written")
    if source.kind == "torch":  # the same object back: a Lightning {"state_dict": ...} keeps its other entries
        import io

        whole, inner = source._container
        state = dict(whole[inner] if inner else whole)
        state.update({source.prefix + k: v.contiguous() for k, v in updates.items()})
        obj = dict(whole, **{inner: state}) if inner else state
        buf = io.BytesIO()
        torch.save(obj, buf)
        return atomic_write_bytes(out, buf.getvalue())
    if source.kind == "folder":
        with atomic_directory(out) as tmp:
            for p in sorted(source.path.rglob("*")):
                rel = p.relative_to(source.path)
                if p.is_dir() or rel.as_posix() in source.files:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / rel)
            for rel in source.files:
                keys = [k for k, (r, _) in source._where.items() if r == rel]
                tensors = {source._where[k][1]: updates.get(k, source.get(k)).contiguous() for k in keys}
                atomic_write_bytes(tmp / rel, save(tensors, metadata=source.metadata[rel] or None))
        return out
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the base is a safetensors file, so write a .safetensors file")
    (rel,) = source.files
    tensors = {source.prefix + k: updates.get(k, v).contiguous() for k, v in source.items()}
    atomic_write_bytes(out, save(tensors, metadata=source.metadata[rel] or None))
    if source.kind == "trellis":
        cfg = source.path.with_suffix(".json")
        atomic_write_bytes(out.with_suffix(".json"), cfg.read_bytes())
    return out


def module_weights(source: WeightSource) -> dict[str, str]:
    """{module name: weight key} for every ``*.weight`` tensor with ndim >= 2 (Linear/Conv-like layers)."""
    return {k[: -len(".weight")]: k for k in source if k.endswith(".weight") and len(source.shape(k)) >= 2}


def describe(source: WeightSource) -> str:
    return json.dumps(source.identity(), sort_keys=True)
