"""Hostile data: every reader names the file and the place, and no epoch loops without a batch (issue 16, items 2
and 6).

Each case is one table entry run through ``python -m lightning_lora.train``'s real Hydra entry point in this
process (``train_main``), or through the data module / checkpoint API where no run is needed to reach the
reader. Each asserts exit 2 (``UserError`` from Python), one ``error:`` line naming the file and the place (line
and byte offset, row and column, key, shard), no traceback, and that every input file is byte-identical
afterwards. The cases that used to hang (an epoch yielding no sample under ``max_epochs=-1``) run under an alarm
that fails them within ``HANG_LIMIT_S`` seconds should the empty-epoch loop come back.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, file_bytes, train_main
from PIL import Image
from torch.utils.data import DataLoader

from lightning_lora.callbacks import AtomicCheckpointIO, EmptyEpochGuard
from lightning_lora.data.shards import PairedShardsDataModule, WebDatasetDataModule
from lightning_lora.data.trellis import SLAT_MODEL, SS_MODEL, TrellisDataModule, write_npz
from lightning_lora.errors import UserError, user_message

pytestmark = pytest.mark.usefixtures("one_thread")

HANG_LIMIT_S = 60  # a hang case normally ends in seconds; the old loop ran 42,507 empty epochs a minute
LATIN1 = "caf\xe9".encode("latin-1")  # 0xe9 alone is not UTF-8
RUN_QUIET = ["~callbacks.sample_previews", "validate_before=false", "validate_after=false", "trainer.max_epochs=-1",
             "callbacks.adapter_checkpoint.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=0"]


class Hang(BaseException):
    """The alarm went off: a case that must stop did not (a BaseException, so no ``except Exception`` eats it)."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def ring(signum, frame):
        raise Hang(f"still running after {seconds} s: the empty-epoch loop is back")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------- inputs, written once per module
def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A webdataset shard: each sample's members (``0000.png``, ``0000.txt``) next to each other."""
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def pair_line(i: int) -> bytes:
    return json.dumps({"query": f"question {i}", "positive": f"answer {i}"}).encode()


def trellis_root(root: Path, *, n: int = 3, num_voxels: list[str] | None = None, drop: str | None = None,
                 cond_key: str = "tokens", latent_bytes: bytes | None = None, csv_bytes: bytes | None = None) -> Path:
    """A TRELLIS root with ``n`` objects (both latents and tokens); ``drop`` leaves that array out of every latent,
    ``latent_bytes`` replaces the first SLat latent's bytes, ``csv_bytes`` the metadata."""
    shas = [f"{i:064x}" for i in range(1, n + 1)]
    voxels = num_voxels or ["10"] * n
    for sha in shas:
        slat = {"coords": np.zeros((4, 3), np.int32), "feats": np.zeros((4, 8), np.float32)}
        write_npz(root / "latents" / SLAT_MODEL / f"{sha}.npz", **{k: v for k, v in slat.items() if k != drop})
        ss = {} if drop == "mean" else {"mean": np.zeros((8, 16, 16, 16), np.float32)}
        write_npz(root / "ss_latents" / SS_MODEL / f"{sha}.npz", **ss)
        write_npz(root / "cond_tokens" / f"{sha}.npz", **{cond_key: np.zeros((4, 64), np.float32)})
    if latent_bytes is not None:
        (root / "latents" / SLAT_MODEL / f"{shas[0]}.npz").write_bytes(latent_bytes)
    header = f"sha256,num_voxels,latent_{SLAT_MODEL},ss_latent_{SS_MODEL}\n"
    rows = "".join(f"{sha},{v},True,True\n" for sha, v in zip(shas, voxels, strict=True))
    (root / "metadata.csv").write_bytes(csv_bytes if csv_bytes is not None else (header + rows).encode())
    return root


