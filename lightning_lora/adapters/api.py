"""The utility API TRELLIS-style LoRA code uses, as thin functions over this room.

``get_lora_config``, ``apply_lora_to_model``, ``load_lora_weights``, ``save_lora_weights``,
``merge_lora_weights``, ``print_trainable_parameters``, ``count_parameters``, ``get_trainable_params`` and
``LoRAModelWrapper`` take the arguments and return the values of the LoRA fork's ``lora_utils`` module that seed
000 documents (zadaianchuk/TRELLIS ``trellis/utils/lora_utils.py``), so its code runs with only the import path
changed. Three differences prevent silent mistakes: a file written by ``save_lora_weights`` to a ``.safetensors``
path describes itself (r, alpha and targets need not be repeated when loading); ``strict=True`` (the default)
refuses an adapter whose keys do not all fit, and ``strict=False`` says how many tensors it skipped; r and alpha
have no guessed default when loading a file that does not describe itself.

Import these from ``lightning_lora.adapters.api``: the package's own ``lightning_lora.adapters.count_parameters``
is the trainer's per-submodule counter (``count_parameters(name, model) -> ParamCount``), not the fork's dict.

The default targets (``DEFAULT_TARGETS``) are the attention projection names the fork defaults to; the TRELLIS
models name theirs in ``lightning_lora.models.trellis.TRELLIS_LORA_TARGET_MODULES`` (this room knows no family).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from lightning_lora.adapters.inject import inject_adapter
from lightning_lora.adapters.io import (
    CONFIG_NAME,
    FSDP_WRAPPED,
    adapter_source,
    describes_itself,
    is_submodule_dir,
    load_adapter_state,
    read_adapter_file,
    read_peft_dir,
    read_tensor_file,
    save_adapter_file,
    save_peft_dir,
)
from lightning_lora.adapters.merge import merge_and_unload
from lightning_lora.adapters.spec import AdapterSpec
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes

#: peft is a dependency of this package (the fork's flag for code that checks before importing)
PEFT_AVAILABLE = True
#: the targets used when none are given: the attention projections (q, kv, out, fused qkv) the fork defaults to
DEFAULT_TARGETS = ["to_q", "to_kv", "to_out", "to_qkv"]


def get_lora_config(r: int = 64, lora_alpha: float = 128, lora_dropout: float = 0.0,
                    target_modules: list[str] | None = None, modules_to_save: list[str] | None = None,
                    init: str = "kaiming", **kwargs) -> LoraConfig:
    """A validated PEFT ``LoraConfig`` (``DEFAULT_TARGETS`` when no targets are given)."""
    spec = AdapterSpec(r=r, alpha=lora_alpha, dropout=lora_dropout, init=init, modules_to_save=modules_to_save)
    return spec.lora_config(list(target_modules or DEFAULT_TARGETS), **kwargs)


def apply_lora_to_model(model: nn.Module, r: int = 64, lora_alpha: float = 128, lora_dropout: float = 0.0,
                        target_modules: list[str] | None = None, modules_to_save: list[str] | None = None,
                        **kwargs) -> PeftModel:
    """Freeze ``model`` and add a trainable LoRA adapter to it."""
    config = get_lora_config(r, lora_alpha, lora_dropout, target_modules, modules_to_save, **kwargs)
    return inject_adapter(model, config, where=type(model).__name__)


def load_lora_weights(model: nn.Module, lora_path: str | os.PathLike, r: int | None = None,
                      lora_alpha: float | None = None, lora_dropout: float | None = None,
                      target_modules: list[str] | None = None, strict: bool = True,
                      trainable: bool = False) -> PeftModel:
    """Add the adapter at ``lora_path`` to ``model``.

    ``lora_path`` is a PEFT directory, a self-describing ``.safetensors`` from ``save_lora_weights``, or a
    bare tensor file (``.safetensors``/``.pt``, e.g. the fork's ``lora_ckpts/denoiser_lora_stepNNNNNNN.pt``;
    ``r`` and ``lora_alpha`` required then, ``target_modules`` default ``DEFAULT_TARGETS``). ``lora_dropout``
    (default: the file's, else 0) matters only when the adapter is trained further (``trainable=True``).
    """
    path = _one_part(adapter_source(lora_path))
    if path.is_dir():
        config, state = read_peft_dir(path)
        config.base_model_name_or_path = getattr(model, "name_or_path", None)  # PEFT warns on a rename
    else:
        config, state = _file_adapter(path, r, lora_alpha, target_modules)
    if lora_dropout is not None:
        config.lora_dropout = AdapterSpec(dropout=lora_dropout).dropout  # checked as adapter.dropout is
    config.inference_mode = not trainable
    peft_model = inject_adapter(model, config, where=type(model).__name__)
    load_adapter_state(peft_model, state, strict=strict, source=str(path))
    return peft_model


def _one_part(path: Path) -> Path:
    """A run's snapshot (``adapters/final``) with one PEFT directory per submodule stands for its only one; with
    several, the caller must say which (one model takes one adapter here)."""
    if not path.is_dir() or (path / CONFIG_NAME).is_file():
        return path
    parts = sorted(d for d in path.iterdir() if is_submodule_dir(d))
    if len(parts) > 1:
        raise UserError(f"{path} holds adapters for {[d.name for d in parts]}; give one of them, e.g. {parts[0]}")
    return parts[0] if parts else path


def _file_adapter(path: Path, r: int | None, lora_alpha: float | None, target_modules: list[str] | None
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a single adapter file: its own description, else r/alpha/targets given."""
    tensors, metadata = read_tensor_file(path)
    if describes_itself(metadata):
        configs, states, _ = read_adapter_file(path)
        if len(configs) != 1:
            raise UserError(f"{path} holds adapters for {sorted(configs)}; load it into the head, not one module")
        (config,), (state,) = configs.values(), states.values()
        return config, state
    if r is None or lora_alpha is None:
        raise UserError(f"{path} does not describe itself; pass r= and lora_alpha= (and target_modules=)")
    return get_lora_config(r, lora_alpha, target_modules=target_modules), tensors


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the names the model's own ``state_dict()`` gives them, as the fork's trainer
    and its ``save_lora_weights`` keep them: every key holding ``lora_`` or ``modules_to_save``, adapter name
    included (``base_model.model.<path>.lora_A.default.weight`` for a ``PeftModel``); copies, on CPU.

    Under FSDP (blocks wrapped, inside ``strategies.full_params``) the tensors come from the parameters and
    buffers themselves and the wrapper's ``_fsdp_wrapped_module.`` is dropped, giving an unwrapped model's keys."""
    if any(FSDP_WRAPPED in name for name, _ in model.named_modules()):
        source = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    else:
        source = model.state_dict()
    # a copy of each: torch.save writes a tensor's whole storage, and a view (FSDP's flat parameters) would
    # carry all of it
    return {k.replace(FSDP_WRAPPED, ""): v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for k, v in source.items() if "lora_" in k or "modules_to_save" in k}


def save_lora_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """``torch.save`` of ``lora_state_dict(model)`` (a plain dict of tensors: ``torch.load(weights_only=True)``
    reads it), written atomically: the fork's ``lora_ckpts/<model>_lora_stepNNNNNNN.pt``."""
    state = lora_state_dict(model)
    if not state:
        raise UserError(f"{path}: {type(model).__name__} holds no LoRA tensors to save")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def save_lora_weights(model: PeftModel, save_path: str | os.PathLike, use_safetensors: bool = True,
                      base_model: str | None = None) -> Path:
    """Save only the adapter and return where it went.

    With ``use_safetensors`` (the default) a ``.safetensors`` path gives one self-describing file and any other
    path a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``); without it, a ``.pt`` file
    (``.pt`` appended when missing) of ``lora_state_dict(model)``, the fork's ``torch.save`` format.
    """
    path = Path(save_path)
    if not use_safetensors:
        return save_lora_state_dict(model, path if path.suffix == ".pt" else path.with_name(path.name + ".pt"))
    if path.suffix == ".safetensors":
        return save_adapter_file(path, {"": model}, base_model={"name": base_model} if base_model else None)
    return save_peft_dir(model, path, base_model=base_model)


def merge_lora_weights(model: PeftModel, scale: float = 1.0) -> nn.Module:
    """Fold the adapter into the base weights (W + scale·alpha/r·B·A) and return the plain model."""
    return merge_and_unload(model, scale)


def get_trainable_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (for an adapted model: the LoRA ones), as an optimizer takes them."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict[str, int | float]:
    """``{'total', 'trainable', 'frozen', 'trainable_percent'}`` over every parameter of ``model``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in get_trainable_params(model))
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_percent": 100.0 * trainable / total if total else 0.0}


def print_trainable_parameters(model: nn.Module, model_name: str = "Model") -> str:
    """Print (and return) total, trainable and frozen parameter counts."""
    stats = count_parameters(model)
    text = (f"{model_name} Parameters:\n  Total:     {stats['total']:,}\n"
            f"  Trainable: {stats['trainable']:,} ({stats['trainable_percent']:.2f}%)\n"
            f"  Frozen:    {stats['frozen']:,}")
    print(text)
    return text


class LoRAModelWrapper:
    """Hold a model with a LoRA adapter: ``load``, ``get_model``, ``save``, ``merge``.

    ``LoRAModelWrapper(base_model, r=64, lora_alpha=128, lora_dropout=0.0, target_modules=None)`` adds a new
    adapter to ``base_model`` (and prints the parameter counts, as the fork does); given a ``PeftModel`` that
    already has its adapter, the wrapper holds it as it is.
    """

    def __init__(self, base_model: nn.Module, r: int = 64, lora_alpha: float = 128, lora_dropout: float = 0.0,
                 target_modules: list[str] | None = None, **kwargs) -> None:
        if isinstance(base_model, PeftModel):
            self.model = base_model
        else:
            self.model = apply_lora_to_model(base_model, r, lora_alpha, lora_dropout, target_modules, **kwargs)
            print_trainable_parameters(self.model, "LoRA Model")
        self._describe()

    def _describe(self) -> None:
        """``r``, ``lora_alpha``, ``lora_dropout`` and ``target_modules`` as the adapter has them."""
        config = self.model.peft_config["default"]
        self.r, self.lora_alpha, self.lora_dropout = config.r, config.lora_alpha, config.lora_dropout
        targets = config.target_modules
        self.target_modules = sorted(targets) if isinstance(targets, set) else targets

    @classmethod
    def load(cls, base_model: nn.Module, lora_path: str | os.PathLike, r: int | None = None,
             lora_alpha: float | None = None, lora_dropout: float | None = None,
             target_modules: list[str] | None = None, strict: bool = True) -> LoRAModelWrapper:
        return cls(load_lora_weights(base_model, lora_path, r, lora_alpha, lora_dropout, target_modules,
                                     strict=strict))

    def get_model(self) -> PeftModel:
        return self.model

    def save(self, save_path: str | os.PathLike, use_safetensors: bool = True) -> Path:
        return save_lora_weights(self.model, save_path, use_safetensors)

    def merge(self, scale: float = 1.0) -> nn.Module:
        return merge_lora_weights(self.model, scale)
