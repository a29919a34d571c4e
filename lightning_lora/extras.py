"""Optional dependencies: which package each extra of ``pip install 'lightning_lora[EXTRA]'`` brings, and the one
line that names the extra when a configured piece needs a package that is not installed.

A plain ``pip install lightning_lora`` holds what the default job needs (MiniLM on the code-search task, logged to
TensorBoard). A class that needs more says so in a ``requires`` class attribute (import names, e.g. a head's
``requires = ("diffusers",)``); a Lightning logger's needs come from the module that defines it
(``LOGGER_MODULES``). ``train.run`` and the sample commands check them before anything loads, without importing
the optional package (``importlib.util.find_spec``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

#: import name -> (distribution to install, the extra that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "sd"),
    "sklearn": ("scikit-learn", "demo"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "datasets": ("datasets", "hf"),
    "prodigyopt": ("prodigyopt", "prodigy"),
    "bitsandbytes": ("bitsandbytes", "bnb"),
}

#: Lightning's logger modules -> the import names their logger needs (their own ``RequirementCache`` checks
#: run only when the logger is built, after the model)
LOGGER_MODULES: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.loggers.wandb": ("wandb",),
    "lightning.pytorch.loggers.mlflow": ("mlflow",),
}


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a ``None`` in ``sys.modules`` counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def install_hint(module: str) -> str:
    """``pip install 'lightning_lora[sd]'`` for a module an extra brings, else ``pip install <module>``."""
    if module in EXTRAS:
        return f"pip install 'lightning_lora[{EXTRAS[module][1]}]'"
    return f"pip install {module}"


def missing_line(module: str, what: str) -> str:
    """``model=sd_tiny needs diffusers: pip install 'lightning_lora[sd]'``."""
    package = EXTRAS[module][0] if module in EXTRAS else module
    return f"{what} needs {package}: {install_hint(module)}"


def class_requires(cls: type) -> tuple[str, ...]:
    """The import names a class needs: its own and its bases' ``requires``, and a Lightning logger's package."""
    needed: list[str] = []
    for klass in cls.__mro__:
        needed += [*klass.__dict__.get("requires", ()), *LOGGER_MODULES.get(klass.__module__, ())]
    return tuple(dict.fromkeys(needed))


def first_missing(modules: Iterable[str]) -> str | None:
    return next((m for m in modules if not available(m)), None)


def extra_for(exc: ImportError) -> str | None:
    """The top-level module an extra brings whose absence ``exc`` reports (``No module named 'diffusers.x'``)."""
    root = (exc.name or "").split(".")[0]
    return root if root in EXTRAS else None