def real_checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(64)}, "epoch": 0}, buffer)
    return buffer.getvalue()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every hostile input of this module under one folder (compared byte for byte before and after each case)."""
    root = tmp_path_factory.mktemp("hostile_inputs")
    good_png, caption = png_bytes(), b"a red square"
    # JSON lines (pairs, image pairs, image-folder metadata)
    bad_query = b'{"query": "' + LATIN1 + b'", "positive": "x"}'
    write_jsonl(root / "pairs_bad3.jsonl", [pair_line(1), pair_line(2), bad_query])
    write_jsonl(root / "pairs_ok.jsonl", [pair_line(i) for i in range(40)])
    write_jsonl(root / "pairs_val_bad2.jsonl", [pair_line(1), LATIN1])
    (root / "pairs_bom.jsonl").write_bytes(b"\xef\xbb\xbf" + pair_line(1) + b"\n" + pair_line(2)[:-2] + b"\xff\"}\n")
    write_jsonl(root / "pairs_cut.jsonl", [pair_line(1), pair_line(2)[:-3]])
    write_jsonl(root / "pairs_utf16.jsonl", [pair_line(1).decode().encode("utf-16")])
    # image folders
    for name, meta, txt in (("folder_meta", [b'{"file_name": "a.png", "text": "' + LATIN1 + b'"}'], None),
                            ("folder_meta2", [b'{"file_name": "a.png", "text": "x"}', b'{"file_name": "b.png", "te'],
                             None),
                            ("folder_txt", None, LATIN1)):
        folder = root / name
        folder.mkdir()
        for stem in ("a", "b"):
            (folder / f"{stem}.png").write_bytes(good_png)
            if txt is not None:
                (folder / f"{stem}.txt").write_bytes(b"fine\n" + txt if stem == "b" else b"fine")
        if meta is not None:
            write_jsonl(folder / "metadata.jsonl", meta + ([b'{"file_name": "b.png", "text": "x"}']
                                                           if name == "folder_meta" else []))
    folder = root / "folder_cut_pngs"  # headers intact (the setup scan passes), pixel data cut short
    folder.mkdir()
    for stem in ("a", "b"):
        (folder / f"{stem}.png").write_bytes(png_bytes(size=64)[:90])
        (folder / f"{stem}.txt").write_text("a red square")
    image = root / "img.png"
    image.write_bytes(good_png)
    write_jsonl(root / "image_pairs_bad.jsonl", [json.dumps({"query": "a", "positive_image": "img.png"}).encode(),
                                                 b'{"query": "' + LATIN1 + b'", "positive_image": "img.png"}'])
    # code search inputs
    (root / "stdlib_latin").mkdir()
    (root / "stdlib_latin" / "good.py").write_text('def f():\n    """Return the answer to it all."""\n    return 1\n')
    (root / "stdlib_latin" / "menu.py").write_bytes(b'def g():\n    """Return the ' + LATIN1 + b' menu for lunch."""\n')
    (root / "stdlib_cookie").mkdir()
    (root / "stdlib_cookie" / "odd.py").write_bytes(b"# -*- coding: klingon -*-\ndef g():\n    return 1\n")
    # shards
    ok = {"png": good_png, "txt": caption}
    write_tar(root / "empty.tar", [])
    write_tar(root / "unreadable.tar", [{"png": b"not an image", "txt": caption} for _ in range(3)])
    write_tar(root / "paired_unreadable.tar",
              [{"source.png": b"nope", "target.png": good_png} for _ in range(2)])
    good = write_tar(root / "good.tar", [ok] * 4).read_bytes()
    (root / "cut.tar").write_bytes(good[:1700])  # cut inside a member's data
    (root / "junk.tar").write_bytes(bytes(range(256)) * 12)
    write_tar(root / "latin_caption.tar", [{"png": good_png, "txt": b"ok\n" + LATIN1}])
    write_tar(root / "bad_json_caption.tar", [{"png": good_png, "json": b'{"text": '}])
    # TRELLIS roots
    trellis_root(root / "tr_many", num_voxels=["10", "12", "many"])
    trellis_root(root / "tr_nan", num_voxels=["10", "nan", "12"])
    trellis_root(root / "tr_latin", csv_bytes=b"sha256,num_voxels,latent_" + SLAT_MODEL.encode() + b"\n" + b"a" * 64
                 + b",1" + LATIN1 + b",True\n")
    trellis_root(root / "tr_nocoords", drop="coords")
    trellis_root(root / "tr_nofeats", drop="feats")
    trellis_root(root / "tr_nomean", drop="mean")
    trellis_root(root / "tr_notokens", cond_key="image_tokens")
    trellis_root(root / "tr_junk", latent_bytes=b"\x00garbage" * 20)
    trellis_root(root / "tr_one", n=1)
    for name, text in (("tr_renders_latin", b'{"frames": [{"file_path": "' + LATIN1 + b'.png"}]}'),
                       ("tr_renders_cut", b'{"frames": [{"file_path": ')):
        tr = trellis_root(root / name, n=1)
        (tr / "renders_cond" / f"{1:064x}").mkdir(parents=True)
        (tr / "renders_cond" / f"{1:064x}" / "transforms.json").write_bytes(text)
    # checkpoints handed to resume=
    (root / "random.ckpt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "empty.ckpt").write_bytes(b"")
    (root / "notes.ckpt").write_bytes(b"these are my notes, not a checkpoint\n")
    (root / "cut.ckpt").write_bytes(real_checkpoint_bytes()[:700])
    (root / "code.ckpt").write_bytes(pickle.dumps(RunsCode(), protocol=2))
    return root


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One hostile input: overrides (``{root}``, ``{run}`` filled in) and what the error line must contain."""

    argv: list[str]
    needles: list[str]
    kind: str  # hang | reader place | traceback->one line | other
    hang: bool = False
    extra: list[str] = field(default_factory=list)


