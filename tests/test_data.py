"""Tests for the pair reader, the pairs DataModule and the stdlib code-search task."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lightning_lora.data import (
    CodeSearchDataModule,
    PairsDataModule,
    build_code_search_pairs,
    code_search,
    collate_pairs,
    read_pairs_jsonl,
)
from lightning_lora.errors import UserError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pairs(path: Path, n: int) -> Path:
    return write_lines(path, [json.dumps({"query": f"q{i}", "positive": f"p{i}"}) for i in range(n)])


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- read_pairs_jsonl -------------------------------------------------------------------------------


def test_read_pairs_good_file(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "pairs.jsonl",
        [
            json.dumps({"query": "sort a list", "positive": "sorted(xs)"}),
            "",
            "   ",
            json.dumps({"query": "open a file", "positive": "open(p)", "negatives": ["close(f)", "os.remove(p)"]}),
        ],
    )
    assert read_pairs_jsonl(str(path)) == [
        {"query": "sort a list", "positive": "sorted(xs)", "negatives": []},
        {"query": "open a file", "positive": "open(p)", "negatives": ["close(f)", "os.remove(p)"]},
    ]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ('{"query": "q", "positive": ', ["not valid JSON"]),
        (json.dumps({"query": "q", "pos": "p"}), ["missing field 'positive'", "found fields: query, pos"]),
        (json.dumps({"positive": "p"}), ["missing field 'query'", "found fields: positive"]),
        (json.dumps({"query": 3, "positive": "p"}), ["'query'", "string"]),
        (json.dumps({"query": "q", "positive": ["p"]}), ["'positive'", "string"]),
        (json.dumps({"query": "q", "positive": "p", "negatives": "n"}), ["'negatives'", "list of strings"]),
        (json.dumps({"query": "q", "positive": "p", "negatives": ["n", 1]}), ["'negatives'", "list of strings"]),
        (json.dumps(["q", "p"]), ["JSON object"]),
    ],
)
def test_read_pairs_bad_line_names_line_and_field(tmp_path: Path, bad_line: str, expected: list[str]) -> None:
    good = json.dumps({"query": "q", "positive": "p"})
    # The blank line still counts: the bad line is line 4 of the file as an editor shows it.
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, bad_line, good])
    with pytest.raises(UserError) as err:
        read_pairs_jsonl(path)
    message = assert_one_line(err)
    assert f"{path.resolve()} line 4:" in message
    for fragment in expected:
        assert fragment in message


def test_read_pairs_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError) as err:
        read_pairs_jsonl(missing)
    assert assert_one_line(err) == f"data file not found: {missing.resolve()}"


def test_read_pairs_empty_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError) as err:
        read_pairs_jsonl(path)
    message = assert_one_line(err)
    assert "empty" in message
    assert str(path.resolve()) in message


# --- collate_pairs -----------------------------------------------------------------------------------


def test_collate_without_negatives_has_no_negatives_key() -> None:
    samples = [
        {"query": "a", "positive": "A", "negatives": [], "module": "m"},
        {"query": "b", "positive": "B", "negatives": []},
    ]
    assert collate_pairs(samples) == {"query": ["a", "b"], "positive": ["A", "B"]}


def test_collate_with_negatives_pads_missing_with_empty_lists() -> None:
    samples = [
        {"query": "a", "positive": "A", "negatives": ["x", "y"]},
        {"query": "b", "positive": "B", "negatives": []},
        {"query": "c", "positive": "C"},
    ]
    assert collate_pairs(samples) == {
        "query": ["a", "b", "c"],
        "positive": ["A", "B", "C"],
        "negatives": [["x", "y"], [], []],
    }


# --- PairsDataModule ---------------------------------------------------------------------------------


def test_pairs_datamodule_batch_sizes(tmp_path: Path) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 10)
    val = write_pairs(tmp_path / "val.jsonl", 7)
    dm = PairsDataModule(train_path=str(train), val_path=str(val), batch_size=4, val_batch_size=3)
    dm.setup("fit")
    dm.setup("fit")  # idempotent: a second call must not reload or duplicate
    assert (dm.num_train, dm.num_val) == (10, 7)
    # drop_last on train (10 -> 4, 4), never on val (7 -> 3, 3, 1).
    assert [len(b["query"]) for b in dm.train_dataloader()] == [4, 4]
    val_batches = list(dm.val_dataloader())
    assert [len(b["query"]) for b in val_batches] == [3, 3, 1]
    # Validation keeps file order.
    assert [q for b in val_batches for q in b["query"]] == [f"q{i}" for i in range(7)]


def test_pairs_datamodule_truncation_and_no_val(tmp_path: Path) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 10)
    dm = PairsDataModule(train_path=str(train), batch_size=2, drop_last=False, shuffle=False, max_train_samples=5)
    assert dm.num_train == 5
    assert dm.num_val == 0
    assert [b["query"] for b in dm.train_dataloader()] == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert dm.val_dataloader() == []


def test_pairs_datamodule_missing_path_names_key_and_path(tmp_path: Path) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 4)
    missing = tmp_path / "x.jsonl"
    with pytest.raises(UserError) as err:
        PairsDataModule(train_path=str(missing))
    assert assert_one_line(err) == f"data.train_path: file not found: {missing.resolve()}"
    with pytest.raises(UserError) as err:
        PairsDataModule(train_path=str(train), val_path=str(missing))
    assert assert_one_line(err) == f"data.val_path: file not found: {missing.resolve()}"


@pytest.mark.parametrize(("key", "value"), [("batch_size", 0), ("val_batch_size", -1), ("batch_size", True)])
def test_pairs_datamodule_rejects_bad_batch_size(tmp_path: Path, key: str, value: object) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 4)
    with pytest.raises(UserError) as err:
        PairsDataModule(train_path=str(train), **{key: value})
    assert f"data.{key}" in assert_one_line(err)


def test_pairs_datamodule_batch_larger_than_data_with_drop_last(tmp_path: Path) -> None:
    train = write_pairs(tmp_path / "train.jsonl", 3)
    dm = PairsDataModule(train_path=str(train), batch_size=8)
    with pytest.raises(UserError) as err:
        dm.setup()
    assert "data.batch_size" in assert_one_line(err)


# --- code search: synthetic stdlib (fast, checks extraction rules exactly) ------------------------------

FAKE_MODULE = '''
"""Module docstring is not a definition."""


def documented(a, b):
    """Add two numbers together carefully.

    The second paragraph is not part of the query.
    """

    return a + b


def short_doc(a):
    """Too short."""
    return a


def only_pass():
    """This function body is only pass."""
    pass


def only_ellipsis():
    """This function body is only an ellipsis."""
    ...


class Outer:
    """A class whose methods carry docstrings too.

    More text.
    """

    @staticmethod
    def method(x):
        """Return the argument unchanged always."""
        return x

    def stub(self):
        """A stub method whose body is only this docstring."""

    # A comment after the blank line stays.
    def last(self):
        """Docstring of the last method here."""
        return 2
'''

# Sorted after "pkg", so both definitions are the later copies and are dropped.
DUPLICATES_MODULE = '''
def other_code():
    """Add two numbers together carefully."""
    return 1


def documented(a, b):
    """A different summary for the very same code."""
    return a + b
'''


def make_fake_stdlib(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text(FAKE_MODULE, encoding="utf-8")
    for skipped in ("test", "site-packages", "idlelib", "__pycache__"):
        (root / skipped).mkdir()
        (root / skipped / "hidden.py").write_text('def f():\n    """Never seen in any output."""\n    return 1\n')
    (root / "pkg2.py").write_text(DUPLICATES_MODULE, encoding="utf-8")
    (root / "broken.py").write_text('def f(:\n    """Syntax error skips this file."""\n')
    (root / "other.py").write_text('async def fetch(url):\n    """Fetch the url over the network."""\n    return url\n')
    return root


def test_code_search_extraction_rules(tmp_path: Path) -> None:
    root = make_fake_stdlib(tmp_path / "lib")
    train, val = build_code_search_pairs(stdlib_dir=root, val_fraction=0.0, cache_dir=None)
    assert val == []
    by_query = {p["query"]: p for p in train}
    assert sorted(by_query) == [
        "A class whose methods carry docstrings too.",
        "Add two numbers together carefully.",
        "Docstring of the last method here.",
        "Fetch the url over the network.",
        "Return the argument unchanged always.",
    ]
    assert by_query["Add two numbers together carefully."] == {
        "query": "Add two numbers together carefully.",
        "positive": "def documented(a, b):\n    return a + b",
        "negatives": [],
        "module": "pkg",
    }
    # Decorators are kept; the method is dedented to column 0.
    assert by_query["Return the argument unchanged always."]["positive"] == (
        "@staticmethod\ndef method(x):\n    return x"
    )
    # Nested docstrings are removed as well; a docstring-only method keeps a valid body.
    assert by_query["A class whose methods carry docstrings too."]["positive"] == textwrap.dedent(
        """\
        class Outer:
            @staticmethod
            def method(x):
                return x

            def stub(self):
                ...

            # A comment after the blank line stays.
            def last(self):
                return 2"""
    )
    assert by_query["Fetch the url over the network."]["module"] == "other"


def test_code_search_truncates_code(tmp_path: Path) -> None:
    root = make_fake_stdlib(tmp_path / "lib")
    train, _ = build_code_search_pairs(stdlib_dir=root, val_fraction=0.0, max_code_lines=3, cache_dir=None)
    outer = next(p for p in train if p["query"].startswith("A class"))
    assert outer["positive"].splitlines() == ["class Outer:", "    @staticmethod", "    def method(x):"]


def test_code_search_split_follows_module_hash(tmp_path: Path) -> None:
    root = make_fake_stdlib(tmp_path / "lib")
    train, val = build_code_search_pairs(stdlib_dir=root, val_fraction=0.5, cache_dir=None)
    for pair in train:
        assert not code_search.is_val_module(pair["module"], 0.5)
    for pair in val:
        assert code_search.is_val_module(pair["module"], 0.5)
    assert len(train) + len(val) == 5


def test_code_search_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        build_code_search_pairs(stdlib_dir=tmp_path / "missing", cache_dir=None)
    assert "data.stdlib_dir" in assert_one_line(err)
    with pytest.raises(UserError) as err:
        build_code_search_pairs(stdlib_dir=tmp_path, val_fraction=1.5, cache_dir=None)
    assert "data.val_fraction" in assert_one_line(err)
    with pytest.raises(UserError) as err:
        CodeSearchDataModule(max_code_lines=0)
    assert "data.max_code_lines" in assert_one_line(err)


def test_code_search_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    root = make_fake_stdlib(tmp_path / "lib")
    cache = tmp_path / "cache"
    expected = build_code_search_pairs(stdlib_dir=root, cache_dir=cache)
    (cache_file,) = cache.glob("code_search-*.json")
    cache_file.write_text('{"train": [', encoding="utf-8")
    assert build_code_search_pairs(stdlib_dir=root, cache_dir=cache) == expected
    assert json.loads(cache_file.read_text(encoding="utf-8"))["train"] == expected[0]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


# --- code search: the real standard library ----------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("code_search_cache")


@pytest.fixture(scope="module")
def stdlib_pairs(stdlib_cache: Path) -> tuple[list[dict], list[dict]]:
    # Built cold (the cache dir is new) and leaves a cache behind for the round-trip tests.
    return build_code_search_pairs(cache_dir=stdlib_cache)


def test_stdlib_sizes_are_sane(stdlib_pairs: tuple[list[dict], list[dict]]) -> None:
    train, val = stdlib_pairs
    assert len(train) > 1000
    assert len(val) > 100
    assert len(val) < len(train)


def test_stdlib_is_deterministic(stdlib_pairs: tuple[list[dict], list[dict]]) -> None:
    assert build_code_search_pairs(cache_dir=None) == stdlib_pairs


def test_stdlib_no_module_in_both_splits(stdlib_pairs: tuple[list[dict], list[dict]]) -> None:
    train, val = stdlib_pairs
    train_modules = {p["module"] for p in train}
    val_modules = {p["module"] for p in val}
    assert train_modules and val_modules
    assert not train_modules & val_modules


def test_stdlib_no_duplicates_and_no_docstrings(stdlib_pairs: tuple[list[dict], list[dict]]) -> None:
    pairs = stdlib_pairs[0] + stdlib_pairs[1]
    assert len({p["query"] for p in pairs}) == len(pairs)
    assert len({p["positive"] for p in pairs}) == len(pairs)
    for p in pairs:
        assert p["query"] not in p["positive"]
        assert len(p["query"].split()) >= 4
        assert len(p["positive"].splitlines()) <= 40
        assert p["positive"].startswith(("def ", "async def ", "class ", "@"))
        assert not set(p["module"].split(".")) & {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}


def test_stdlib_cache_round_trip(
    stdlib_pairs: tuple[list[dict], list[dict]], stdlib_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(list(stdlib_cache.glob("code_search-*.json"))) == 1

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(code_search, "_build", no_rebuild)
    assert build_code_search_pairs(cache_dir=stdlib_cache) == stdlib_pairs
    # Different arguments are a different cache entry, so they must not be served from this one.
    with pytest.raises(AssertionError, match="cache should have been used"):
        build_code_search_pairs(cache_dir=stdlib_cache, max_code_lines=10)


def test_code_search_datamodule_small(stdlib_pairs: tuple[list[dict], list[dict]], stdlib_cache: Path) -> None:
    dm = CodeSearchDataModule(
        batch_size=8, val_batch_size=16, max_train_samples=64, max_val_samples=20, cache_dir=str(stdlib_cache)
    )
    assert (dm.num_train, dm.num_val) == (64, 20)
    assert dm.train_pairs == stdlib_pairs[0][:64]
    assert dm.val_pairs == stdlib_pairs[1][:20]
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    assert set(batches[0]) == {"query", "positive", "index"}
    assert [len(b["positive"]) for b in dm.val_dataloader()] == [16, 4]


def test_collate_carries_row_ids_for_distributed_validation() -> None:
    samples = [{"query": "a", "positive": "A", "index": 3}, {"query": "b", "positive": "B", "index": 7}]
    assert collate_pairs(samples)["index"].tolist() == [3, 7]
