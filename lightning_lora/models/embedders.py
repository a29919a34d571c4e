"""Embedding models behind one interface: BERT-like text encoders, CLIP dual towers, Qwen3-VL-Embedding.

An :class:`Embedder` turns a list of *items* into one vector per item (float32, **not** normalised: the
caller normalises, after a Matryoshka truncation where it wants one). An item is

* a ``str`` — text only, or
* a mapping ``{"text": str | None, "image": path | PIL.Image | None}`` (``"instruction"`` too, for Qwen3-VL).

Image paths are opened lazily, inside :meth:`Embedder.embed`; a missing or unreadable file is a one-line
:class:`~lightning_lora.errors.UserError` naming the path (never a silent black image). Every model loads
from a LOCAL folder through transformers; nothing is downloaded.

Each embedder names its adaptable submodules (what LoRA may go into) and the family's default LoRA targets
per submodule. Vision towers are adapted only on explicit opt-in (``default_submodules(vision=True)``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lightning_lora import hub
from lightning_lora.checks import choice, positive_int
from lightning_lora.errors import UserError

POOLINGS = ("mean", "cls", "last")
ROLES = ("query", "document")
FAMILIES = ("text", "clip", "qwen3_vl")
ITEM_KEYS = ("text", "image", "instruction")
#: model types that are not plain text encoders (a text embedder refuses them and says which family fits)
VISION_MODEL_TYPES = {"clip": "clip", "qwen3_vl": "qwen3_vl"}

Item = str | Mapping[str, Any]


# --------------------------------------------------------------------------- pooling
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last non-pad token of each row (right or left padding alike)."""
    width = mask.size(1)
    return width - 1 - mask.flip(1).to(torch.long).argmax(1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vector from token states [B, T, D] and the attention mask [B, T].

    ``mean``: average over real tokens; ``cls``: the first token; ``last``: the last real token (what
    Qwen3-VL-Embedding and other decoder embedders read; works with right and left padding).
    """
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(mask).to(hidden.device)]
    raise UserError(f"pooling={how!r} is unknown; valid: {', '.join(POOLINGS)}")


# --------------------------------------------------------------------------- items
@dataclass(frozen=True)
class EmbedInput:
    """One item, checked: text and/or an image (path or PIL image), and an optional per-item instruction."""

    text: str | None = None
    image: Any = None
    instruction: str | None = None

    @property
    def modality(self) -> str:
        if self.image is None:
            return "text"
        return "image" if not self.text else "image+text"


def as_input(item: Item, where: str = "item") -> EmbedInput:
    """An item as :class:`EmbedInput`; a wrong type or an unknown key is a one-line UserError."""
    if isinstance(item, EmbedInput):
        return item
    if isinstance(item, str):
        return EmbedInput(text=item)
    if not isinstance(item, Mapping):
        raise UserError(f"{where}: expected a string or a mapping with 'text'/'image', got {type(item).__name__}")
    if unknown := sorted(set(item) - set(ITEM_KEYS)):
        hint = " (video is not supported)" if "video" in unknown else ""
        raise UserError(f"{where}: unknown key {unknown[0]!r}{hint}; an item may have {', '.join(ITEM_KEYS)}")
    text, image, instruction = item.get("text"), item.get("image"), item.get("instruction")
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: 'text' must be a string or null, got {type(text).__name__}")
    if instruction is not None and not isinstance(instruction, str):
        raise UserError(f"{where}: 'instruction' must be a string or null, got {type(instruction).__name__}")
    if image is not None and not isinstance(image, (str, os.PathLike)) and not _is_pil(image):
        raise UserError(f"{where}: 'image' must be a file path or a PIL image, got {type(image).__name__}")
    return EmbedInput(text=text, image=image, instruction=instruction)


def item_key(item: Item) -> Any:
    """A hashable stand-in for an item (for duplicate masks): the text itself, or (text, image path)."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        image = item.get("image")
        image = str(image) if isinstance(image, (str, os.PathLike)) else (id(image) if image is not None else None)
        return (item.get("text"), image, item.get("instruction"))
    return id(item)


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(obj, Image.Image)


def open_image(source: Any):
    """An RGB PIL image from a path or a PIL image. Transparency is composited onto white; EXIF rotation applied.

    A missing file or one PIL cannot decode is a one-line UserError naming the path.
    """
    from PIL import Image, UnidentifiedImageError

    if _is_pil(source):
        return _to_rgb(source)
    path = Path(os.fspath(source)).expanduser()
    if not path.is_file():
        raise UserError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            return _to_rgb(opened)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise UserError(f"cannot read image {path}: {reason}") from None


def _to_rgb(image):
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")  # a copy, also for RGB: the caller may close the file


def _check_role(role: str) -> None:
    choice(role, "role", ROLES)


# --------------------------------------------------------------------------- folders
def model_folder(pretrained: str | os.PathLike, key: str = "model.pretrained") -> Path:
    """The Hugging Face model folder ``pretrained`` names (a local folder or a Hub id, fetched into the cache), or
    a one-line UserError when it (or its config.json) is missing."""
    path = hub.resolve(pretrained, key=key, allow_patterns=MODEL_FILES, fallback_patterns=("*.bin",))
    if not path.is_dir():
        raise UserError(f"{key}: no such model folder: {path} (a local folder, or a Hub id such as org/name)")
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: no Hugging Face model folder (config.json) at {path}")
    return path


#: what a transformers model folder needs from a Hub repository: configs, tokenizer and processor files, and
#: safetensors weights (not the ONNX/TF/Flax copies many repositories also hold)
MODEL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.safetensors")


def read_model_type(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise UserError(f"{path / 'config.json'} has no 'model_type'; is this a Hugging Face model folder?")
    return model_type


def detect_family(pretrained: str | os.PathLike) -> str:
    """``clip``, ``qwen3_vl`` or ``text`` from the folder's ``config.json`` model type."""
    return VISION_MODEL_TYPES.get(read_model_type(model_folder(pretrained)), "text")


def _expect_model_type(path: Path, expected: str, embedder: str) -> None:
    found = read_model_type(path)
    if found != expected:
        family = VISION_MODEL_TYPES.get(found, "text")
        raise UserError(
            f"{embedder} needs a {expected!r} model but {path} holds model_type={found!r} "
            f"(use the {family!r} embedder for it)"
        )


#: tokenizer / processor / sentence-transformers files copied next to a merged model (weights never)
AUX_FILES = re.compile(
    r"^(tokenizer.*|vocab\..*|merges\.txt|spiece\.model|sentencepiece.*|special_tokens_map\.json|added_tokens\.json"
    r"|preprocessor_config\.json|processor_config\.json|video_preprocessor_config\.json|chat_template.*"
    r"|generation_config\.json|modules\.json|config_sentence_transformers\.json|sentence_bert_config\.json)$"
)
AUX_DIRS = re.compile(r"^\d+_(Pooling|Normalize)$")


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy the base folder's tokenizer/processor files (and sentence-transformers pooling config) to ``dst``."""
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.is_file() and AUX_FILES.match(entry.name):
            shutil.copy2(entry, dst / entry.name)
            copied.append(entry.name)
        elif entry.is_dir() and AUX_DIRS.match(entry.name):
            shutil.copytree(entry, dst / entry.name, dirs_exist_ok=True)
            copied.append(entry.name + "/")
    return copied


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (unused weights such as BERT's pooler)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def checkpoint_activations(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (LoRA gradients flow without inputs that require grad)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _dtype_kwargs(dtype: str | None) -> dict[str, Any]:
    if dtype is None:
        return {}
    choice(dtype, "model.dtype", ("float32", "bfloat16", "float16", "auto"), hint=" (or null for the default)")
    return {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}


def _targets(defaults: dict[str, list[str]], given: Any, submodules: Sequence[str], key: str) -> dict[str, list[str]]:
    """The family's default targets with ``given`` (a mapping per submodule, or a list for a 1-submodule family)."""
    out = {k: list(v) for k, v in defaults.items()}
    if given is None:
        return out
    if isinstance(given, str):
        given = [given]
    if isinstance(given, Mapping):
        for name, names in given.items():
            if name not in submodules:
                raise UserError(f"{key}: {name!r} is not a submodule; valid: {', '.join(submodules)}")
            out[name] = [str(n) for n in ([names] if isinstance(names, str) else names)]
        return out
    if len(submodules) != 1:
        raise UserError(f"{key}: give targets per submodule ({', '.join(submodules)}), e.g. {{{submodules[0]}: [...]}}")
    out[submodules[0]] = [str(n) for n in given]
    return out


# --------------------------------------------------------------------------- the interface
class Embedder(nn.Module):
    """What an embedding head needs from a model family.

    Subclasses set ``family``, ``embedding_dim``, ``pretrained`` (the folder) and ``name``, and implement
    :meth:`adaptable_submodules`, :meth:`embed`, :meth:`enable_gradient_checkpointing` and
    :meth:`hf_model`. ``logit_scale`` is a learnable parameter (CLIP's, when enabled) or None.
    """

    family: ClassVar[str] = "generic"
    #: submodules that are vision towers: LoRA goes there only when asked for (``default_submodules(True)``)
    vision_names: ClassVar[tuple[str, ...]] = ()
    logit_scale: nn.Parameter | None

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("logit_scale", None)
        self.pretrained: Path = Path()  # the local folder (a Hub id's cached snapshot)
        self.source = ""  # what names it: the Hub id, or the local path
        self.name: str = ""
        self.embedding_dim: int = 0
        self.targets: dict[str, list[str]] = {}

    # ------------------------------------------------------------ LoRA placement
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def default_targets(self) -> dict[str, list[str]]:
        """Default LoRA targets per submodule (vision towers included; they are used only on opt-in)."""
        return {k: list(v) for k, v in self.targets.items()}

    def default_submodules(self, vision: bool = False) -> list[str]:
        """Submodules adapted by default: every non-vision one, plus the vision tower(s) when ``vision``."""
        return [n for n in self.adaptable_submodules() if vision or n not in self.vision_names]

    # ------------------------------------------------------------ encoding
    def embed(self, items: Sequence[Item], role: str = "query") -> torch.Tensor:
        """[len(items), embedding_dim] float32, not normalised. ``role`` is ``query`` or ``document``."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        raise NotImplementedError

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "path": self.source, "family": self.family}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ export
    def hf_model(self) -> nn.Module:
        """The transformers model whose ``save_pretrained`` folder ``AutoModel.from_pretrained`` loads back."""
        raise NotImplementedError

    def submodule_prefixes(self) -> dict[str, str]:
        """Where each adaptable submodule sits in ``AutoModel.from_pretrained(folder)`` (its module-name prefix):
        ``""`` when the submodule's module names already are the whole model's (a text encoder is the whole
        model; CLIP's towers carry the ``CLIPModel``'s own names)."""
        return dict.fromkeys(self.adaptable_submodules(), "")

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write the model as it is now (LoRA merged beforehand, if any) plus the base folder's tokenizer and
        processor files, so ``transformers.AutoModel.from_pretrained(out_dir)`` loads it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        copy_aux_files(self.pretrained, out)
        self.hf_model().save_pretrained(out, safe_serialization=True)
        return out

    def _inputs(self, items: Sequence[Item]) -> list[EmbedInput]:
        if isinstance(items, (str, Mapping)):
            raise UserError("embed() takes a list of items, not a single item")
        return [as_input(item, f"item {i}") for i, item in enumerate(items)]


# --------------------------------------------------------------------------- text encoders
class TextEmbedder(Embedder):
    """A local Hugging Face text encoder (BERT, MiniLM, E5, BGE, ...) with mean / CLS / last-token pooling.

    BERT-style encoders load without their pooler (``add_pooling_layer=False``): pooling never uses it, and
    a LoRA target ``dense`` would also hit ``pooler.dense`` (an adapter with no gradient that breaks DDP).
    ``query_prefix``/``doc_prefix`` are prepended to the text (e.g. E5's ``"query: "``).
    """

    family = "text"

    def __init__(
        self,
        pretrained: str,
        pooling: str = "mean",
        query_prefix: str = "",
        doc_prefix: str = "",
        query_max_length: int = 64,
        doc_max_length: int = 128,
        targets: Any = ("query", "key", "value", "dense"),
        config_overrides: Mapping[str, Any] | None = None,
        name: str | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        choice(pooling, "pooling", POOLINGS)
        positive_int(query_max_length, "query_max_length")
        positive_int(doc_max_length, "doc_max_length")
        path = model_folder(pretrained)
        model_type = read_model_type(path)
        if model_type in VISION_MODEL_TYPES:
            raise UserError(
                f"{path} holds a {model_type!r} model; the text embedder takes text encoders "
                f"(use the {VISION_MODEL_TYPES[model_type]!r} embedder)"
            )
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        config = AutoConfig.from_pretrained(path, **dict(config_overrides or {}))
        extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
        with quiet_transformers():
            self.encoder = AutoModel.from_pretrained(path, config=config, **extra, **_dtype_kwargs(dtype))
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pretrained, (self.source, short) = path, hub.identity(pretrained, path)
        self.name = name or short
        self.pooling = pooling
        self.prefixes = {"query": query_prefix, "document": doc_prefix}
        self.max_lengths = {"query": query_max_length, "document": doc_max_length}
        self.embedding_dim = int(config.hidden_size)
        self.targets = _targets({"encoder": []}, targets, ["encoder"], "targets")

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def embed(self, items: Sequence[Item], role: str = "query") -> torch.Tensor:
        _check_role(role)
        texts = []
        for i, x in enumerate(self._inputs(items)):
            if x.image is not None:
                raise UserError(f"item {i} has an image, but the text embedder ({self.name}) embeds text only; "
                                "use model=clip or model=qwen3_vl_embedding for images")
            if x.instruction is not None:
                raise UserError(f"item {i}: 'instruction' is for Qwen3-VL; the text embedder uses "
                                "query_prefix/doc_prefix")
            texts.append(self.prefixes[role] + (x.text or ""))
        if not texts:
            return torch.zeros(0, self.embedding_dim)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_lengths[role],
                                return_tensors="pt").to(self.device)
        hidden = self.encoder(**tokens).last_hidden_state
        pooled = pool(hidden, tokens["attention_mask"], self.pooling)
        return pooled.to(torch.promote_types(pooled.dtype, torch.float32))  # bf16 -> fp32; fp64 stays

    def enable_gradient_checkpointing(self) -> None:
        checkpoint_activations(self.encoder)

    def hf_model(self) -> nn.Module:
        return self.encoder


# --------------------------------------------------------------------------- CLIP
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
CLIP_MULTIMODAL = ("error", "mean")


def _clip_image_processor(path: Path):
    try:  # the PIL backend: no torchvision needed, same numbers on every machine
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as Processor
    if not (path / "preprocessor_config.json").is_file():
        raise UserError(f"{path} has no preprocessor_config.json; CLIP needs its image processor settings")
    return Processor.from_pretrained(path)


class ClipEmbedder(Embedder):
    """A CLIP dual tower from a local ``CLIPModel`` folder: text through ``text_model`` + ``text_projection``,
    images through ``vision_model`` + ``visual_projection`` (what ``get_text_features`` /
    ``get_image_features`` compute), images prepared by ``CLIPImageProcessor`` (PIL backend).

    The two adaptable submodules are transformers' ``CLIPTextModelWithProjection`` and
    ``CLIPVisionModelWithProjection`` sharing the ``CLIPModel``'s layers, so their module names are the
    ``CLIPModel``'s own (``text_model.encoder.layers.0.self_attn.q_proj``, ``text_projection``): text-only
    LoRA never reaches the vision tower (PEFT resolves target names inside the submodule it is given),
    ``modules_to_save=[text_projection]`` trains the projection, and a saved adapter loads with plain PEFT
    onto ``CLIPTextModelWithProjection.from_pretrained(folder)``.

    CLIP embeds one modality per item. An item with both text and an image is an error unless
    ``multimodal="mean"``: then its vector is the mean of the L2-normalised text and image features.
    ``learnable_logit_scale`` exposes CLIP's ``logit_scale`` (log of the inverse temperature) as a parameter.
    """

    family = "clip"
    vision_names = ("vision",)

    def __init__(
        self,
        pretrained: str,
        learnable_logit_scale: bool = False,
        targets: Any = None,
        query_prefix: str = "",
        doc_prefix: str = "",
        max_length: int | None = None,
        multimodal: str = "error",
        name: str | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        choice(multimodal, "multimodal", CLIP_MULTIMODAL)
        path = model_folder(pretrained)
        _expect_model_type(path, "clip", "the CLIP embedder")
        from transformers import (
            AutoTokenizer,
            CLIPModel,
            CLIPTextModelWithProjection,
            CLIPVisionModelWithProjection,
        )

        with quiet_transformers():
            clip = CLIPModel.from_pretrained(path, **_dtype_kwargs(dtype))
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = _clip_image_processor(path)
        clip.eval()
        # Kept outside the module tree (its layers are registered once, through the towers below).
        object.__setattr__(self, "_clip", clip)
        text_config, vision_config = copy.deepcopy(clip.config.text_config), copy.deepcopy(clip.config.vision_config)
        text_config.projection_dim = vision_config.projection_dim = clip.config.projection_dim
        with torch.device("meta"):  # empty shells; their parts are replaced by the CLIPModel's own
            text = CLIPTextModelWithProjection(text_config)
            vision = CLIPVisionModelWithProjection(vision_config)
        text.text_model, text.text_projection = clip.text_model, clip.text_projection
        vision.vision_model, vision.visual_projection = clip.vision_model, clip.visual_projection
        self.text, self.vision = text.eval(), vision.eval()
        if learnable_logit_scale:
            self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone().float())
        self.pretrained, (self.source, short) = path, hub.identity(pretrained, path)
        self.name = name or short
        self.prefixes = {"query": query_prefix, "document": doc_prefix}
        limit = int(clip.config.text_config.max_position_embeddings)
        self.max_length = min(int(max_length or limit), limit)
        self.multimodal = multimodal
        self.embedding_dim = int(clip.config.projection_dim)
        self.targets = _targets({"text": CLIP_TARGETS, "vision": CLIP_TARGETS}, targets, ["text", "vision"], "targets")

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"text": self.text, "vision": self.vision}

    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self.text(**tokens).text_embeds

    def image_features(self, images: list[Any]) -> torch.Tensor:
        pixels = self.image_processor(images=[open_image(im) for im in images], return_tensors="pt")["pixel_values"]
        dtype = next(self.vision.parameters()).dtype
        return self.vision(pixel_values=pixels.to(self.device, dtype)).image_embeds

    def embed(self, items: Sequence[Item], role: str = "query") -> torch.Tensor:
        _check_role(role)
        inputs = self._inputs(items)
        out = torch.zeros(len(inputs), self.embedding_dim, device=self.device)
        text_rows, image_rows = [], []
        for i, x in enumerate(inputs):
            if x.instruction is not None:
                raise UserError(f"item {i}: 'instruction' is for Qwen3-VL; CLIP uses query_prefix/doc_prefix")
            if x.modality == "image+text" and self.multimodal == "error":
                raise UserError(
                    f"item {i} has both text and an image; CLIP embeds one modality per item "
                    "(give one of them, or set multimodal=mean to average the two normalised features)"
                )
            if x.image is None or x.text:
                text_rows.append(i)
            if x.image is not None:
                image_rows.append(i)
        both = {i for i in text_rows if inputs[i].image is not None}

        def add(out: torch.Tensor, rows: list[int], feats: torch.Tensor) -> torch.Tensor:
            if both:  # an image+text item: the mean of its two unit vectors
                half = torch.tensor([i in both for i in rows], device=feats.device).unsqueeze(-1)
                feats = torch.where(half, F.normalize(feats, dim=-1) / 2, feats)
            return out.index_add(0, torch.tensor(rows, device=out.device), feats)

        if text_rows:
            texts = [self.prefixes[role] + (inputs[i].text or "") for i in text_rows]
            out = add(out, text_rows, self.text_features(texts).float())
        if image_rows:
            out = add(out, image_rows, self.image_features([inputs[i].image for i in image_rows]).float())
        return out

    def enable_gradient_checkpointing(self) -> None:
        for tower in (self.text, self.vision):
            checkpoint_activations(tower)

    def hf_model(self) -> nn.Module:
        """The ``CLIPModel`` with the towers' current parts (a merged ``modules_to_save`` projection included)."""
        clip = self._clip
        clip.text_model, clip.text_projection = self.text.text_model, self.text.text_projection
        clip.vision_model, clip.visual_projection = self.vision.vision_model, self.vision.visual_projection
        if self.logit_scale is not None:
            with torch.no_grad():
                clip.logit_scale.copy_(self.logit_scale.detach().to(clip.logit_scale))
        return clip


# --------------------------------------------------------------------------- Qwen3-VL-Embedding
#: Qwen3-VL-Embedding's default instruction (the system turn of every item without a task instruction)
QWEN_DEFAULT_INSTRUCTION = "Represent the user's input."
QWEN_QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
#: LoRA on every linear layer of the language model's blocks (the official recipe uses q/k/v + MLP, r32/α32)
QWEN_LANGUAGE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: the vision blocks' attention and MLP (scoped so patch_embed.proj and the mergers stay out)
QWEN_VISION_TARGETS = ["attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"]
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|endoftext|>")


def with_final_punctuation(text: str) -> str:
    """Qwen3-VL-Embedding ends an instruction with '.' unless it already ends with punctuation."""
    text = text.strip()
    if text and not unicodedata.category(text[-1]).startswith("P"):
        text += "."
    return text


class Qwen3VLEmbedder(Embedder):
    """Qwen3-VL-Embedding (or any Qwen3-VL) from a local folder: last-token pooling with right padding.

    Every item becomes the chat prompt Qwen3-VL-Embedding uses (``add_generation_prompt=True``)::

        <|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n
        [<|vision_start|><|image_pad|>×N<|vision_end|>]{text}<|im_end|>\\n<|im_start|>assistant\\n

    The embedding is the final hidden state of the last real token. Queries use ``instruction`` (a task
    description), documents ``doc_instruction`` (``"Represent the user's input."``); an item's own
    ``"instruction"`` wins. A missing final punctuation mark gets a '.', an item with neither text nor
    image is the text ``NULL`` (both as upstream). Only the user text is truncated to ``max_length``.

    Built by hand (no ``Qwen3VLProcessor``, which needs torchvision): the tokenizer, then
    ``Qwen2VLImageProcessorPil`` for ``pixel_values``/``image_grid_thw``, ``grid.prod() // merge²`` image
    pad tokens per image, and ``mm_token_type_ids`` (1 on image tokens) for the multimodal RoPE.
    ``min_pixels``/``max_pixels`` override the folder's image size bounds (upstream: 4096 and 1800·32²).
    """

    family = "qwen3_vl"
    vision_names = ("vision",)

    def __init__(
        self,
        pretrained: str,
        instruction: str = QWEN_QUERY_INSTRUCTION,
        doc_instruction: str = QWEN_DEFAULT_INSTRUCTION,
        max_length: int = 8192,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        targets: Any = None,
        name: str | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        positive_int(max_length, "max_length")
        path = model_folder(pretrained)
        _expect_model_type(path, "qwen3_vl", "the Qwen3-VL embedder")
        from transformers import AutoModel, AutoTokenizer, Qwen2VLImageProcessorPil

        extra = _dtype_kwargs(dtype)
        if attn_implementation:
            extra["attn_implementation"] = attn_implementation
        with quiet_transformers():
            self.model = AutoModel.from_pretrained(path, **extra).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not (path / "preprocessor_config.json").is_file():
            raise UserError(f"{path} has no preprocessor_config.json; Qwen3-VL needs its image processor settings")
        size = {}
        if min_pixels is not None:
            size["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            size["max_pixels"] = int(max_pixels)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **size)
        config = self.model.config
        ids = dict(zip(QWEN_TOKENS, self.tokenizer.convert_tokens_to_ids(list(QWEN_TOKENS)), strict=True))
        expected = {"<|image_pad|>": config.image_token_id, "<|vision_start|>": config.vision_start_token_id,
                    "<|vision_end|>": config.vision_end_token_id}
        for token, want in expected.items():
            if ids[token] != want:
                raise UserError(f"{path}: the tokenizer maps {token} to {ids[token]} but config.json says {want}")
        self.image_token_id = int(config.image_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else ids["<|endoftext|>"])
        self.merge_size = int(self.image_processor.merge_size)
        self.instructions = {"query": instruction, "document": doc_instruction}
        self.max_length = max_length
        self.pretrained, (self.source, short) = path, hub.identity(pretrained, path)
        self.name = name or short
        self.embedding_dim = int(config.text_config.hidden_size)
        self.targets = _targets({"language": QWEN_LANGUAGE_TARGETS, "vision": QWEN_VISION_TARGETS}, targets,
                                ["language", "vision"], "targets")

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"language": self.model.language_model, "vision": self.model.visual}

    def submodule_prefixes(self) -> dict[str, str]:
        return {"language": "language_model.", "vision": "visual."}  # Qwen3VLModel's attribute names

    # ------------------------------------------------------------ prompt
    def prompt(self, x: EmbedInput, role: str, image_tokens: int = 0, text: str | None = None) -> str:
        """The chat prompt of one item (``image_tokens`` pad tokens for its image, if any)."""
        instruction = with_final_punctuation(x.instruction or self.instructions[role]) or QWEN_DEFAULT_INSTRUCTION
        text = x.text if text is None else text
        vision = f"<|vision_start|>{'<|image_pad|>' * image_tokens}<|vision_end|>" if image_tokens else ""
        if not text and not image_tokens:
            text = "NULL"
        return (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{vision}{text or ''}<|im_end|>\n"
                "<|im_start|>assistant\n")

    def _ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]

    def _fit(self, x: EmbedInput, role: str, image_tokens: int, ids: list[int], where: str) -> list[int]:
        """Cut the user text (never the template or the image tokens) so the prompt fits ``max_length``."""
        fixed = len(self._ids([self.prompt(x, role, image_tokens, text="")])[0])
        budget = self.max_length - fixed
        if budget <= 0:
            raise UserError(f"{where}: max_length={self.max_length} leaves no room for text (the prompt"
                            f"{' and image' if image_tokens else ''} take {fixed} tokens); raise max_length")
        text_ids = self._ids([x.text or ""])[0][:budget]
        for _ in range(4):  # decoding and re-encoding can shift the count by a token at the cut
            ids = self._ids([self.prompt(x, role, image_tokens, text=self.tokenizer.decode(text_ids))])[0]
            if len(ids) <= self.max_length:
                return ids
            text_ids = text_ids[: len(text_ids) - (len(ids) - self.max_length)]
        return ids[: self.max_length]  # pragma: no cover - unreachable in practice

    def build_inputs(self, items: Sequence[Item], role: str = "query") -> dict[str, torch.Tensor]:
        """The model's keyword arguments for ``items`` (right padded), as ``Qwen3VLProcessor`` would give them."""
        _check_role(role)
        inputs = self._inputs(items)
        images = [open_image(x.image) for x in inputs if x.image is not None]
        vision: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if images:
            vision = dict(self.image_processor(images=images, return_tensors="pt"))
            counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        per_item, k = [], 0
        for x in inputs:
            per_item.append(counts[k] if x.image is not None else 0)
            k += x.image is not None
        rows = self._ids([self.prompt(x, role, n) for x, n in zip(inputs, per_item, strict=True)])
        rows = [ids if len(ids) <= self.max_length else self._fit(x, role, n, ids, f"item {i}")
                for i, (x, n, ids) in enumerate(zip(inputs, per_item, rows, strict=True))]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int)}
        if images:
            out["pixel_values"], out["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
        return out

    def embed(self, items: Sequence[Item], role: str = "query") -> torch.Tensor:
        if not len(items):
            return torch.zeros(0, self.embedding_dim)
        inputs = {k: v.to(self.device) for k, v in self.build_inputs(items, role).items()}
        hidden = self.model(**inputs, use_cache=False).last_hidden_state
        return pool(hidden, inputs["attention_mask"], "last").float()

    def enable_gradient_checkpointing(self) -> None:
        checkpoint_activations(self.model)

    def hf_model(self) -> nn.Module:
        return self.model


EMBEDDERS: dict[str, type[Embedder]] = {"text": TextEmbedder, "clip": ClipEmbedder, "qwen3_vl": Qwen3VLEmbedder}


def build_embedder(pretrained: str | os.PathLike, family: str = "auto", **kwargs: Any) -> Embedder:
    """The embedder of ``family`` (``auto``: from ``config.json``'s model type) for a local model folder."""
    if family == "auto":
        family = detect_family(pretrained)
    choice(family, "family", EMBEDDERS, also=["auto"])
    return EMBEDDERS[family](str(pretrained), **kwargs)


__all__ = [
    "EMBEDDERS",
    "FAMILIES",
    "POOLINGS",
    "ClipEmbedder",
    "EmbedInput",
    "Embedder",
    "Item",
    "Qwen3VLEmbedder",
    "TextEmbedder",
    "as_input",
    "build_embedder",
    "detect_family",
    "item_key",
    "last_token_index",
    "open_image",
    "pool",
]
