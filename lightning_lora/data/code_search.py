"""A real code-search task built offline: docstring summary -> source of the function/class it documents.

The corpus is the Python standard library installed on this machine, so it needs no download and is the
same on every run here. Pairs are split by module, so validation measures retrieval on unseen modules.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
from pathlib import Path

from lightning_lora.checks import fraction, non_negative_int, positive_int
from lightning_lora.data.pairs import PairsDataModule
from lightning_lora.data.text import undecodable
from lightning_lora.errors import UserError
from lightning_lora.fileio import atomic_write_text

# Bump when the extraction logic changes, so stale caches are rebuilt rather than reused.
FORMAT_VERSION = 2
# Sentinel for "the default cache directory"; ``None`` disables the cache.
DEFAULT_CACHE = "default"

SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "__pycache__",
    }
)
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Fields of statements (and of except/case clauses) that hold nested statements.
_STMT_LIST_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def default_cache_dir() -> Path:
    env = os.environ.get("LIGHTNING_LORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_lora"


def iter_stdlib_modules(stdlib_dir: Path) -> list[tuple[str, Path]]:
    """``(dotted module name, path)`` for every importable ``.py`` file, in sorted, stable order."""
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(stdlib_dir):
        # Pruning in place stops os.walk descending (site-packages alone can dwarf the stdlib).
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and d.isidentifier())
        rel_root = Path(root).relative_to(stdlib_dir)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext != ".py" or not stem.isidentifier():
                continue
            parts = [*rel_root.parts, stem] if stem != "__init__" else list(rel_root.parts)
            if parts:
                found.append((".".join(parts), Path(root) / name))
    found.sort(key=lambda item: item[0])
    return found


def docstring_summary(node: ast.AST) -> str:
    """First paragraph of the docstring, on one line."""
    doc = ast.get_docstring(node, clean=True) or ""
    first = _PARAGRAPH_BREAK.split(doc.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _docstring_expr(node: ast.AST) -> ast.Expr | None:
    body = getattr(node, "body", None)
    if not body or not isinstance(body[0], ast.Expr):
        return None
    value = body[0].value
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return body[0]
    return None


def _owns_its_lines(expr: ast.Expr, lines: list[str]) -> bool:
    """True when nothing but the docstring sits on its lines, so deleting whole lines is safe."""
    first = lines[expr.lineno - 1]
    last = lines[expr.end_lineno - 1]
    before = first.encode("utf-8")[: expr.col_offset].decode("utf-8", "replace")
    after = last.encode("utf-8")[expr.end_col_offset :].decode("utf-8", "replace")
    return not before.strip() and (not after.strip() or after.strip().startswith("#"))


def _is_trivial_body(stmts: list[ast.stmt]) -> bool:
    def trivial(s: ast.stmt) -> bool:
        return isinstance(s, ast.Pass) or (
            isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and s.value.value is Ellipsis
        )

    return all(trivial(s) for s in stmts)


def iter_definitions(tree: ast.AST) -> list[ast.AST]:
    """Every function/class definition at any depth, in source order.

    Walks statement lists only: definitions never sit inside expressions, and skipping those makes this
    several times faster than ``ast.walk`` on large modules.
    """
    found: list[ast.AST] = []

    def visit(stmts: list) -> None:
        for stmt in stmts:
            if isinstance(stmt, _DEFS):
                found.append(stmt)
            for field in _STMT_LIST_FIELDS:
                children = getattr(stmt, field, None)
                if children:
                    visit(children)

    visit(getattr(tree, "body", []))
    found.sort(key=lambda n: (n.lineno, n.col_offset))
    return found


def definition_code(node: ast.AST, nested: list[ast.AST], lines: list[str], max_code_lines: int) -> str | None:
    """Source of ``node`` (decorators included) without docstrings, dedented and truncated.

    ``nested`` are the definitions inside ``node``. Their docstrings are removed too: a class's code would
    otherwise contain its methods' summaries verbatim, making the class a near-copy of those queries.
    Returns None when only ``pass``/``...`` is left or the docstring cannot be cut out cleanly.
    """
    own = _docstring_expr(node)
    if own is None or _is_trivial_body(node.body[1:]):
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    end = node.end_lineno
    replace: dict[int, str | None] = {}  # 1-based line -> replacement (None = drop the line)
    for inner in [node, *nested]:
        expr = _docstring_expr(inner)
        if expr is None:
            continue
        if not _owns_its_lines(expr, lines):
            if inner is node:
                return None  # e.g. `def f(): "doc"; ...`
            continue  # a nested one-liner: keep it rather than break the code
        for i in range(expr.lineno, expr.end_lineno + 1):
            replace[i] = None
        if len(inner.body) > 1:
            # Blank lines between the docstring and the code would leave a gap; drop them too.
            i = expr.end_lineno + 1
            while i < inner.body[1].lineno and not lines[i - 1].strip():
                replace[i] = None
                i += 1
        else:
            # The nested body was only a docstring: keep the code valid Python.
            first = lines[expr.lineno - 1]
            replace[expr.lineno] = first[: len(first) - len(first.lstrip())] + "..."
    out = [lines[i - 1] if i not in replace else replace[i] for i in range(start, end + 1)]
    # Strip the definition's own indentation (not textwrap.dedent, which a flush-left string literal
    # inside the body would defeat). Indentation is ASCII, so the byte-based col_offset is a char count.
    width = node.col_offset
    code = [ln[width:] if ln[:width].strip() == "" else ln for ln in out if ln is not None]
    code = [ln.rstrip() for ln in code[:max_code_lines]]
    return "\n".join(code).strip("\n")


def _read_source(path: Path) -> str | None:
    """The text of one module in the encoding it declares (PEP 263; UTF-8 by default), None when it cannot be read.
    Bytes its encoding cannot decode are the user's data to fix, not a module to drop silently: one line naming the
    file, line and byte offset."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:  # an unknown coding cookie, or a BOM that contradicts it
        raise UserError(f"{path}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise undecodable(str(path), data, exc, encoding=encoding) from None


def extract_module_pairs(source: str, module: str, max_code_lines: int, min_summary_words: int) -> list[dict]:
    """All (summary, code) candidates of one module, in source order; no de-duplication here."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    # Split on "\n" only: str.splitlines also breaks on form feeds etc., which ast does not count.
    lines = source.split("\n")
    defs = iter_definitions(tree)
    pairs: list[dict] = []
    for index, node in enumerate(defs):
        summary = docstring_summary(node)
        if len(summary.split()) < min_summary_words:
            continue
        # Definitions nest properly, so the ones inside ``node`` are exactly those that start in its span.
        nested = []
        for inner in defs[index + 1 :]:
            if inner.lineno > node.end_lineno:
                break
            nested.append(inner)
        code = definition_code(node, nested, lines, max_code_lines)
        if not code:
            continue
        pairs.append({"query": summary, "positive": code, "negatives": [], "module": module})
    return pairs


def is_val_module(module: str, val_fraction: float) -> bool:
    # A hash of the name (not random) keeps each module's split fixed as other modules come and go.
    return int(hashlib.sha1(module.encode()).hexdigest(), 16) % 10_000 < val_fraction * 10_000


def _build(
    stdlib_dir: Path, val_fraction: float, max_code_lines: int, min_summary_words: int
) -> tuple[list[dict], list[dict]]:
    train: list[dict] = []
    val: list[dict] = []
    seen_queries: set[str] = set()
    seen_code: set[str] = set()
    for module, path in iter_stdlib_modules(stdlib_dir):
        source = _read_source(path)
        if source is None:
            continue
        for pair in extract_module_pairs(source, module, max_code_lines, min_summary_words):
            # Duplicates would be false negatives for each other under in-batch contrastive loss.
            if pair["query"] in seen_queries or pair["positive"] in seen_code:
                continue
            seen_queries.add(pair["query"])
            seen_code.add(pair["positive"])
            (val if is_val_module(module, val_fraction) else train).append(pair)
    return train, val


def _cache_path(cache_dir: Path, stdlib_dir: Path, args: dict) -> Path:
    key = json.dumps(
        {"format": FORMAT_VERSION, "python": sys.version, "stdlib": str(stdlib_dir), **args}, sort_keys=True
    )
    return cache_dir / f"code_search-{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"


def _load_cache(path: Path) -> tuple[list[dict], list[dict]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        train, val = data["train"], data["val"]
        if not (isinstance(train, list) and isinstance(val, list)):
            return None
        if not all(isinstance(p, dict) and {"query", "positive", "module"} <= p.keys() for p in train + val):
            return None
        return train, val
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or corrupt: rebuild and overwrite


def check_build_args(val_fraction: float, max_code_lines: int, min_summary_words: int) -> None:
    fraction(val_fraction, "data.val_fraction", got=True)
    positive_int(max_code_lines, "data.max_code_lines", got=True)
    non_negative_int(min_summary_words, "data.min_summary_words", got=True)


def build_code_search_pairs(
    stdlib_dir: str | Path | None = None,
    val_fraction: float = 0.16,
    max_code_lines: int = 40,
    min_summary_words: int = 4,
    cache_dir: str | Path | None = DEFAULT_CACHE,
) -> tuple[list[dict], list[dict]]:
    """Build ``(train, val)`` pairs ``{"query", "positive", "negatives": [], "module"}`` from the stdlib.

    ``cache_dir``: ``"default"`` uses ``$LIGHTNING_LORA_CACHE`` or ``~/.cache/lightning_lora``; ``None``
    always rebuilds and writes nothing.
    """
    check_build_args(val_fraction, max_code_lines, min_summary_words)
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"]).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data.stdlib_dir: directory not found: {root}")
    args = {"val_fraction": val_fraction, "max_code_lines": max_code_lines, "min_summary_words": min_summary_words}

    cache_file = None
    if cache_dir is not None:
        base = default_cache_dir() if cache_dir == DEFAULT_CACHE else Path(cache_dir).expanduser()
        cache_file = _cache_path(base, root, args)
        cached = _load_cache(cache_file)
        if cached is not None:
            return cached

    train, val = _build(root, **args)
    if not train:
        raise UserError(f"data.stdlib_dir: no documented Python definitions found under {root}")
    if cache_file is not None:
        # A read-only home must not stop training; the next run just rebuilds.
        with contextlib.suppress(OSError):
            atomic_write_text(cache_file, json.dumps({"train": train, "val": val}))
    return train, val


class CodeSearchDataModule(PairsDataModule):
    """Docstring -> code retrieval pairs from the local standard library (see ``build_code_search_pairs``)."""

    def __init__(
        self,
        batch_size: int = 32,
        val_batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        val_fraction: float = 0.16,
        max_code_lines: int = 40,
        min_summary_words: int = 4,
        stdlib_dir: str | None = None,
        cache_dir: str | None = DEFAULT_CACHE,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            shuffle=shuffle,
            drop_last=drop_last,
            max_train_samples=max_train_samples,
            max_val_samples=max_val_samples,
        )
        # Checked here too so a bad value fails before the model loads, not at setup().
        check_build_args(val_fraction, max_code_lines, min_summary_words)
        self.val_fraction = val_fraction
        self.max_code_lines = max_code_lines
        self.min_summary_words = min_summary_words
        self.stdlib_dir = stdlib_dir
        self.cache_dir = cache_dir

    def load_pairs(self) -> tuple[list[dict], list[dict]]:
        return build_code_search_pairs(
            stdlib_dir=self.stdlib_dir,
            val_fraction=self.val_fraction,
            max_code_lines=self.max_code_lines,
            min_summary_words=self.min_summary_words,
            cache_dir=self.cache_dir,
        )
