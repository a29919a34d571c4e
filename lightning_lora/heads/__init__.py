"""Task heads, one file per model family, each implementing `heads.base.TaskHead`.

``registered_heads()`` is how shared code finds the families without naming them: it imports every module of
this package and every module that an installed distribution names in the ``lightning_lora.heads`` entry-point
group (a family kept outside this repository), then returns every ``TaskHead`` subclass defined, including
ones the caller imported itself.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from lightning_lora.heads.base import HeadCommand, StepOutput, TaskHead, head_classes

#: entry-point group through which another distribution adds a family (``module`` or ``module:HeadClass``)
ENTRY_POINT_GROUP = "lightning_lora.heads"


def registered_heads() -> list[type[TaskHead]]:
    """Every head class: this package's, the entry points', and any other already imported."""
    for info in pkgutil.iter_modules(__path__, prefix=f"{__name__}."):
        importlib.import_module(info.name)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()
    return head_classes()


__all__ = ["ENTRY_POINT_GROUP", "HeadCommand", "StepOutput", "TaskHead", "registered_heads"]