def pairs(train: str, *more: str) -> list[str]:
    return ["data=pairs", f"data.train_path={{root}}/{train}", *more]


def shards(pattern: str, *more: str, model: str = "sd_tiny", data: str = "webdataset", pipe: bool = False) -> list[str]:
    url = f"'pipe:cat {{root}}/{pattern}'" if pipe else f"{{root}}/{pattern}"
    return [f"model={model}", f"data={data}", f"data.train_shards={url}", "data.batch_size=2", *more]


def trellis(folder: str, *more: str, model: str = "trellis_slat_tiny") -> list[str]:
    return [f"model={model}", "data=trellis", f"data.roots={{root}}/{folder}", "data.val_fraction=0", *more]


def resume(name: str) -> list[str]:
    return pairs("pairs_ok.jsonl", "data.batch_size=4", f"resume={{root}}/{name}")


META = "{root}/folder_meta/metadata.jsonl"
CASES: dict[str, Case] = {
    # --- undecodable text: file, line and byte offset
    "pairs jsonl latin-1 byte": Case(pairs("pairs_bad3.jsonl"),
                                     ["{root}/pairs_bad3.jsonl line 3", "byte 0xe9", "byte offset 110"],
                                     "reader place"),
    "pairs val jsonl latin-1 line": Case(pairs("pairs_ok.jsonl", "data.val_path={root}/pairs_val_bad2.jsonl"),
                                         ["pairs_val_bad2.jsonl line 2", "byte offset 51"], "reader place"),
    "pairs jsonl after a BOM": Case(pairs("pairs_bom.jsonl"), ["pairs_bom.jsonl line 2", "byte 0xff"],
                                    "reader place"),
    "pairs jsonl saved as UTF-16": Case(pairs("pairs_utf16.jsonl"), ["pairs_utf16.jsonl line 1", "byte offset 0"],
                                        "reader place"),
    "image pairs jsonl latin-1": Case(["model=clip_tiny", "data=image_pairs",
                                       "data.train_path={root}/image_pairs_bad.jsonl"],
                                      ["image_pairs_bad.jsonl line 2", "byte 0xe9"], "reader place"),
    "image folder metadata latin-1": Case(["model=sd_tiny", "data=image_folder", "data.train_dir={root}/folder_meta"],
                                          [f"{META} line 1", "byte offset 35"], "reader place"),
    "image folder caption txt latin-1": Case(["model=sd_tiny", "data=image_folder",
                                              "data.train_dir={root}/folder_txt"],
                                             ["{root}/folder_txt/b.txt line 2", "byte offset 8"], "reader place"),
    "image folder, every image skipped while decoding": Case(
        ["model=sd_tiny", "data=image_folder", "data.train_dir={root}/folder_cut_pngs", "data.skip_unreadable=true",
         "data.val_fraction=0", "data.batch_size=2", *RUN_QUIET],
        ["none of the 2 images is readable", "folder_cut_pngs/", "truncated"], "reader place"),
    "code search module latin-1": Case(["data=code_search", "data.stdlib_dir={root}/stdlib_latin",
                                        "data.cache_dir=null"],
                                       ["{root}/stdlib_latin/menu.py line 2", "byte offset 30"], "reader place"),
    "code search unknown coding cookie": Case(["data=code_search", "data.stdlib_dir={root}/stdlib_cookie",
                                               "data.cache_dir=null"],
                                              ["{root}/stdlib_cookie/odd.py", "klingon"], "reader place"),
    "trellis metadata.csv latin-1": Case(trellis("tr_latin"), ["tr_latin/metadata.csv line 2", "byte 0xe9"],
                                         "reader place"),
    "shard caption latin-1": Case(shards("latin_caption.tar", *RUN_QUIET),
                                  ["{root}/latin_caption.tar: sample 0000.txt line 2", "byte offset 6"],
                                  "reader place"),
    "shard caption latin-1 in a worker": Case(shards("latin_caption.tar", "data.num_workers=1", *RUN_QUIET),
                                              ["{root}/latin_caption.tar: sample 0000.txt line 2", "byte offset 6"],
                                              "traceback->one line"),
    # --- invalid JSON in files the data modules read
    "pairs jsonl cut mid-object": Case(pairs("pairs_cut.jsonl"), ["pairs_cut.jsonl line 2", "not valid JSON"],
                                       "reader place"),
    "image folder metadata cut mid-object": Case(["model=sd_tiny", "data=image_folder",
                                                  "data.train_dir={root}/folder_meta2"],
                                                 ["folder_meta2/metadata.jsonl:2", "not valid JSON"], "reader place"),
    "shard json caption cut": Case(shards("bad_json_caption.tar", *RUN_QUIET),
                                   ["bad_json_caption.tar: sample 0000.json", "not valid JSON", "line 1 column"],
                                   "reader place"),
    # --- TRELLIS: numeric cells and latent keys
    "trellis num_voxels not a number": Case(trellis("tr_many"),
                                            ["tr_many/metadata.csv line 4", "column 'num_voxels'", "'many'"],
                                            "traceback->one line"),
    "trellis num_voxels nan": Case(trellis("tr_nan"), ["tr_nan/metadata.csv line 3", "column 'num_voxels'", "'nan'"],
                                   "reader place"),
    "trellis slat latent without coords": Case(trellis("tr_nocoords"), ["tr_nocoords/latents/", "no array 'coords'"],
                                               "traceback->one line"),
    "trellis slat latent without feats": Case(trellis("tr_nofeats"), ["tr_nofeats/latents/", "no array 'feats'"],
                                              "traceback->one line"),
    "trellis ss latent without mean": Case(trellis("tr_nomean", model="trellis_ss_tiny"),
                                           ["tr_nomean/ss_latents/", "no array 'mean'"], "traceback->one line"),
    "trellis tokens under another name": Case(trellis("tr_notokens"),
                                              ["tr_notokens/cond_tokens/", "no array 'tokens'", "image_tokens"],
                                              "traceback->one line"),
    "trellis latent not an npz": Case(trellis("tr_junk"), ["tr_junk/latents/", "unreadable data file"], "reader place"),
    "trellis every sample in validation": Case(trellis("tr_one", "data.val_fraction=0.999"),
                                               ["data.val_fraction=0.999", "all 1 samples", "tr_one"], "other"),
    # --- tar shards: one clean line naming the shard
    "shard cut short": Case(shards("cut.tar", *RUN_QUIET),
                            ["unreadable shard {root}/cut.tar (ReadError: unexpected end of data)"], "other"),
    "shard of junk bytes": Case(shards("junk.tar", *RUN_QUIET), ["unreadable shard {root}/junk.tar (ReadError"],
                                "other"),
    # --- epochs that yield nothing: stop, naming the source and what was skipped. Local shards are read up to their
    # first usable sample at setup (before any model loads); piped ones (pipe:, as for object stores) are left to the
    # first epoch, where the empty-epoch guard stops the run
    "empty shard, endless epochs": Case(shards("empty.tar", *RUN_QUIET),
                                        ["data.train_shards='{root}/empty.tar'", "no training batch", "none skipped"],
                                        "hang", hang=True),
    "every image unreadable, skipped": Case(shards("unreadable.tar", "data.skip_unreadable=true", *RUN_QUIET),
                                            ["data.train_shards='{root}/unreadable.tar'",
                                             "(3 skipped: unreadable image)"], "hang", hang=True),
    "unreadable shard skipped": Case(shards("junk.tar", "data.skip_unreadable=true", *RUN_QUIET),
                                     ["junk.tar'", "(1 skipped: unreadable shard)"], "hang", hang=True),
    "piped empty shard, endless epochs": Case(shards("empty.tar", *RUN_QUIET, pipe=True),
                                              ["data.train_shards='pipe:cat {root}/empty.tar'", "no training batch",
                                               "none skipped"], "hang", hang=True),
    "piped unreadable images, two workers": Case(shards("unreadable.tar", "data.skip_unreadable=true",
                                                        "data.num_workers=2", *RUN_QUIET, pipe=True),
                                                 ["pipe:cat {root}/unreadable.tar'", "(3 skipped: unreadable image)"],
                                                 "hang", hang=True),
    "piped junk shard skipped": Case(shards("junk.tar", "data.skip_unreadable=true", *RUN_QUIET, pipe=True),
                                     ["junk.tar'", "(1 skipped: unreadable shard)"], "hang", hang=True),
    "piped samples_per_epoch over unreadable images": Case(shards("unreadable.tar", "data.skip_unreadable=true",
                                                                  "data.samples_per_epoch=8", *RUN_QUIET, pipe=True),
                                                           ["(3 skipped: unreadable image)"], "hang", hang=True),
    # --- resume= given a file that is no checkpoint
    "resume random bytes": Case(resume("random.ckpt"), ["{root}/random.ckpt is not a readable checkpoint"],
                                "other"),
    "resume empty file": Case(resume("empty.ckpt"), ["{root}/empty.ckpt is not a readable checkpoint (an empty file)"],
                              "other"),
    "resume text file": Case(resume("notes.ckpt"), ["notes.ckpt is not a readable checkpoint"], "other"),
    "resume checkpoint cut short": Case(resume("cut.ckpt"), ["cut.ckpt is not a readable checkpoint"], "other"),
}


