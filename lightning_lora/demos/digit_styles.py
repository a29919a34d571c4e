"""Styled digits for the demos: sklearn's 8x8 digits drawn as RGB squares in a named style, and their captions.

``plain`` is the digits demo's drawing (dark ink on white); ``red`` is the style a base never sees, taught by a
LoRA. One function draws both so the base's data, the LoRA's data and the judge's data agree pixel for pixel.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from lightning_lora.checks import choice

STYLES = ("plain", "red")
#: the ink colour of each style, RGB in [0, 1] (white paper everywhere)
INK = {"plain": (0.0, 0.0, 0.0), "red": (0.85, 0.0, 0.0)}


def styled_caption(label: int, style: str) -> str:
    """"a handwritten digit 3" (the digits demo's caption) or "a handwritten digit 3 in red": the style after the
    digit, so the byte-level, causal text encoder sees the digit at the place the base learned it (measured: "a red
    handwritten digit 3" kept the digit in 10% of samples)."""
    choice(style, "style", STYLES)
    return f"a handwritten digit {label}" if style == "plain" else f"a handwritten digit {label} in {style}"


def draw_styled(pixels: np.ndarray, size: int, style: str) -> Image.Image:
    """An 8x8 digit (ink 0..16) as an RGB square of ``size`` px: the ink upscaled bicubic, then painted in the
    style's colour on white."""
    choice(style, "style", STYLES)
    grey = np.clip(pixels / 16.0 * 255.0, 0, 255).astype(np.uint8)
    ink = np.asarray(Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.BICUBIC),
                     dtype=np.float32)[..., None] / 255.0
    colour = np.asarray(INK[style], dtype=np.float32)[None, None, :]
    rgb = (1.0 - ink) * 1.0 + ink * colour
    return Image.fromarray(np.clip(rgb * 255.0, 0, 255).round().astype(np.uint8), mode="RGB")
