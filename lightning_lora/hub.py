"""Models and adapters named by a local path or a Hugging Face Hub id, resolved through ``huggingface_hub``.

A name is read as follows:

- an existing local file or folder, or anything starting with ``/``, ``./``, ``../`` or ``~``: a local path;
- ``org/name`` or ``org/name@revision``: a Hub repository (a branch, tag or commit; default ``main``);
- ``org/name/path/in/repo.ext`` (also ``org/name@revision/path``): one file of a repository;
- the same with an ``hf://`` prefix, to say "the Hub" when a local folder of that name exists too.

Files come through the Hub cache (``HF_HUB_CACHE`` / ``HF_HOME``), so a second run downloads nothing;
``HF_HUB_OFFLINE=1`` reads the cache only, ``HF_TOKEN`` opens gated repositories. Each family asks only for the
files it needs (``allow_patterns``), so a Stable Diffusion repository does not pull every variant. What was
resolved in this process (repository, requested and resolved revision) is kept for ``environment.json``.
A name that cannot be resolved is one ``UserError`` line naming it and saying how to fetch it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_lora.errors import UserError

HF_PREFIX = "hf://"
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
# org/name[@revision][/path/in/repo]: the Hub's repository-name characters (letters, digits, - _ .)
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w.-]+))?(?:/(?P<path>.+))?$")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HubRef:
    """A repository (``path`` None) or one file of it, at ``revision`` (None: the default branch)."""

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f"/{self.path}" if self.path else "")


@dataclass(frozen=True)
class Resolution:
    """What a Hub name resolved to: the commit of the snapshot and the local path (for environment.json)."""

    name: str
    repo_id: str
    revision: str | None
    commit: str | None
    path: str


_RESOLVED: dict[str, Resolution] = {}
_MEMO: dict[tuple, Path] = {}


def parse(name: str | os.PathLike) -> HubRef | None:
    """The Hub reference ``name`` stands for, or None when it names a local path."""
    text = str(name)
    explicit = text.startswith(HF_PREFIX)
    if explicit:
        text = text[len(HF_PREFIX):]
    elif Path(text).expanduser().exists() or text.startswith(_LOCAL_PREFIXES) or re.match(r"^[A-Za-z]:[\\/]", text):
        return None
    match = _HUB_ID.match(text)
    if match is None:
        if explicit:
            raise UserError(f"{name}: not a Hub name; write hf://org/name[@revision][/path/in/repo]")
        return None
    return HubRef(match["repo"], match["revision"], match["path"])


def is_hub_name(name: str | os.PathLike | None) -> bool:
    """Does ``name`` refer to the Hub (rather than to a local path)?"""
    return bool(name) and parse(name) is not None  # type: ignore[arg-type]


def identity(name: str | os.PathLike, local: Path) -> tuple[str, str]:
    """(what names the model, its short name) for adapter metadata: a Hub id and its repository name rather than
    this machine's cache path, a local path and its folder name otherwise."""
    ref = parse(name) if name else None
    if ref is None:
        return str(local), local.name
    return str(name).removeprefix(HF_PREFIX), ref.repo_id.rsplit("/", 1)[-1]


def offline() -> bool:
    """Offline mode, read from the environment at each call (tests and users may set it after import)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _cache_dir() -> str | None:
    """The Hub cache named by the environment now (huggingface_hub reads it once, at import)."""
    if cache := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return cache
    if home := os.environ.get("HF_HOME"):
        return str(Path(home) / "hub")
    return None


def _fetch_hint(ref: HubRef, patterns: Sequence[str] | None) -> str:
    """The command that puts ``ref`` into the cache on a machine with internet."""
    args = [ref.repo_id]
    if ref.path:
        args.append(ref.path)
    if ref.revision:
        args += ["--revision", ref.revision]
    if patterns and not ref.path:
        args += ["--include", *(f"'{p}'" for p in patterns)]
    return "hf download " + " ".join(args)


def _commit_of(path: Path) -> str | None:
    """The commit hash of a path inside the cache (``.../snapshots/<commit>/...``)."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _failure(key: str, name: str, ref: HubRef, exc: Exception, patterns: Sequence[str] | None) -> UserError:
    """One line for a Hub name that could not be resolved, saying why and what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{key}={name}" if key else name
    hint = _fetch_hint(ref, patterns)
    if isinstance(exc, GatedRepoError):
        why = f"{ref.repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN"
    elif isinstance(exc, RepositoryNotFoundError):
        why = f"no repository {ref.repo_id} on the Hub (or it is private: set HF_TOKEN); for a local path, check it"
    elif isinstance(exc, RevisionNotFoundError):
        why = f"{ref.repo_id} has no revision {ref.revision!r}"
    elif isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        why = f"{ref.repo_id} has no file {ref.path!r}"
    elif offline():
        why = (f"not in the Hugging Face cache ({_cache_dir() or 'the default cache'}) and this machine is offline "
               f"(HF_HUB_OFFLINE=1); fetch it on a machine with internet first: {hint}")
    else:
        why = (f"not in the Hugging Face cache and the Hub could not be reached (no connection?); fetch it first "
               f"with: {hint}, or give a local path")
    return UserError(f"{where}: {why}")


@contextlib.contextmanager
def _quiet_hub_logs():
    """huggingface_hub logs each failed request (no network, offline) as a warning before raising; the one-line
    error made from what it raises says it all, so its log lines stay out of the console meanwhile."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _record(name: str, ref: HubRef, path: Path) -> Path:
    _RESOLVED[name] = Resolution(name, ref.repo_id, ref.revision, _commit_of(path), str(path))
    return path


