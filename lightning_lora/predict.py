"""Embedding inference with trained adapters: ``Predictor(run_dir)`` or ``Predictor.from_pretrained(base, snapshot)``.

::

    from lightning_lora.predict import Predictor

    p = Predictor(model_path="outputs/...")                     # a run, a snapshot, its model/, or a model folder
    p = Predictor.from_pretrained("/models/clip-vit-b32", "outputs/.../adapters/final")
    q = p.encode_text(["a red cat"], role="query")             # [1, D], L2-normalised, on the CPU
    d = p.encode_image(["cat.jpg", "dog.jpg"], dim=256)         # Matryoshka: first 256 dims, re-normalised
    scores = q @ d.T
    p.merge_and_save("clip-merged")                             # transformers.AutoModel.from_pretrained loads it

The adapters are the PEFT directories a run writes (``adapters/final/<submodule>/``), loaded onto the
embedder's submodules with ``peft.PeftModel.from_pretrained``, so the numbers are the ones plain PEFT gives.
When ``adapter_dir`` lies in a run directory, the embedder is built with the settings the run trained with
(pooling, prefixes, instructions, lengths, family: the run's ``config.yaml``), so queries are encoded as in
training; keyword arguments override them, and ``base_path=None`` takes the run's ``model.pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from lightning_lora.adapters.io import WHOLE_MODEL_MARK, is_submodule_dir
from lightning_lora.checks import positive_int
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory
from lightning_lora.models.embedders import Embedder, Item, build_embedder, detect_family, quiet_transformers

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"
WHOLE_MODEL_DIR = "model"  # a snapshot's whole-model export (heads/embedding.py writes it)
#: the embedder classes a run's ``model.embedder._target_`` may name, by family
_FAMILY_OF_CLASS = {"TextEmbedder": "text", "ClipEmbedder": "clip", "Qwen3VLEmbedder": "qwen3_vl"}
#: ``model.*`` keys of the text path (no ``model.embedder``) that change how an item is encoded
_TEXT_SETTINGS = ("pooling", "query_prefix", "doc_prefix", "query_max_length", "doc_max_length", "name", "dtype")
#: embedder arguments that are about training, not encoding
_TRAINING_ONLY = ("_target_", "pretrained", "targets", "config_overrides")


def run_settings(adapter_dir: str | os.PathLike) -> tuple[str | None, str, dict[str, Any]]:
    """(base path, family, embedder keyword arguments) the run that wrote ``adapter_dir`` trained with, read
    from the ``config.yaml`` of the run directory (``<run>/adapters/<snapshot>``); ``(None, "auto", {})``
    when there is none (an adapter copied elsewhere)."""
    from omegaconf import OmegaConf

    root = Path(os.path.expanduser(str(adapter_dir))).resolve()
    found = next((d / RUN_CONFIG for d in (root.parent.parent, root.parent.parent.parent)
                  if (d / RUN_CONFIG).is_file()), None)
    if found is None:
        return None, "auto", {}
    try:
        model = OmegaConf.to_container(OmegaConf.load(found), resolve=False).get("model") or {}
    except Exception as exc:  # a damaged or foreign config.yaml: say which file, do not guess
        raise UserError(f"{found}: cannot read the run's model settings ({type(exc).__name__}: {exc}); pass "
                        "base_path, family and the embedder settings yourself") from None
    embedder = model.get("embedder")
    if isinstance(embedder, dict) and embedder.get("_target_"):
        family = _FAMILY_OF_CLASS.get(str(embedder["_target_"]).rsplit(".", 1)[-1], "auto")
        kwargs = {k: v for k, v in embedder.items() if k not in _TRAINING_ONLY}
    else:
        family = "text" if model.get("_target_", "").endswith("EmbeddingHead") else "auto"
        kwargs = {k: model[k] for k in _TEXT_SETTINGS if k in model} if family == "text" else {}
    pretrained = model.get("pretrained")
    return (str(pretrained) if isinstance(pretrained, str) and pretrained != "???" else None), family, kwargs


def find_adapters(embedder: Embedder, adapter_dir: str | os.PathLike) -> dict[str, Path]:
    """The PEFT directories in ``adapter_dir`` by submodule name.

    ``adapter_dir`` is a run's ``adapters/final`` (or ``adapters/step_N``) with one PEFT directory per adapted
    submodule, or a single PEFT directory, which then belongs to the family's only default submodule
    (``encoder`` for text, ``text`` for CLIP, ``language`` for Qwen3-VL).
    """
    root = Path(os.path.expanduser(str(adapter_dir)))
    if not root.is_dir():
        raise UserError(f"adapter_dir: no such directory: {root}")
    available = embedder.adaptable_submodules()
    if (root / ADAPTER_CONFIG).is_file():
        defaults = embedder.default_submodules(vision=False)
        if len(defaults) != 1:  # pragma: no cover - every family has one non-vision submodule
            raise UserError(f"adapter_dir={root} is a single PEFT directory; the {embedder.family} embedder has "
                            f"several submodules ({', '.join(available)}): give the run's adapters/final")
        return {defaults[0]: root}
    found = {p.name: p for p in sorted(root.iterdir()) if is_submodule_dir(p)}
    if not found:
        raise UserError(f"adapter_dir: no PEFT adapter ({ADAPTER_CONFIG}) in {root} or its subfolders; "
                        "give a run's adapters/final")
    if unknown := sorted(set(found) - set(available)):
        raise UserError(f"adapter_dir: {root / unknown[0]} is for submodule {unknown[0]!r}, which the "
                        f"{embedder.family} embedder does not have ({', '.join(available)}); wrong base model?")
    return found


def load_peft(module: torch.nn.Module, path: Path, where: str) -> PeftModel:
    """``PeftModel.from_pretrained`` (inference mode), then a check that every tensor of the file found its
    layer and every LoRA layer got its tensor: PEFT only warns, and a silently unloaded adapter would give
    the base model's embeddings."""
    from peft import get_peft_model_state_dict

    from lightning_lora.adapters.io import read_peft_dir

    read_peft_dir(path)  # invalid JSON, a NaN or an int8 tensor: one line naming the file (PEFT would take them)
    try:
        peft = PeftModel.from_pretrained(module, str(path), is_trainable=False)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"adapter {path} does not fit {where}: {first}") from None
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            saved = set(f.keys())
        loaded = set(get_peft_model_state_dict(peft))
        if missing := sorted(saved - loaded) or sorted(loaded - saved):
            raise UserError(f"adapter {path} does not fit {where}: tensor {missing[0]} has no counterpart "
                            f"({len(saved - loaded)} in the file unused, {len(loaded - saved)} layers without weights)")
    return peft


