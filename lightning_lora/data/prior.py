"""DreamBooth prior preservation (``data=dreambooth``): the instance images of an image folder plus class images
of the same kind, as diffusers' ``train_dreambooth_lora.py`` trains with them.

``class_dir`` should hold ``num_class_images`` images of the class (``class_prompt``, e.g. "a photo of a dog"). When
it holds fewer, ``train.run`` asks the data module to make the rest with the base model before any adapter exists
(``setup_with_model(head)``: the head's ``sample(prompts, seeds, steps, guidance)``), one PNG per seed
``class_NNNNN.png``, each written atomically with a progress bar, so a killed run keeps what it made and the next
run reuses every image already there (as the diffusers script does, generated images are never replaced).

With several processes on a node started together (torchrun, srun), each makes its share of the missing seeds (seed
``class_seed + k`` by local rank ``k mod`` the node's process count), then waits until the folder holds them all (up
to ``CLASS_WAIT_SECONDS``): N processes draw N times faster instead of drawing the same images N times. Without a
process count, local rank 0 draws them all. Lightning's own launcher starts the other ranks only as training starts,
after rank 0 drew them all.

Every training batch holds ``batch_size`` instance rows followed by as many class rows (the i-th item pairs
instance ``i mod n_instance`` with class ``i mod n_class``; an epoch is as long as the larger set) and a boolean
``prior_mask`` marking the class rows: the head computes ``instance loss + prior_loss_weight * class loss``.
Validation uses the instance images only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_lora.checks import positive_int
from lightning_lora.data.images import (
    IMAGE_EXTENSIONS,
    ImageCaptionDataset,
    ImageFolderDataModule,
    ImageRecord,
    collate_images,
)
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_bytes

CLASS_IMAGE = "class_{:05d}.png"
#: how long a process waits for the class images the node's other processes make, and how often it looks
CLASS_WAIT_SECONDS, CLASS_POLL_SECONDS = 3 * 3600.0, 5.0


def _node_share() -> tuple[int, int]:
    """(this process's rank on its node, the node's process count) as torchrun (``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``) or srun (``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE``) set them; (0, 1) alone. A rank
    without a count gets (rank, 1): local rank 0 then makes every image and the others wait for it."""
    for rank_name, count_name in (("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")):
        rank = os.environ.get(rank_name, "")
        if rank.isdigit():
            count = os.environ.get(count_name, "")
            return int(rank), int(count) if count.isdigit() and int(count) > int(rank) else 1
    return 0, 1


def class_images(folder: Path) -> list[Path]:
    """The images in ``folder`` (not below it), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


class PriorPairs(Dataset):
    """Instance item ``i mod n`` with class item ``i mod m``; as long as the larger of the two sets."""

    def __init__(self, instances: Dataset, classes: Dataset) -> None:
        self.instances, self.classes = instances, classes

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"instance": self.instances[index % len(self.instances)],
                "class": self.classes[index % len(self.classes)]}


