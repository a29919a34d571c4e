"""What other tools read in a LoRA file's safetensors metadata besides the factors: the model spec
(``modelspec.*``, Stability AI's ModelSpec 1.0.0: architecture, title, resolution, date, trigger phrase) that
A1111/ComfyUI/Civitai-style tools show, and kohya sd-scripts' training keys (``ss_*``, the names its
``train_network.py`` writes: learning rate, steps, batch, network arguments, base model name and hash).

Every value is a string (safetensors metadata holds strings only); an unknown value is left out rather than
written as ``"None"``. What the architecture and the resolution are comes from the caller (a family's head):
nothing here names a family.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODELSPEC_VERSION = "1.0.0"
#: where the files come from (``modelspec.implementation``)
IMPLEMENTATION = "lightning_lora (PEFT LoRA)"
#: ``ss_network_module`` of the self-describing single files (PEFT's LoRA; kohya files say ``networks.lora``)
PEFT_NETWORK_MODULE = "peft.tuners.lora"


def _text(value: Any) -> str | None:
    """A metadata string: JSON for mappings and lists, ``str`` otherwise, None for nothing."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def strings(values: Mapping[str, Any]) -> dict[str, str]:
    """``values`` as safetensors metadata: strings only, unknown (None/"") values dropped."""
    return {k: text for k, v in values.items() if (text := _text(v)) is not None}


def today() -> str:
    """``modelspec.date``: ISO-8601, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def modelspec(*, architecture: str | None, title: str, resolution: str | None = None, trigger_phrase: str | None = None,
              date: str | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys of a LoRA (``architecture`` as ``<base architecture>/lora``; None: unknown, left
    out)."""
    return strings({
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": date or today(),
        "modelspec.trigger_phrase": trigger_phrase,
    })


def training_keys(*, learning_rate: float | None = None, max_train_steps: int | None = None,
                  batch_size_per_device: int | None = None, network_dim: int | None = None,
                  network_alpha: float | None = None, network_dropout: float | None = None,
                  network_args: Mapping[str, Any] | None = None, lr_scheduler: str | None = None,
                  lr_warmup_steps: int | None = None, gradient_accumulation_steps: int | None = None,
                  mixed_precision: str | None = None, seed: int | None = None, sd_model_name: str | None = None,
                  new_sd_model_hash: str | None = None, training_comment: str | None = None) -> dict[str, str]:
    """kohya's ``ss_*`` keys of a training run (only those given)."""
    return strings({
        "ss_learning_rate": learning_rate,
        "ss_max_train_steps": max_train_steps,
        "ss_batch_size_per_device": batch_size_per_device,
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": network_dropout,
        "ss_network_args": dict(network_args) if network_args is not None else None,
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": lr_warmup_steps,
        "ss_gradient_accumulation_steps": gradient_accumulation_steps,
        "ss_mixed_precision": mixed_precision,
        "ss_seed": seed,
        "ss_sd_model_name": sd_model_name,
        "ss_new_sd_model_hash": new_sd_model_hash,
        "ss_training_comment": training_comment,
    })


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """The SHA-256 of a base model that is one file (kohya's ``ss_new_sd_model_hash``: the whole checkpoint's);
    None for a folder or nothing (a hash of one part of a folder would name no file a tool can match)."""
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