def resolve(name: str | os.PathLike, *, key: str = "", allow_patterns: Sequence[str] | None = None,
            companions: Sequence[str] = (), optional_companions: Sequence[str] = (),
            fallback_patterns: Sequence[str] = ()) -> Path:
    """The local path ``name`` stands for: a local path as given (``~`` expanded), or the cached copy of a Hub
    repository (``allow_patterns``: only these files) or of one Hub file (and its ``companions``, the same path with
    another suffix, e.g. the ``.json`` of a TRELLIS ``.safetensors``; ``optional_companions`` when they exist).
    ``fallback_patterns`` are fetched too when the repository has no ``.safetensors`` among the allowed files
    (``*.bin`` in an older repository). ``key`` names the setting in errors."""
    ref = parse(name)
    if ref is None:
        return Path(name).expanduser()
    memo = (str(name), tuple(allow_patterns or ()), tuple(companions), tuple(optional_companions),
            tuple(fallback_patterns))
    if memo not in _MEMO:  # one lookup per name in a process: loaders ask again for the same weights
        _MEMO[memo] = _resolve_hub(str(name), ref, key, allow_patterns, companions, optional_companions,
                                   fallback_patterns)
    return _MEMO[memo]


def _resolve_hub(name: str, ref: HubRef, key: str, allow_patterns: Sequence[str] | None, companions: Sequence[str],
                 optional_companions: Sequence[str], fallback_patterns: Sequence[str]) -> Path:
    common = {"revision": ref.revision, "cache_dir": _cache_dir(), "local_files_only": offline()}
    with _quiet_hub_logs():
        return _fetch(name, ref, key, common, allow_patterns, companions, optional_companions, fallback_patterns)


def _fetch(name: str, ref: HubRef, key: str, common: dict, allow_patterns: Sequence[str] | None,
           companions: Sequence[str], optional_companions: Sequence[str], fallback_patterns: Sequence[str]) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        if ref.path is None:
            folder = Path(snapshot_download(
                ref.repo_id, allow_patterns=list(allow_patterns) if allow_patterns else None, **common))
            if fallback_patterns and not any(folder.rglob("*.safetensors")):
                folder = Path(snapshot_download(ref.repo_id, allow_patterns=[*(allow_patterns or []),
                                                                             *fallback_patterns], **common))
            return _record(name, ref, folder)
        file = Path(hf_hub_download(ref.repo_id, ref.path, **common))
        for suffix in companions:
            hf_hub_download(ref.repo_id, str(Path(ref.path).with_suffix(suffix)), **common)
        for suffix in optional_companions:  # a local-cache miss offline is an EntryNotFoundError too
            with contextlib.suppress(EntryNotFoundError):
                hf_hub_download(ref.repo_id, str(Path(ref.path).with_suffix(suffix)), **common)
        return _record(name, ref, file)
    except Exception as exc:  # the Hub's errors, network errors, a broken cache entry
        raise _failure(key, name, ref, exc, allow_patterns) from None


def resolutions() -> list[dict[str, str | None]]:
    """Every Hub name resolved in this process (repository, requested revision, resolved commit, local path)."""
    return [asdict(r) for r in _RESOLVED.values()]
