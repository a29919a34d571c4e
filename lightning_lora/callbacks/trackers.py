"""What the run tells the trackers beyond Lightning's own logging.

``log_image``: one picture to every configured logger that takes images, each through its own API: TensorBoard
``add_image``, wandb ``WandbLogger.log_image``, MLflow ``MlflowClient.log_image`` (an image with a key and a step,
shown in the run's image timeline); the CSV logger and loggers of other kinds take none. Called on global rank 0
(the loggers' experiments exist only there).

``end_runs``: wandb keeps one run per process until ``wandb.finish()`` (Lightning leaves it open, for notebooks),
so the next job of a sweep run in the same process would log into this one; ``train.run`` ends it after each run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger


def _tensorboard(logger: TensorBoardLogger, key: str, picture: torch.Tensor, pixels: np.ndarray, step: int) -> None:
    logger.experiment.add_image(key, picture, step)


def _wandb(logger: WandbLogger, key: str, picture: torch.Tensor, pixels: np.ndarray, step: int) -> None:
    logger.log_image(key=key, images=[pixels], step=step)


def _mlflow(logger: MLFlowLogger, key: str, picture: torch.Tensor, pixels: np.ndarray, step: int) -> None:
    logger.experiment.log_image(logger.run_id, pixels, key=key, step=step)


Sender = Callable[[Logger, str, torch.Tensor, np.ndarray, int], None]
#: a logger class -> how a picture reaches it (the first matching class wins; subclasses match too)
SENDERS: tuple[tuple[type[Logger], Sender], ...] = (
    (TensorBoardLogger, _tensorboard),
    (WandbLogger, _wandb),
    (MLFlowLogger, _mlflow),
)


def log_image(loggers: Iterable[Logger], key: str, picture: torch.Tensor, step: int) -> list[Logger]:
    """Log ``picture`` ([3, H, W] in [0, 1]) as ``key`` at ``step`` to each logger that takes images; returns
    those it reached."""
    picture = picture.detach().float().cpu().clamp(0, 1)
    pixels = (picture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # H, W, 3: what wandb/MLflow take
    reached = []
    for logger in loggers:
        send = next((s for cls, s in SENDERS if isinstance(logger, cls)), None)
        if send is not None:
            send(logger, key, picture, pixels, step)
            reached.append(logger)
    return reached


def end_runs(loggers: Iterable[Logger]) -> None:
    """End the process's wandb run when a wandb logger took part (a no-op when none was started)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
