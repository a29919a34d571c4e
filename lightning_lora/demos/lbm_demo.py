"""The LBM demo (``experiment=demo_lbm``): a LoRA teaches the digits base (``demos/lbm_base.py``, digit -> inverted
digit) a different translation (digit -> relit digit), measured by PSNR and SSIM to held-out targets.

:class:`TranslationMeasure` is the ``AdaptationReport`` measure: it translates held-out digits (never trained on,
by the base or by the LoRA) with the head's own sampler and compares the outputs with the targets of the taught
translation using torchmetrics; the figure is the PSNR, SSIM is kept beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_lora.checks import choice, positive_int
from lightning_lora.data.digits import TRANSLATION_TRANSFORMS
from lightning_lora.errors import UserError

DIGITS = 1797  # sklearn's digits


def translation_scores(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of ``outputs`` against ``targets``, both [N, 3, H, W] in [0, 1]."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    outputs, targets = outputs.float().cpu(), targets.float().cpu()
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))(outputs, targets)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0)(outputs, targets)
    return {"psnr": float(psnr), "ssim": float(ssim)}


class TranslationMeasure:
    """``measure(head)``: the held-out digits ``start..stop-1`` translated by ``head.translate`` (one seed), scored
    against their ``transform`` targets: ``value`` = PSNR (dB), ``ssim``; ``images`` = ``shown`` rows of
    source | output | target."""

    def __init__(self, transform: str = "relight", start: int | None = None, stop: int | None = None,
                 resolution: int | None = None, num_inference_steps: int = 1, seed: int = 0, shown: int = 8) -> None:
        from lightning_lora.demos import lbm_base

        choice(transform, "transform", TRANSLATION_TRANSFORMS)
        self.transform = transform
        self.start = lbm_base.HELD_OUT[0] if start is None else start
        self.stop = lbm_base.HELD_OUT[1] if stop is None else stop
        if not 0 <= self.start < self.stop <= DIGITS:
            raise UserError(f"measure start={self.start}, stop={self.stop}: held-out digits need "
                            f"0 <= start < stop <= {DIGITS} (sklearn has {DIGITS} digits)")
        self.resolution = positive_int(resolution or lbm_base.RESOLUTION, "resolution", got=True)
        self.steps = positive_int(num_inference_steps, "num_inference_steps", got=True)
        self.seed, self.shown = seed, shown
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, targets) in [-1, 1], drawn once."""
        if self._pairs is None:
            from lightning_lora.demos.lbm_base import digit_pairs

            self._pairs = digit_pairs(self.transform, self.start, self.stop, self.resolution)
        return self._pairs

    def __call__(self, head: Any) -> dict[str, Any]:
        sources, targets = self.pairs()
        outputs = head.translate(sources, self.steps, seed=self.seed).cpu()
        sources, outputs, targets = ((x + 1) / 2 for x in (sources, outputs, targets))
        scores = translation_scores(outputs.clamp(0, 1), targets)
        rows = torch.stack([sources, outputs.clamp(0, 1), targets], dim=1)[: self.shown]
        return {"metric": f"{self.transform} PSNR to held-out targets (dB)", "value": scores["psnr"],
                "ssim": scores["ssim"], "images": rows}


def measure_base(path: str | Path, transform: str) -> dict[str, Any]:
    """:class:`TranslationMeasure` on the base folder at ``path`` (no adapter), through the demo's own head."""
    from lightning_lora.demos.lbm_base import RESOLUTION
    from lightning_lora.heads.bridge import BridgeHead

    head = BridgeHead(pretrained=str(path), resolution=RESOLUTION).eval()
    return TranslationMeasure(transform)(head)
