"""Publishing a run's adapter: ``lightning-lora push RUN_DIR REPO_ID`` and the ``PushToHub`` callback.

What is uploaded is one folder: every file of the chosen snapshot (``adapters/<snapshot>/``: a PEFT directory per
adapted submodule and every format the family wrote, plus what the family wrote for it outside the snapshot,
``TaskHead.published_files``), the run's preview pictures under ``images/`` and a generated ``README.md`` model
card. The card's metadata header is the Hub's (``base_model`` when the base came from the Hub, ``library_name``
from the head, ``tags`` with ``lora`` and the family; no license: that is the author's choice); its text says
what was trained (from the snapshot's PEFT configs, ``metrics.json``, the run's config), the metrics before and
after training, and shows copy-paste loading code for each format (``TaskHead.card_usage``; PEFT's when the
family gives none). Everything is read from the run directory: no model is loaded.

Every mistake (not a run directory, no such snapshot, a repository id the Hub refuses) is one line before any
network call; the upload goes through ``huggingface_hub.HfApi`` (``create_repo``, ``create_branch``,
``upload_folder``). ``--dry-run`` writes the folder instead and prints its path last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_directory, atomic_write_text

CARD_NAME = "README.md"
IMAGES_DIR = "images"
RUN_CONFIG = "config.yaml"
#: the tag every card carries besides ``lora`` and the family (what made the adapter)
PROJECT_TAG = "lightning-lora"


@dataclass
class CardContext:
    """What a head's ``card_usage`` writes loading code from."""

    repo_id: str
    base: str  # the base model's Hub id, or its path as the run recorded it
    base_on_hub: bool
    files: list[str]  # the repository's files (relative names), README.md excepted
    model: dict[str, Any]  # the run's model config (resolved)
    snapshot: Path  # the snapshot folder in the run directory
    trigger: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Publication:
    """A run's snapshot ready to be staged: where everything comes from and the card's text."""

    run_dir: Path
    snapshot: Path
    repo_id: str
    files: dict[str, Path]  # name in the repository -> file on disk
    card: str


# ---------------------------------------------------------------------------- checks (before any network)
def check_repo_id(repo_id: str) -> str:
    """``repo_id`` as the Hub's own validator accepts it (``name`` or ``namespace/name``), else one line."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"repository id {repo_id!r} is not valid on the Hub: {reason}") from None
    return repo_id


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"RUN_DIR {run_dir}: no such directory (give a run directory, e.g. outputs/<date>/<time>)")
    if not (path / RUN_CONFIG).is_file() or not (path / "adapters").is_dir():
        raise UserError(f"RUN_DIR {run_dir} is not a run directory: it needs {RUN_CONFIG} and adapters/ (written by "
                        "python -m lightning_lora.train)")
    return path


def check_snapshot(run_dir: Path, name: str) -> Path:
    snapshot = run_dir / "adapters" / name
    if not snapshot.is_dir():
        found = sorted(p.name for p in (run_dir / "adapters").iterdir() if p.is_dir())
        raise UserError(f"--snapshot {name}: {run_dir}/adapters has no such snapshot; it has "
                        f"{', '.join(found) or 'none (the run wrote no adapter)'}")
    return snapshot


# ---------------------------------------------------------------------------- reading the run
def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _config(run_dir: Path, name: str = RUN_CONFIG) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = run_dir / name
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    except Exception as exc:  # a damaged file: say which one
        raise UserError(f"{path}: cannot read the run's config ({type(exc).__name__}: {exc})") from None


def head_class(model: Mapping[str, Any], run_dir: Path) -> type:
    """The head class the run's ``model._target_`` names (imported, not built)."""
    from hydra.utils import get_class

    from lightning_lora.heads.base import TaskHead

    target = model.get("_target_")
    try:
        cls = get_class(str(target))
    except Exception:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, TaskHead)):
        raise UserError(f"{run_dir / RUN_CONFIG}: model._target_={target} is not a head class this installation "
                        "has")
    return cls


def hub_base(run_dir: Path, model: Mapping[str, Any]) -> str | None:
    """The base model's Hub id: ``model.pretrained`` when it names a Hub repository; or ``model.name`` when the
    weights are a pip package's copy of a Hub model (``${pkg_model_path:...}``, e.g. the default job's MiniLM)."""
    from lightning_lora import hub

    pretrained = model.get("pretrained")
    if isinstance(pretrained, str) and (ref := hub.parse(pretrained)) is not None:
        return ref.repo_id
    raw = _config(run_dir / ".hydra", "config.yaml").get("model", {}) if (run_dir / ".hydra" / "config.yaml"
                                                                          ).is_file() else {}
    name = model.get("name")
    if str(raw.get("pretrained", "")).startswith("${pkg_model_path:") and isinstance(name, str) and hub.parse(name):
        return name
    return None


