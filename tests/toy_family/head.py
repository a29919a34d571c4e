"""The toy family's head: regression of the data's targets, a tiny stand-in base, FSDP blocks, a sample command."""

from __future__ import annotations

import argparse
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_lora import options
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory, atomic_write_bytes
from lightning_lora.heads.base import StepOutput, TaskHead

from .model import ToyModel

WEIGHTS = "model.safetensors"


class ToyHead(TaskHead):
    family: ClassVar[str] = "toy"
    fsdp_blocks: ClassVar[tuple[str, ...]] = ("ToyBlock",)
    sample_command: ClassVar[str | None] = "toy"
    sample_help: ClassVar[str] = "the toy model's output on seeded noise, with a LoRA at a scale"

    def __init__(self, pretrained: str, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.model = ToyModel(dim, depth)
        self.model.load_state_dict(load_file(Path(pretrained) / WEIGHTS))
        self.pretrained = str(pretrained)

    def adaptable_submodules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def default_targets(self) -> dict[str, list[str]]:
        return {"model": ["to_q", "to_v"]}

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        loss = nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        return StepOutput(loss, batch_size=batch["x"].shape[0])

    def enable_gradient_checkpointing(self) -> None:
        self.model.use_checkpoint = True

    def base_model_identity(self) -> dict[str, str]:
        return {"name": "toy", "path": self.pretrained}

    @classmethod
    def build_tiny(cls, path: Path, preset: Mapping[str, Any]) -> str:
        if not (path / WEIGHTS).is_file():
            torch.manual_seed(0)
            model = ToyModel(int(preset.get("dim", 16)), int(preset.get("depth", 2)))
            with atomic_directory(path) as tmp:
                save_file(model.state_dict(), str(tmp / WEIGHTS))
        return str(path)

    @classmethod
    def add_sample_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--pretrained", required=True, help="a toy model folder")
        parser.add_argument("--lora", help="adapter file or PEFT directory")
        parser.add_argument("--scale", type=float, default=1.0)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", required=True, help="output .npz")
        parser.add_argument("--overwrite", action="store_true")

    @classmethod
    def run_sample(cls, args: argparse.Namespace) -> int:
        from lightning_lora.adapters import load_lora_weights, set_adapter_scale

        out = Path(args.out)
        options.check_out(out, args.overwrite)
        if not (Path(args.pretrained) / WEIGHTS).is_file():
            raise UserError(f"--pretrained {args.pretrained}: no {WEIGHTS} there")
        head = cls(args.pretrained).eval()
        if args.lora:
            load_lora_weights(head.model, args.lora)
            set_adapter_scale(head.model, args.scale)
        x = torch.randn(4, head.model.dim, generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            y = head.model(x)
        buffer = io.BytesIO()
        np.savez(buffer, output=y.numpy())
        atomic_write_bytes(out, buffer.getvalue())
        print(f"wrote {out}")
        return 0
