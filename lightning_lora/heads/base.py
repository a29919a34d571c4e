"""The `TaskHead` interface: what a model family tells the generic LoRA training module and the shared tools.

A head owns its base model(s) and its objective. The LightningModule asks it which submodules may
receive LoRA (and with which default targets), gets a loss per training batch, and gets per-batch
tensors during validation that it collects (across processes too) and hands back for metrics.

A head class is also the one registry of its family: everything shared code needs to know about a family
comes from class attributes and hooks here, each with a neutral default: the FSDP block classes
(``fsdp_blocks``, read by ``strategies``), the kinds of batch it trains on (``batch_kinds``, checked against the
data by ``train``), the ``lightning-lora sample <name>`` command (``sample_command``, ``add_sample_arguments``,
``run_sample``) and the family's other commands (``commands``), both found by ``cli``, and how a tiny stand-in
base is made (``build_tiny``, the ``${tiny:PATH}`` resolver of ``config``). Adding a family means writing one
head; the module, the trainer entry, the strategies, the callbacks, the CLI and the adapters room do not change.
"""

from __future__ import annotations

import abc
import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft import PeftModel
from torch import nn

from lightning_lora.errors import UserError

if TYPE_CHECKING:
    from lightning_lora.publish import CardContext

#: a full fine-tuning snapshot's weights (``TaskHead.export_full_weights``' default)
FULL_WEIGHTS = "full_weights.safetensors"


@dataclass
class StepOutput:
    """A training step's loss, what to log beside it, and the batch size (for epoch averages)."""

    loss: torch.Tensor
    batch_size: int
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class HeadCommand:
    """A top-level ``lightning-lora <name>`` command a family adds (a tool of its own, e.g. preparing its data)."""

    name: str
    help: str  # one line, shown by ``lightning-lora --help``
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # the work; returns the exit status