def data_name(run_dir: Path, data: Mapping[str, Any]) -> str:
    """``data=<option>`` as Hydra recorded the run's choice, else the data module's class name."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        choice = ((_config(run_dir / ".hydra", "hydra.yaml").get("hydra") or {}).get("runtime") or {}).get(
            "choices", {}).get("data")
        if choice:
            return f"data={choice}"
    return str(data.get("_target_", "unknown")).rsplit(".", 1)[-1]


def snapshot_step(snapshot: Path, metrics: Mapping[str, Any]) -> int | None:
    """The optimizer step a snapshot was taken at: ``step_N``'s N, the run's last step for ``final``."""
    if snapshot.name.startswith("step_") and snapshot.name[5:].isdigit():
        return int(snapshot.name[5:])
    step = metrics.get("global_step")
    return int(step) if isinstance(step, int) else None


def adapter_rows(snapshot: Path) -> list[tuple[str, str, str, str]]:
    """(submodule, r, alpha, targets) of each PEFT directory of the snapshot (per-module ranks noted)."""
    from lightning_lora.adapters.io import CONFIG_NAME, is_submodule_dir

    rows = []
    for part in sorted(p for p in snapshot.iterdir() if is_submodule_dir(p)):
        config = _json(part / CONFIG_NAME)
        targets = config.get("target_modules")
        shown = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
        r = str(config.get("r"))
        if config.get("rank_pattern"):
            r += f" (+{len(config['rank_pattern'])} per-module)"
        rows.append((part.name, r, f"{config.get('lora_alpha')}", shown))
    return rows


def preview_images(run_dir: Path, snapshot: Path, step: int | None) -> dict[str, Path]:
    """The run's pictures for the card: the base model's previews and the snapshot's (``step_N.png`` at its step,
    else the newest), or the adaptation report's ``before_after.png``."""
    samples = run_dir / "samples"
    if not samples.is_dir():
        return {}
    chosen: dict[str, Path] = {}
    if (samples / "base.png").is_file():
        chosen["base"] = samples / "base.png"
    steps = sorted(samples.glob("step_*.png"))
    exact = samples / f"step_{step:07d}.png" if step is not None else None
    if exact is not None and exact.is_file():
        chosen["lora"] = exact
    elif steps and snapshot.name == "final":
        chosen["lora"] = steps[-1]
    if (samples / "before_after.png").is_file():
        chosen["before_after"] = samples / "before_after.png"
    return chosen


# ---------------------------------------------------------------------------- the card
def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """Markdown rows: every metric measured after training, beside its value before (if measured)."""
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if not after:
        return []
    lines = ["| metric | before | after |", "| --- | --- | --- |"]
    for key, value in after.items():
        lines.append(f"| {key} | {_number(before[key]) if key in before else ''} | {_number(value)} |")
    return lines


def adaptation_table(adaptation: Mapping[str, Any]) -> list[str]:
    """Markdown rows of ``metrics.json``'s ``adaptation`` block (a measure other than the loss)."""
    if not adaptation:
        return []
    lines = ["| measure | before | after |", "| --- | --- | --- |",
             f"| {adaptation.get('metric')} | {_number(adaptation.get('before'))} | "
             f"{_number(adaptation.get('after'))} |"]
    for key, value in adaptation.items():
        if isinstance(value, dict):
            lines.append(f"| {key} | {_number(value.get('before'))} | {_number(value.get('after'))} |")
    return lines


def generic_usage(card: CardContext) -> list[tuple[str, str]]:
    """PEFT's own loading, one PEFT directory per adapted submodule (a family that shows nothing else)."""
    subs = sorted({name.split("/", 1)[0] for name in card.files if name.endswith("/adapter_config.json")})
    lines = ["from peft import PeftModel", ""]
    for sub in subs:
        lines.append(f"# {sub}: the base model's {sub} submodule, built as the run built it")
        lines.append(f'{sub} = PeftModel.from_pretrained({sub}, "{card.repo_id}", subfolder="{sub}")')
    return [("PEFT", "\n".join(lines))]


def card_text(cls: type, context: CardContext, *, metrics: Mapping[str, Any], data: str, step: int | None,
              images: Mapping[str, str], rows: list[tuple[str, str, str, str]]) -> str:
    """The ``README.md``: the Hub's metadata header, then what was trained, the results, pictures and code."""
    from huggingface_hub import ModelCard, ModelCardData

    family = cls.family
    header = ModelCardData(base_model=context.base if context.base_on_hub else None, library_name=cls.hub_library,
                           tags=["lora", family, PROJECT_TAG])
    title = f"{family} LoRA for {context.base}" if context.base_on_hub else f"{family} LoRA"
    body = [f"# {title}", "",
            f"A LoRA adapter for `{context.base}` ({family} family, `{cls.__name__}`), trained with lightning_lora.",
            "No license is set: add `license:` to the metadata above before sharing.", "",
            "## What was trained", "",
            "| | |", "| --- | --- |",
            f"| base model | `{context.base}` |",
            f"| family | {family} |",
            f"| dataset | {data} |",
            f"| steps | {step if step is not None else 'unknown'} |",
            f"| trainable parameters | {metrics.get('trainable_params', 'unknown'):,} |"
            if isinstance(metrics.get("trainable_params"), int) else "| trainable parameters | unknown |"]
    if context.trigger:
        body.append(f"| trigger phrase | `{context.trigger}` |")
    body += ["", "| submodule | r | alpha | targets |", "| --- | --- | --- | --- |"]
    body += [f"| {sub} | {r} | {alpha} | {targets} |" for sub, r, alpha, targets in rows]
    results = metrics_table(metrics)
    adaptation = adaptation_table(metrics.get("adaptation") or {})
    if results or adaptation:
        body += ["", "## Results", ""]
        if results:
            body += ["Validation before and after training:", "", *results]
        if adaptation:
            body += ["", "A measure other than the loss, before and after training:", "", *adaptation]
    if images:
        body += ["", "## Previews", ""]
        captions = {"base": "base model", "lora": "with this LoRA", "before_after": "before (top) and after "
                    "(bottom) training"}
        body += [f"![{captions.get(key, key)}]({name})" for key, name in images.items()]
    body += ["", "## Files", ""]
    body += [f"- `{name}`" for name in context.files]
    body += ["", "## Use", ""]
    for heading, code in cls.card_usage(context) or generic_usage(context):
        body += [f"### {heading}", "", "```python", code, "```", ""]
    return str(ModelCard(f"---\n{header.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"))


