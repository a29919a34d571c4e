"""``bench/results.md`` holds the current result of each benchmark once: one section per script, between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` (NAME = the script's stem), replaced whole by that script's next
run. Earlier results live in git history (``git log -p bench/results.md``).

    from _results import header, write_section      # bench/ is on sys.path when a bench script runs
    lines = header("loop_bench", ["lightning", "peft"])  # title, date, machine, versions, exact command
    write_section("loop_bench", "\\n".join(lines + table))
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("results.md")
PREAMBLE = (
    "# Benchmark results\n\n"
    "The current result of each benchmark in `bench/`, once: each script replaces its own section (between its "
    "`<!-- <script>:start -->` / `<!-- <script>:end -->` markers) when it runs, headed by the date, the machine, the "
    "library versions and the exact command. Earlier results are in git history (`git log -p bench/results.md`).\n"
)


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"benchmark name {name!r}: letters, digits, '_', '.', '-' only")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def command_line(argv: Sequence[str] | None = None) -> str:
    """``python bench/<script>.py <args>`` as this process was started (shell-quoted)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    shown = f"bench/{script.name}" if script.parent.name == "bench" else str(argv[0])
    return shlex.join(["python", shown, *argv[1:]])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(ln.split()[1]) / 2**20 for ln in f if ln.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return None


def header(name: str, packages: Sequence[str] = (), argv: Sequence[str] | None = None,
           machine: str = "") -> list[str]:
    """A section's first lines: ``## NAME <date>``, then machine, versions (python, torch + ``packages``) and
    command. ``machine`` adds what the script knows of its setting (threads, device, load)."""
    ram = _ram_gib()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    where = ", ".join(x for x in (
        f"{platform.node() or 'vm'} {platform.machine()}", f"cpus={os.cpu_count()}", f"RAM {ram:.1f} GiB" if ram
        else "", f"load average (1 min) {load:.1f} when written" if load is not None else "", machine) if x)
    versions = ", ".join([f"python {platform.python_version()}",
                          *(f"{p} {_version(p)}" for p in ("torch", *packages))])
    return [f"## {name} {dt.datetime.now().isoformat(timespec='seconds')}", f"machine: {where}",
            f"versions: {versions}", f"command: `{command_line(argv)}`"]


def write_section(name: str, body: str, path: str | os.PathLike = RESULTS) -> Path:
    """Replace ``name``'s section of ``path`` by ``body`` (appended when the file has none; the file is made with
    the preamble when missing); written atomically."""
    from lightning_lora.fileio import atomic_write_text
    start, end = _markers(name)
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else PREAMBLE
    block = f"{start}\n{body.strip()}\n{end}"
    found = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if text.count(start) != text.count(end) or text.count(start) > 1:
        raise ValueError(f"{path}: the markers of section {name!r} are not one {start} ... {end} pair; fix the file")
    if found.search(text):
        text = found.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return atomic_write_text(path, text)


def read_section(name: str, path: str | os.PathLike = RESULTS) -> str | None:
    """The body of ``name``'s section, or None when the file has none."""
    start, end = _markers(name)
    path = Path(path)
    if not path.exists():
        return None
    match = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), path.read_text(encoding="utf-8"), re.DOTALL)
    return match.group(1) if match else None
