"""The judge of the digit demos: scikit-learn classifiers, trained on the styled digits themselves (not on any
model's output or loss), that say which digit and which style an image shows.

Features are style-free for the digit (the ink, ``1 - min`` over the colour channels, box-resized to 8x8: the
digits' own grid) and ink-weighted colour means for the style, so the two answers do not lean on each other.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lightning_lora.demos.digit_styles import STYLES, draw_styled

GRID = 8


def _as_arrays(images) -> np.ndarray:
    """Images as float RGB [N, H, W, 3] in [0, 1]: a tensor [N, 3, H, W] in [0, 1] or a list of PIL images."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def ink_features(rgb: np.ndarray) -> np.ndarray:
    """[N, 64]: each image's ink (dark or coloured marks on white) on an 8x8 grid, scaled to 0..16 like sklearn."""
    ink = 1.0 - rgb.min(axis=-1)
    small = [np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((GRID, GRID), Image.Resampling.BOX))
             for a in ink]
    return np.stack(small).reshape(len(rgb), -1) * 16.0


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """[N, 3]: the ink-weighted mean colour (what colour the marks are, whatever their shape)."""
    ink = (1.0 - rgb.min(axis=-1))[..., None]
    weight = ink.sum(axis=(1, 2)) + 1e-6
    return (rgb * ink).sum(axis=(1, 2)) / weight


class DigitJudge:
    """``judge(images) -> (digits, styles)``; fitted on sklearn's digits drawn in every style at ``size`` px."""

    def __init__(self, size: int = 16, train_count: int = 1400, seed: int = 0) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC

        digits = load_digits()
        self.size, self.train_count = size, train_count
        self._pixels, self._labels = digits.images, digits.target
        rgb, labels, styles = self.drawn(range(train_count))
        self.digit = SVC(gamma="scale", C=10.0, random_state=seed).fit(ink_features(rgb), labels)
        self.style = LogisticRegression(max_iter=1000).fit(colour_features(rgb), styles)

    def drawn(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The digits at ``indices`` drawn in every style: RGB arrays, digit labels, style indices."""
        indices = list(indices)
        rgb = np.stack([np.asarray(draw_styled(self._pixels[i], self.size, s), dtype=np.float32) / 255.0
                        for s in STYLES for i in indices])
        labels = np.concatenate([self._labels[indices] for _ in STYLES])
        styles = np.repeat(np.arange(len(STYLES)), len(indices))
        return rgb, labels, styles

    def held_out_accuracy(self) -> tuple[float, float]:
        """Digit and style accuracy on the digits it was not fitted on."""
        rgb, labels, styles = self.drawn(range(self.train_count, len(self._labels)))
        digits, judged = self.predict_arrays(rgb)
        return float((digits == labels).mean()), float((judged == np.asarray(STYLES)[styles]).mean())

    def predict_arrays(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        digits = self.digit.predict(ink_features(rgb))
        styles = np.asarray(STYLES)[self.style.predict(colour_features(rgb))]
        return digits, styles

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Digits (ints) and styles (names) of ``images``: a tensor [N, 3, H, W] in [0, 1] or PIL images."""
        return self.predict_arrays(_as_arrays(images))

    def score(self, images, digits: list[int], style: str) -> dict[str, float]:
        """The share of ``images`` judged to show ``style`` and the share showing the digit each was asked for."""
        judged_digits, judged_styles = self(images)
        return {"style_share": float((judged_styles == style).mean()),
                "digit_accuracy": float((judged_digits == np.asarray(digits)).mean())}
