"""``bench/_results.py``: each benchmark owns one section of ``bench/results.md``, replaced whole by its next run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_replaces_its_own_section_and_keeps_the_others(results, tmp_path):
    path = tmp_path / "results.md"
    results.write_section("alpha", "## alpha 1\n| a |", path)
    results.write_section("beta", "## beta 1\n| b |", path)
    results.write_section("alpha", "## alpha 2\n| a2 |", path)
    text = path.read_text()
    assert text.startswith(results.PREAMBLE)
    assert "## alpha 1" not in text and text.count("## alpha 2") == 1 and text.count("## beta 1") == 1
    assert text.index("<!-- alpha:start -->") < text.index("<!-- beta:start -->")  # replaced in place
    assert results.read_section("alpha", path) == "## alpha 2\n| a2 |"
    assert results.read_section("gamma", path) is None


def test_broken_markers_are_refused_not_duplicated(results, tmp_path):
    path = tmp_path / "results.md"
    path.write_text("<!-- alpha:start -->\n## alpha old\n")  # an end marker lost by a hand edit
    with pytest.raises(ValueError, match="alpha"):
        results.write_section("alpha", "## alpha new", path)
    assert path.read_text() == "<!-- alpha:start -->\n## alpha old\n"


def test_header_names_date_machine_versions_and_command(results):
    lines = results.header("loop_bench", ["peft"], argv=["/x/bench/loop_bench.py", "--rounds", "5"])
    assert re.fullmatch(r"## loop_bench \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", lines[0])
    assert lines[1].startswith("machine: ") and "cpus=" in lines[1]
    assert lines[2].startswith("versions: python ") and " torch " in lines[2] and " peft " in lines[2]
    assert lines[3] == "command: `python bench/loop_bench.py --rounds 5`"


def test_the_shipped_results_hold_each_benchmark_once(results):
    text = (BENCH / "results.md").read_text()
    names = re.findall(r"<!-- ([\w.-]+):start -->", text)
    assert names and len(names) == len(set(names))
    for name in names:
        body = results.read_section(name, BENCH / "results.md")
        assert body is not None and body.count(f"## {name} ") == 1, name
