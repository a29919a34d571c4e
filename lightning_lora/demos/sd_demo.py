"""The Stable Diffusion demo (``experiment=demo_sd``): a LoRA teaches the digits base (``demos/sd_base.py``) a style
it never saw (red ink), judged by :class:`~lightning_lora.demos.digit_judge.DigitJudge` before and after.

- :class:`StyledDigitsDataModule` (``data=styled_digits``): the digits in one style with their styled captions,
  written once as an image folder and read through the same code as user data;
- :class:`DigitStyleMeasure`: the ``AdaptationReport`` measure: samples every digit's styled prompt with a few
  seeds, and reports the share judged to show the style (the figure) and the share showing the requested digit.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lightning_lora.checks import choice, optional_positive_int, positive_int
from lightning_lora.data.digits import ReadThroughDataModule
from lightning_lora.data.images import CAPTIONED_IMAGES, METADATA_FILE, ImageFolderDataModule
from lightning_lora.demos.digest import arrays_digest
from lightning_lora.demos.digit_styles import STYLES, draw_styled, styled_caption
from lightning_lora.fileio import atomic_directory


def styled_digits_digest(digits: Any, style: str, image_size: int) -> str:
    """The digest (``arrays_digest``) of the first digit as ``style`` draws it and of every digit's caption: a
    changed drawing or caption writes a new folder instead of reusing the old one."""
    captions = "\n".join(styled_caption(label, style) for label in range(10)).encode()
    drawn = np.asarray(draw_styled(digits.images[0], image_size, style))
    return arrays_digest([drawn, np.frombuffer(captions, dtype=np.uint8)])


def write_styled_digits(root: str | Path, style: str, num_images: int | None, image_size: int) -> Path:
    """``root/<style>_n<N>_s<size>_<digest>/NNNN.png`` + ``metadata.jsonl`` (styled caption, label); written once."""
    from sklearn.datasets import load_digits

    choice(style, "data.style", STYLES)
    optional_positive_int(num_images, "data.num_images", got=True)
    positive_int(image_size, "data.image_size", got=True)
    digits = load_digits()
    digest = styled_digits_digest(digits, style, image_size)
    folder = Path(root).expanduser().resolve() / f"{style}_n{num_images or 'all'}_s{image_size}_{digest}"
    if (folder / METADATA_FILE).is_file():
        return folder
    count = len(digits.images) if num_images is None else min(num_images, len(digits.images))
    with atomic_directory(folder) as tmp:
        lines = []
        for i in range(count):
            name, label = f"{i:04d}.png", int(digits.target[i])
            draw_styled(digits.images[i], image_size, style).save(tmp / name, format="PNG")
            lines.append(json.dumps({"file_name": name, "text": styled_caption(label, style), "label": label}))
        (tmp / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


class StyledDigitsDataModule(ReadThroughDataModule):
    """sklearn's digits in ``style`` captioned "a handwritten digit 3 in red", read as an image folder."""

    requires: ClassVar[tuple[str, ...]] = ("sklearn",)  # the digits and the judge: the [demo] extra
    batch_kind: ClassVar[str] = CAPTIONED_IMAGES

    def __init__(self, root: str, style: str = "red", num_images: int | None = 512, image_size: int = 16,
                 resolution: int = 16, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__()
        self.folder = write_styled_digits(root, style, num_images, image_size)
        self.inner = ImageFolderDataModule(str(self.folder), val_fraction=val_fraction, resolution=resolution,
                                           **kwargs)


@lru_cache(maxsize=2)
def digit_judge(size: int):
    from lightning_lora.demos.digit_judge import DigitJudge

    return DigitJudge(size=size)


class DigitStyleMeasure:
    """``measure(head)``: ``seeds_per_digit`` samples of each digit's styled prompt, judged: ``value`` = the share in
    ``style``, ``digit_accuracy`` = the share showing the digit asked for; ``images`` = a row per digit."""

    def __init__(self, style: str = "red", seeds_per_digit: int = 10, num_inference_steps: int = 20,
                 guidance_scale: float = 3.0, shown_per_digit: int = 8) -> None:
        choice(style, "style", STYLES)
        self.style, self.seeds = style, positive_int(seeds_per_digit, "seeds_per_digit", got=True)
        self.steps, self.guidance = num_inference_steps, guidance_scale
        self.shown = min(shown_per_digit, seeds_per_digit)

    def __call__(self, head: Any) -> dict[str, Any]:
        digits = list(range(10))
        images = head.sample([styled_caption(d, self.style) for d in digits], list(range(self.seeds)),
                             self.steps, self.guidance)
        scores = digit_judge(int(images.shape[-1])).score(images, [d for d in digits for _ in range(self.seeds)],
                                                          self.style)
        grid = images.view(len(digits), self.seeds, *images.shape[1:])[:, :self.shown]
        return {"metric": f"{self.style} style share (judge)", "value": scores["style_share"],
                "digit_accuracy": scores["digit_accuracy"], "images": grid}


def judge_base(path: str | Path, style: str, seeds_per_digit: int = 10) -> dict[str, Any]:
    """:class:`DigitStyleMeasure` on the base folder at ``path`` (no adapter), through the demo's own head."""
    from lightning_lora.heads.diffusion import DiffusionHead

    head = DiffusionHead(pretrained=str(path), resolution=16).eval()
    return DigitStyleMeasure(style, seeds_per_digit)(head)