@pytest.fixture
def base_args(tmp_path, tiny_bert, cache_dir) -> list[str]:
    # the tiny BERT for the text cases (data=pairs/code_search under the default model); a fresh run directory
    return [f"model.pretrained={tiny_bert}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}",
            "~callbacks.progress_bar"]


def _fill(text: str, root: Path) -> str:
    return text.replace("{root}", str(root))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_data_through_train(name, inputs, base_args, capsys):
    case = CASES[name]
    argv = [_fill(a, inputs) for a in case.argv]
    own_model = any(a.startswith("model=") for a in argv)  # a preset of its own: the tiny BERT path means nothing
    argv = [*base_args[own_model:], *argv]
    before = file_bytes(inputs)
    with deadline(HANG_LIMIT_S) if case.hang else contextlib.nullcontext():
        rc = train_main(argv)
    err = capsys.readouterr().err
    needles = [_fill(n, inputs) for n in case.needles]
    assert_one_error_line(rc, err, needles[0], case=name)
    last = err.strip().splitlines()[-1]
    for needle in needles[1:]:
        assert needle in last, (name, needle, last)
    assert "<_io." not in last and not last.startswith("error: (") and "Original Traceback" not in last, last
    assert file_bytes(inputs) == before, name


# ---------------------------------------------------------------------------- the API users call directly
class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _NoBatches(pl.LightningDataModule):
    """A data module whose sized training loader has no batch (and that names its source)."""

    def data_source(self) -> str:
        return "data.train_path=/nowhere.jsonl"

    def train_dataloader(self) -> DataLoader:
        return DataLoader([], batch_size=2)