# ---------------------------------------------------------------------------- assembling the folder
def prepare(run_dir: str | os.PathLike, repo_id: str, snapshot: str = "final") -> Publication:
    """Everything a push needs, read from the run directory, checked before any network call."""
    check_repo_id(repo_id)
    root = check_run_dir(run_dir)
    folder = check_snapshot(root, snapshot)
    config = _config(root)
    if (config.get("adapter") or {}).get("enabled") is False:
        raise UserError(f"{root} was trained without LoRA (adapter.enabled=false): its snapshots hold the whole "
                        "trained submodules, not an adapter; push publishes LoRA adapters")
    model = config.get("model") or {}
    cls = head_class(model, root)
    metrics = _json(root / "metrics.json")
    step = snapshot_step(folder, metrics)
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files.update(cls.published_files(root, folder, step))
    images = {key: f"{IMAGES_DIR}/{path.name}" for key, path in preview_images(root, folder, step).items()}
    files.update({name: root / "samples" / Path(name).name for name in images.values()})
    hub_id = hub_base(root, model)
    base = hub_id or str(model.get("pretrained") or model.get("ckpt") or model.get("name") or "unknown")
    context = CardContext(repo_id=repo_id, base=base, base_on_hub=hub_id is not None, files=sorted(files),
                          model=model, snapshot=folder, trigger=model.get("trigger") or None)
    card = card_text(cls, context, metrics=metrics, data=data_name(root, config.get("data") or {}), step=step,
                     images=images, rows=adapter_rows(folder))
    return Publication(root, folder, repo_id, files, card)


def stage(publication: Publication, out: str | os.PathLike) -> Path:
    """Write the folder that would be uploaded at ``out`` (atomically: all of it, or nothing)."""
    with atomic_directory(out) as tmp:
        for name, source in publication.files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        atomic_write_text(tmp / CARD_NAME, publication.card)
    return Path(out)


def upload(publication: Publication, *, private: bool = False, revision: str | None = None,
           commit_message: str | None = None, token: str | None = None) -> str:
    """Create the repository (kept if it exists), the branch ``revision`` if asked, and upload the folder in one
    commit; returns the commit's URL. A refusal or a network failure is one line."""
    from huggingface_hub import HfApi

    from lightning_lora import hub

    if hub.offline():
        raise UserError(f"cannot push to {publication.repo_id}: this machine is offline (HF_HUB_OFFLINE=1); try "
                        "--dry-run to see the folder, or push from a machine with internet")
    api = HfApi(token=token)
    message = commit_message or f"Upload LoRA adapter ({publication.snapshot.name}) with lightning_lora"
    with tempfile.TemporaryDirectory(prefix="lightning-lora-push-") as tmp:
        staged = stage(publication, Path(tmp) / "repo")
        try:
            repo = api.create_repo(publication.repo_id, private=private, repo_type="model", exist_ok=True)
            repo_id = getattr(repo, "repo_id", publication.repo_id)
            if revision:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=staged, repo_type="model", revision=revision,
                                       commit_message=message)
        except UserError:
            raise
        except Exception as exc:  # the Hub's refusals (401, 403, 404), network errors
            first = " ".join((str(exc).strip().splitlines() or [type(exc).__name__])[0].split())[:200]
            raise UserError(f"push to {publication.repo_id} failed: {type(exc).__name__}: {first} (log in with "
                            "`hf auth login` or pass --token / set HF_TOKEN)") from None
    return str(getattr(commit, "commit_url", commit))


def dry_run_folder(repo_id: str, out: str | os.PathLike | None, overwrite: bool) -> Path:
    """Where ``--dry-run`` writes: ``out`` (refused when it holds anything, unless ``overwrite``), else a new
    temporary folder named after the repository."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="lightning-lora-push-")) / repo_id.rsplit("/", 1)[-1]
    path = Path(out).expanduser()
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not overwrite):
        raise UserError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    return path
