"""Caption handling in training, as kohya's sd-scripts and diffusers' scripts offer it (all off by default).

- ``caption_dropout``: the caption becomes the empty prompt with this probability, so the LoRA also learns the
  unconditional prediction classifier-free guidance subtracts (diffusers' ``--proportion_empty_prompts``, kohya's
  ``--caption_dropout_rate``). The head caches text embeddings by caption, so the empty prompt is encoded once.
- ``shuffle_tags``: the caption's comma-separated tags in a new order each time, the first ``keep_tokens`` tags
  kept in place (kohya's ``--shuffle_caption`` / ``--keep_tokens``), joined with ``", "``.

Draws come from torch's global RNG in the process that builds the batch, like the crops and flips, so
``seed_everything`` fixes them and ``ExactResume`` resumes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_lora.checks import fraction, non_negative_int
from lightning_lora.errors import UserError


@dataclass(frozen=True)
class CaptionPolicy:
    dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0

    def __post_init__(self) -> None:
        fraction(self.dropout, "data.caption_dropout", interval="[0, 1]", got=True)
        non_negative_int(self.keep_tokens, "data.keep_tokens", got=True)
        if not isinstance(self.shuffle_tags, bool):
            raise UserError(f"data.shuffle_tags: must be true or false, got {self.shuffle_tags!r}")

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.shuffle_tags

    def __call__(self, caption: str) -> str:
        """The caption as this training step sees it (one dropout draw first, then the shuffle's, when on)."""
        if self.dropout > 0 and torch.rand(()).item() < self.dropout:
            return ""
        if self.shuffle_tags:
            return shuffle_tags(caption, self.keep_tokens)
        return caption


def shuffle_tags(caption: str, keep: int, generator: torch.Generator | None = None) -> str:
    """The tags after the first ``keep`` in a random order (torch's RNG, or ``generator``)."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    fixed, rest = tags[:keep], tags[keep:]
    if len(rest) > 1:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join(fixed + rest)


__all__ = ["CaptionPolicy", "shuffle_tags"]