def _fit(datamodule: pl.LightningDataModule) -> None:
    trainer = pl.Trainer(max_epochs=-1, callbacks=[EmptyEpochGuard()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(_Tiny(), datamodule)


def _first_item(root: Path) -> None:
    """The first training item of a TRELLIS root read with condition images (where transforms.json is read)."""
    datamodule = TrellisDataModule(str(root), resolution=32, val_fraction=0, cond="images", image_size=32)
    datamodule.setup("fit")
    datamodule.train_set[0]


def _ckpt(name: str) -> Callable[[Path], None]:
    return lambda root: AtomicCheckpointIO().load_checkpoint(root / name)


API_CASES: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    "sized loader with no batch": (lambda root: _fit(_NoBatches()),
                                   ["data.train_path=/nowhere.jsonl: the epoch yielded no training batch"], "hang"),
    "webdataset module, piped empty shard": (
        lambda root: _fit(WebDatasetDataModule(f"pipe:cat {root / 'empty.tar'}", resolution=32, batch_size=2)),
        ["empty.tar'", "no training batch"], "hang"),
    "webdataset module, empty shard at setup": (
        lambda root: WebDatasetDataModule(str(root / "empty.tar"), resolution=32, batch_size=2).setup("fit"),
        ["empty.tar'", "no training batch", "none skipped"], "hang"),
    "paired shards, every source unreadable": (
        lambda root: _fit(PairedShardsDataModule(f"pipe:cat {root / 'paired_unreadable.tar'}", resolution=32,
                                                 batch_size=2, source_key="source.png", target_key="target.png",
                                                 skip_unreadable=True)),
        ["paired_unreadable.tar'", "(2 skipped: unreadable image)"], "hang"),
    "trellis module, no coords": (lambda root: TrellisDataModule(str(root / "tr_nocoords"), resolution=32,
                                                                 val_fraction=0).setup("fit"),
                                  ["tr_nocoords/latents/", "no array 'coords'", "holds feats"], "reader place"),
    "trellis renders transforms.json latin-1": (lambda root: _first_item(root / "tr_renders_latin"),
                                                ["transforms.json line 1", "byte 0xe9", "byte offset 30"],
                                                "reader place"),
    "trellis renders transforms.json cut": (lambda root: _first_item(root / "tr_renders_cut"),
                                            ["transforms.json", "JSONDecodeError", "line 1 column"], "reader place"),
    "resume API, random bytes": (_ckpt("random.ckpt"), ["random.ckpt is not a readable checkpoint"], "other"),
    "resume API, code pickle still refused": (_ckpt("code.ckpt"), ["code.ckpt refused", "would run code"], "other"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_hostile_data_through_the_api(name, inputs, tmp_path, monkeypatch):
    call, needles, kind = API_CASES[name]
    monkeypatch.chdir(tmp_path)  # Lightning writes nothing here, and nothing of ours
    before = file_bytes(inputs)
    with deadline(HANG_LIMIT_S) if kind == "hang" else contextlib.nullcontext(), pytest.raises(UserError) as info:
        call(inputs)
    line = user_message(info.value)
    assert line is not None and "\n" not in line, (name, line)
    for needle in needles:
        assert needle in line, (name, needle, line)
    assert file_bytes(inputs) == before, name


def test_the_tables_hold_enough_cases():
    kinds = [c.kind for c in CASES.values()] + [k for _, _, k in API_CASES.values()]
    assert len(kinds) >= 30
    assert kinds.count("hang") >= 5