def collate_prior(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The instance rows, then the class rows, with ``prior_mask`` (True on class rows); class ids follow the
    instance ids (offset by 1e9) so no row id is shared."""
    instance = collate_images([s["instance"] for s in samples])
    prior = collate_images([s["class"] for s in samples])
    return {
        "pixel_values": torch.cat([instance["pixel_values"], prior["pixel_values"]]),
        "text": list(instance["text"]) + list(prior["text"]),
        "index": torch.cat([instance["index"], prior["index"] + 1_000_000_000]),
        "prior_mask": torch.arange(2 * len(samples)) >= len(samples),
    }


class DreamBoothDataModule(ImageFolderDataModule):
    """An image folder (``train_dir``, as ``data=image_folder``) trained beside class images (``class_dir``)."""

    def __init__(self, class_dir: str, class_prompt: str, num_class_images: int = 100,
                 class_sample_steps: int = 25, class_guidance_scale: float = 7.5, class_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(class_dir, str) or not class_dir.strip():
            raise UserError(f"data.class_dir={class_dir!r} must be a folder for the class images (made when missing)")
        if not isinstance(class_prompt, str) or not class_prompt.strip():
            raise UserError(f"data.class_prompt={class_prompt!r} must be the class's prompt, e.g. 'a photo of a dog'")
        self.class_dir = Path(class_dir).expanduser().resolve()
        if self.class_dir.exists() and not self.class_dir.is_dir():
            raise UserError(f"data.class_dir={class_dir} is a file; give a folder for the class images")
        self.class_prompt = class_prompt
        self.num_class_images = positive_int(num_class_images, "data.num_class_images", got=True)
        self.class_sample_steps = positive_int(class_sample_steps, "data.class_sample_steps", got=True)
        self.class_guidance_scale, self.class_seed = float(class_guidance_scale), int(class_seed)
        self.generated: list[Path] = []

    def missing_class_images(self) -> int:
        return max(0, self.num_class_images - len(class_images(self.class_dir)))

    def setup_with_model(self, head: Any) -> None:
        """Make the missing class images with ``head`` (the base model: no adapter exists yet), one seed each. With
        several processes on the node (``_node_share``), each makes its share of the seeds, then waits for the rest."""
        present = {p.name for p in class_images(self.class_dir)}  # one look: every process agrees on the seeds
        missing = max(0, self.num_class_images - len(present))
        if not missing:
            return
        seeds, seed = [], self.class_seed  # the first `missing` seeds whose file is not there
        while len(seeds) < missing:
            if CLASS_IMAGE.format(seed) not in present:  # a file of an earlier run stays as it is
                seeds.append(seed)
            seed += 1
        rank, processes = _node_share()
        # by seed, not by place in the list: a process that looks later, after others wrote, draws the same seeds
        mine = [s for s in seeds if (s - self.class_seed) % processes == rank] if rank < processes else []
        if mine:
            self._draw(head, mine)
        if self.missing_class_images():
            self._wait_for_class_images()

    def _draw(self, head: Any, seeds: list[int]) -> None:
        from tqdm.auto import tqdm

        self.class_dir.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(seeds), desc=f"class images ({self.class_prompt})", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            for seed in seeds:
                path = self.class_dir / CLASS_IMAGE.format(seed)
                if not path.exists():
                    image = head.sample([self.class_prompt], [seed], self.class_sample_steps, self.class_guidance_scale)
                    self.generated.append(atomic_write_bytes(path, _png(image[0])))
                bar.update(1)

    def _wait_for_class_images(self) -> None:
        waited, told = 0.0, False
        while (missing := self.missing_class_images()) > 0:
            if waited >= CLASS_WAIT_SECONDS:
                raise UserError(f"data.class_dir={self.class_dir} still lacks {missing} of data.num_class_images="
                                f"{self.num_class_images} class images after {waited:.0f} s waiting for the node's "
                                "other processes to make them; make them first with one process (trainer.devices=1), "
                                "or check that they are running and write this folder")
            if not told:
                print(f"local rank {_node_share()[0]}: waiting for the node's other processes to make {missing} class "
                      f"images in {self.class_dir}", file=sys.stderr)
                told = True
            time.sleep(CLASS_POLL_SECONDS)
            waited += CLASS_POLL_SECONDS

    def _class_set(self) -> ImageCaptionDataset:
        found = class_images(self.class_dir)[: self.num_class_images]
        if len(found) < self.num_class_images:
            raise UserError(f"data.class_dir={self.class_dir} holds {len(found)} of data.num_class_images="
                            f"{self.num_class_images} class images; python -m lightning_lora.train makes the rest "
                            "with the base model (from Python: datamodule.setup_with_model(head) before training)")
        records = [ImageRecord(path, path.name, self.class_prompt, i) for i, path in enumerate(found)]
        return ImageCaptionDataset(records, self.train_transform, self.skip_unreadable)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        pairs = PriorPairs(self.train_set, self._class_set())
        return DataLoader(pairs, batch_size=self.batch_size, shuffle=True,
                          drop_last=len(pairs) >= self.batch_size, num_workers=self.num_workers,
                          collate_fn=collate_prior, persistent_workers=self.num_workers > 0)


def _png(image: torch.Tensor) -> bytes:
    """[3, H, W] in [0, 1] -> PNG bytes."""
    import io

    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