def _newest_snapshot(run: Path) -> Path:
    """A run's ``adapters/final``, or its newest ``adapters/step_N`` (a run stopped before the end)."""
    final = run / "adapters" / "final"
    if final.is_dir():
        return final
    steps = sorted((run / "adapters").glob("step_*")) if (run / "adapters").is_dir() else []
    if not steps:
        raise UserError(f"model_path={run} is a run directory without adapter snapshots (adapters/final or "
                        "adapters/step_N); did the run write any?")
    return steps[-1]


def resolve_model_path(model_path: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """(base folder, adapter snapshot) that ``Predictor(model_path)`` loads; one of them is None."""
    path = Path(os.path.expanduser(str(model_path)))
    if not path.is_dir():
        raise UserError(f"model_path={model_path}: no such directory (give a run directory, its adapters/final, "
                        "an adapters/step_N snapshot, or a model folder)")
    if (path / RUN_CONFIG).is_file() and (path / "adapters").is_dir():
        return None, _newest_snapshot(path)
    if (path / WHOLE_MODEL_MARK).is_file() or (path.name == WHOLE_MODEL_DIR and full_model_dir(path.parent)):
        return None, path.parent  # a snapshot's whole-model export: the snapshot it belongs to
    if (path / ADAPTER_CONFIG).is_file() or full_model_dir(path) or any(is_submodule_dir(d) for d in path.iterdir()):
        return None, path
    if (path / "config.json").is_file():
        return path, None
    raise UserError(f"model_path={path} holds no run, adapter snapshot, PEFT adapter or model folder (config.json)")


def full_model_dir(snapshot: Path) -> Path | None:
    """The whole model a full fine-tuning snapshot holds (``<snapshot>/model/``, a transformers folder), or None
    (a LoRA snapshot: its ``model/`` is a PEFT directory)."""
    folder = snapshot / WHOLE_MODEL_DIR
    if (folder / "config.json").is_file() and not (folder / ADAPTER_CONFIG).is_file():
        return folder
    return None


def _load(base_path: str | os.PathLike | None, adapter_dir: str | os.PathLike | None, family: str,
          device: str | torch.device | None, embedder_kwargs: Mapping[str, Any]
          ) -> tuple[Embedder, dict[str, PeftModel]]:
    """The embedder with the run's settings and its adapters loaded (see ``Predictor.from_pretrained``)."""
    if adapter_dir is not None:  # a Hub id: fetched into the cache (base_path is resolved by model_folder)
        from lightning_lora.adapters.io import adapter_source

        adapter_dir = adapter_source(adapter_dir, key="adapter_dir")
    run_base, run_family, settings = run_settings(adapter_dir) if adapter_dir is not None else (None, "auto", {})
    full = full_model_dir(Path(adapter_dir)) if adapter_dir is not None else None
    if full is not None:  # full fine-tuning: the snapshot is the whole trained model
        base_path, adapter_dir = full, None
    if base_path is None:
        if run_base is None:
            raise UserError("base_path is required: no run config.yaml next to the adapter names the base model")
        base_path = run_base
    if family == "auto":
        family = run_family
    if family == "auto" or family != detect_family(base_path):
        settings = {}  # the run's settings belong to another kind of model than this base folder
    embedder = build_embedder(base_path, family, **{**settings, **embedder_kwargs})
    adapters = {}
    if adapter_dir is not None:
        modules = embedder.adaptable_submodules()
        with quiet_transformers():
            for name, path in find_adapters(embedder, adapter_dir).items():
                adapters[name] = load_peft(modules[name], path, f"{embedder.family}.{name}")
    if device is not None:
        embedder.to(device)
    return embedder, adapters


class Predictor:
    """Batched, L2-normalised embeddings from an :class:`Embedder` with (optionally) PEFT adapters loaded.

    ``Predictor(model_path)`` (vembed-factory's call) takes a run directory (its ``adapters/final``, or its newest
    ``adapters/step_*`` when the run has no final one), a snapshot (``adapters/final``, ``adapters/step_N``), a
    snapshot's whole-model export (``adapters/<snapshot>/model``), or a plain model folder; the base model and the
    encoding settings come from the run's ``config.yaml``. A full fine-tuning run's snapshot (``model/``, a whole
    model folder) is loaded as the model itself. ``Predictor(embedder, adapters)`` wraps objects already built.
    """

    def __init__(self, model_path: str | os.PathLike | Embedder | None = None,
                 adapters: Mapping[str, PeftModel] | None = None, *, device: str | torch.device | None = None,
                 **embedder_kwargs: Any) -> None:
        if isinstance(model_path, Embedder):
            embedder = model_path
        elif model_path is None:
            raise UserError("Predictor needs model_path: a run directory, its adapters/final, or a model folder")
        else:
            if adapters is not None:
                raise UserError("Predictor(model_path, adapters=...): adapters come from model_path; pass "
                                "adapters only beside an Embedder")
            base_path, adapter_dir = resolve_model_path(model_path)
            embedder, adapters = _load(base_path, adapter_dir, "auto", device, embedder_kwargs)
        self.embedder = embedder.eval()
        self.adapters: dict[str, PeftModel] = dict(adapters or {})

    @classmethod
    def from_pretrained(cls, base_path: str | os.PathLike | None, adapter_dir: str | os.PathLike | None = None,
                        family: str = "auto", device: str | torch.device | None = None,
                        **embedder_kwargs: Any) -> Predictor:
        """Load the base model folder (``family``: ``auto`` | ``text`` | ``clip`` | ``qwen3_vl``), then every
        adapter in ``adapter_dir``. The embedder gets the settings of the run that wrote ``adapter_dir`` (its
        ``config.yaml``), then ``embedder_kwargs`` (pooling, prefixes, instruction, dtype, ...) over them."""
        return cls(*_load(base_path, adapter_dir, family, device, embedder_kwargs))

    @property
    def family(self) -> str:
        return self.embedder.family

    @property
    def dim(self) -> int:
        return self.embedder.embedding_dim

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def encode(self, items: Sequence[Item] | Item, role: str = "query", batch_size: int = 32,
               dim: int | None = None) -> torch.Tensor:
        """[N, dim or D] float32 on the CPU, unit length. ``dim`` keeps the first ``dim`` coordinates
        (Matryoshka) and re-normalises. A single item gives one row."""
        if isinstance(items, (str, Mapping)):
            items = [items]
        positive_int(batch_size, "batch_size")
        full = self.embedder.embedding_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= full):
            raise UserError(f"dim={dim!r} must be an integer from 1 to the embedding size {full}")
        chunks = []
        for start in range(0, len(items), batch_size):
            vectors = self.embedder.embed(list(items[start : start + batch_size]), role).float()
            if dim is not None:
                vectors = vectors[:, :dim]
            chunks.append(F.normalize(vectors, dim=-1).cpu())
        if not chunks:
            return torch.zeros(0, dim or full)
        return torch.cat(chunks)

    def encode_text(self, texts: Sequence[str] | str, role: str = "query", batch_size: int = 32,
                    dim: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"encode_text: item {i} is a {type(t).__name__}, not a string")
        return self.encode(list(texts), role, batch_size, dim)

    def encode_image(self, images: Sequence[Any] | Any, role: str = "document", batch_size: int = 32,
                     dim: int | None = None) -> torch.Tensor:
        """Images as file paths or PIL images."""
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        return self.encode([{"image": im} for im in images], role, batch_size, dim)

    # ------------------------------------------------------------------ export
    def merge_and_save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Merge every adapter into its base weights (PEFT ``merge_and_unload``) and save the whole model with
        ``save_pretrained`` plus the base folder's tokenizer/processor files. ``AutoModel.from_pretrained``
        loads the result and gives these embeddings without PEFT. The predictor keeps working (merged)."""
        from lightning_lora.adapters.merge import check_merge

        out = Path(os.path.expanduser(str(out_dir)))
        if not overwrite and (out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()))):
            kind = "is not empty" if out.is_dir() else "is a file"
            raise UserError(f"{out} exists and {kind}; choose another folder or pass overwrite=True")
        for peft in self.adapters.values():
            check_merge(peft)  # every adapter first: a refused merge leaves none merged
        for name in list(self.adapters):
            self.adapters.pop(name).merge_and_unload()
        with atomic_directory(out) as tmp, quiet_transformers():
            self.embedder.save_pretrained(tmp)
        return out


__all__ = ["Predictor", "find_adapters", "full_model_dir", "load_peft", "resolve_model_path", "run_settings"]