class TaskHead(nn.Module, abc.ABC):
    """Base class of every family head (``heads/embedding.py``, ``heads/diffusion.py``, ...)."""

    #: family name written into adapter metadata ("embedding", "diffusion", "flow3d")
    family: ClassVar[str] = "generic"
    #: the validation metric a sweep or checkpoint callback should watch, and whether higher is better
    monitor: ClassVar[str] = "val/loss"
    monitor_mode: ClassVar[str] = "min"
    #: class names of the blocks FSDP makes one unit each (transformer/attention/residual blocks), so a unit
    #: holds one block's frozen weights and its adapter; matched by name, so no family library is imported
    fsdp_blocks: ClassVar[tuple[str, ...]] = ()
    #: packages (import names) beyond a plain install that the family needs; a missing one is one line naming the
    #: extra that brings it (``lightning_lora.extras``), checked by ``train.run`` and ``cli`` before anything loads
    requires: ClassVar[tuple[str, ...]] = ()
    #: ``lightning-lora sample <sample_command>`` runs ``run_sample`` (None: the family has no sample command)
    sample_command: ClassVar[str | None] = None
    #: the sample command's one-line help
    sample_help: ClassVar[str] = ""
    #: ``modelspec.architecture`` of the family's single-file and kohya exports (``<base architecture>/lora``, e.g.
    #: ``stable-diffusion-v1/lora``); "" writes ``<family>/lora``
    modelspec_architecture: ClassVar[str] = ""
    #: the Hub's ``library_name`` in a model card of this family's adapters (``peft`` or ``diffusers``)
    hub_library: ClassVar[str] = "peft"
    #: whether the class overrides ``preview_images`` (set for every subclass; a head that never draws is left
    #: out of SamplePreviews' work)
    draws_previews: ClassVar[bool] = False

    @abc.abstractmethod
    def adaptable_submodules(self) -> dict[str, nn.Module]:
        """Submodules LoRA may go into, by name (``encoder``, ``unet``, ``text_encoder``, ``denoiser``)."""

    @abc.abstractmethod
    def default_targets(self) -> dict[str, list[str]]:
        """Default LoRA targets per submodule; the keys are the submodules adapted when none are chosen."""

    def default_submodules(self) -> list[str]:
        """Submodules adapted when ``adapter.submodules`` is not set (default: every key of default_targets)."""
        return list(self.default_targets())

    def conv_targets(self) -> dict[str, list[str]]:
        """Convolution layers that ``adapter.conv_rank`` adds LoRA to, per submodule (none by default)."""
        return {}

    @abc.abstractmethod
    def training_step(self, batch: Any) -> StepOutput:
        """Loss of one training batch."""

    def validation_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-batch tensors to collect over the whole validation set. ``loss`` is either the batch's mean (logged
        as it comes, weighted by the batch's rows) or one value per row, averaged over the set's rows when the pass
        ends: each row once by its ``index`` when the batch has one (a row repeated to fill a single-bucket batch
        or to even out processes would count twice otherwise)."""
        return {"loss": self.training_step(batch).loss}

    def batch_rows(self, batch: Any) -> int | None:
        """How many samples ``batch`` holds: the weight of a batch-mean validation loss in the pass's average (None:
        the length of the per-row tensors ``validation_step`` returns beside it, else 1)."""
        return None

    def validation_metrics(self, collected: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics over everything ``validation_step`` returned, concatenated along dim 0 (all processes)."""
        return {}

    def extra_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Head parameters trained beside the adapter (e.g. a learnable temperature), saved with it."""
        return {}

    def on_strategy(self, strategy: str) -> None:
        """Told the Lightning strategy's class name before training (e.g. to turn off what it can't run)."""

    def preview_images(self) -> torch.Tensor | None:
        """Pictures of what the model makes now, [rows, cols, 3, H, W] in [0, 1] (None: nothing to show)."""
        return None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # read by callbacks that cannot import heads (SamplePreviews leaves a run of a head that never draws)
        cls.draws_previews = cls.preview_images is not TaskHead.preview_images

    def adaptation_measure(self) -> dict[str, Any] | None:
        """A figure independent of the loss, read before and after training by ``callbacks.AdaptationReport``
        when its config names no measure: ``{metric, value, images?, ...}`` (see there); None: nothing to report."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        """Trade compute for memory; must keep LoRA gradients flowing (non-reentrant checkpointing)."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def base_model_identity(self) -> dict[str, str]:
        """What base model the adapters belong to (path or hub name, revision), stored in adapter files."""
        return {}

    def modelspec_resolution(self) -> str | None:
        """``modelspec.resolution`` (``WIDTHxHEIGHT``) of the family's exports; None: not an image model."""
        return None

    def trigger_phrase(self) -> str | None:
        """``modelspec.trigger_phrase``: the words that call up what the adapter learned (None: none)."""
        return None

    def file_metadata(self, step: int | None = None) -> dict[str, str]:
        """The ``modelspec.*`` and ``ss_*`` keys for the family's single-file and kohya exports of a snapshot at
        ``step``: the run's (``run_metadata``, which ``LoRAAdaptationModule.describe_run`` sets from the training
        config) and the family's (architecture, resolution, trigger phrase)."""
        from lightning_lora.adapters.metadata import modelspec, strings

        run = dict(getattr(self, "run_metadata", None) or {})
        title = run.pop("modelspec.title", None) or f"{self.base_model_identity().get('name') or self.family} LoRA"
        spec = modelspec(architecture=self.modelspec_architecture or f"{self.family}/lora", title=title,
                         resolution=self.modelspec_resolution(), trigger_phrase=self.trigger_phrase(),
                         date=run.pop("modelspec.date", None))
        return {**run, **spec, **strings({"ss_steps": step})}

    def export_adapters(self, snapshot: Path, adapters: dict[str, PeftModel], step: int,
                        run_dir: Path | None = None) -> list[Path]:
        """Write the family's own adapter formats for a snapshot taken at optimizer step ``step``.

        ``snapshot`` is the snapshot's directory (it already holds one PEFT directory per submodule);
        ``run_dir`` is the run directory, for families whose tools expect files elsewhere (TRELLIS's
        ``lora_ckpts/``). Returns the files written.
        """
        return []

    def export_full_weights(self, snapshot: Path, submodules: list[str]) -> list[Path]:
        """Write a snapshot of a full fine-tuning run (``adapter.enabled=false``): the trained ``submodules`` whole.

        Default: ``full_weights.safetensors`` with every tensor of those submodules, keyed ``<submodule>.<name>``;
        a family may write its own loadable format instead (the embedding head: a transformers model folder)."""
        from safetensors.torch import save

        from lightning_lora.fileio import atomic_write_bytes

        available = self.adaptable_submodules()
        tensors = {f"{sub}.{k}": v.detach().cpu().contiguous()
                   for sub in submodules for k, v in available[sub].state_dict().items()}
        return [atomic_write_bytes(snapshot / FULL_WEIGHTS, save(tensors))]

    # ------------------------------------------------------------------ class-level hooks for shared tools
    @classmethod
    def batch_kinds(cls, preset: Mapping[str, Any]) -> tuple[str, ...]:
        """The kinds of batch a head built from ``preset`` (its model config, not instantiated) trains on, named as
        the data modules name what they yield (their ``batch_kind``). ``train.run`` compares the two before any
        weight or data is loaded; ``()`` (the default) declares nothing, and any data is tried."""
        return ()

    @classmethod
    def check_adapter(cls, spec: Any, preset: Mapping[str, Any]) -> None:
        """Refuse with one ``UserError`` line an adapter setting (``spec``: an ``AdapterSpec``) that this family's
        own exports cannot carry, e.g. DoRA where a file format has no place for its magnitude vectors. Called by
        ``train.run`` before anything loads and by the module before injecting; accepts everything by default."""

    @classmethod
    def add_sample_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the options of ``lightning-lora sample <sample_command>``."""

    @classmethod
    def run_sample(cls, args: argparse.Namespace) -> int:
        """Do the sample command's work with the parsed options; returns the exit status."""
        raise NotImplementedError(f"{cls.__name__} declares no sample command")

    @classmethod
    def commands(cls) -> tuple[HeadCommand, ...]:
        """The family's own top-level ``lightning-lora <name>`` commands (``cli`` adds them beside the generic
        tools); none by default."""
        return ()

    @classmethod
    def published_files(cls, run_dir: Path, snapshot: Path, step: int | None) -> dict[str, Path]:
        """Files of a snapshot (taken at ``step``) written outside its folder, which ``lightning-lora push``
        uploads beside it: name in the repository -> file (e.g. TRELLIS's ``lora_ckpts/``); none by default."""
        return {}

    @classmethod
    def card_usage(cls, card: CardContext) -> list[tuple[str, str]]:
        """(heading, Python code) for each way of loading the published files, shown in the model card (the
        code names ``card.repo_id`` and ``card.base``); none by default (the card then shows PEFT's own)."""
        return []

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        """Write a tiny stand-in base for ``preset`` (the model config that holds ``${tiny:PATH}``) at ``path``
        the first time, atomically, and return what the preset's key takes (a folder or a checkpoint file)."""
        raise UserError(f"{cls.__name__} has no tiny stand-in base; give the model's own weights instead")


def refuse_dora(spec: Any, exports: str) -> None:
    """One line for ``adapter.dora=true`` with a family whose ``exports`` have no place for DoRA's magnitudes."""
    if getattr(spec, "dora", False):
        raise UserError(f"adapter.dora=true is not supported here: {exports} cannot carry DoRA's magnitude vectors; "
                        "valid: adapter.dora=false (DoRA exports: the Stable Diffusion and embedding models)")


def head_classes() -> list[type[TaskHead]]:
    """Every head class defined so far (subclasses at any depth, abstract ones included), in definition order."""
    found: list[type[TaskHead]] = []
    todo = list(TaskHead.__subclasses__())
    while todo:
        cls = todo.pop(0)
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found
