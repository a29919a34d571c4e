"""Hostile inputs to the tools (``lightning-lora`` sub-commands) and the Python API: nothing non-finite is read,
merged or written, adapters are float, bad JSON and bad sizes are one line, and ``combine`` refuses adapters that
cannot be for one model.

Every case is one table entry, run in-process: exit status 2 (``UserError`` from Python), the last stderr line is
one ``error:`` line naming the bad value, module or file, no traceback, and every file that existed before is
byte-identical afterwards (no output, no temporary). Inputs are built once per module. Classes (the ``kind`` of each
entry): ``non-finite``, ``traceback`` (was a traceback or a wrong message before), ``mismatch`` (combine).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_error_line, file_bytes, net_pair, net_with
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_lora.cli import main as cli_main
from lightning_lora.errors import UserError, user_message

pytestmark = pytest.mark.usefixtures("one_thread")


def _rewrite(src: Path, dst: Path, tensors=None, **metadata: str) -> Path:
    """A copy of the safetensors file ``src`` with some tensors and metadata entries replaced."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    state.update(tensors(state) if tensors else {})
    save_file(state, dst, metadata={**meta, **metadata})
    return dst


def _peft_dir(src: Path, dst: Path, config_text: bytes | None = None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config_text is not None:
        (dst / "adapter_config.json").write_bytes(config_text)
    if tensors is not None:
        _rewrite(dst / "adapter_model.safetensors", dst / "adapter_model.safetensors", tensors)
    return dst


def _first_a(state: dict) -> str:
    return sorted(k for k in state if "lora_A" in k or "lora_down" in k)[0]


def _nan_first(state: dict) -> dict:
    key = _first_a(state)
    bad = state[key].clone()
    bad.view(-1)[0] = float("nan")
    return {key: bad}


def _snapshot(head, folder: Path, run: Path) -> Path:
    """A run's ``adapters/final`` for ``head`` (random B, so a scale changes the weights)."""
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.module import LoRAAdaptationModule

    module = LoRAAdaptationModule(head, AdapterSpec(r=2, alpha=4, init="random"))
    module.save_adapters(folder, step=1, run_dir=run)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread, tiny_bert):
    """(inputs dir, models dir, {name: path}): net base/tuned/LoRA and damaged copies, tiny SD/LBM/TRELLIS bases
    with a run snapshot each."""
    from hydra.utils import instantiate

    from lightning_lora.config import compose_config
    from lightning_lora.heads.bridge import LBM_FILE, BridgeHead
    from lightning_lora.heads.diffusion import DiffusionHead
    from lightning_lora.heads.embedding import EmbeddingHead
    from lightning_lora.models.lbm_tiny import ensure_tiny_lbm
    from lightning_lora.models.sd_tiny import ensure_tiny_sd

    d, m = tmp_path_factory.mktemp("hostile"), tmp_path_factory.mktemp("hostile_models")
    p: dict[str, Path] = {}
    base, tuned = net_pair()
    p["base"], p["tuned"] = d / "base.safetensors", d / "tuned.safetensors"
    save_file(base, p["base"])
    save_file(tuned, p["tuned"])
    p["lora"] = d / "lora.safetensors"
    assert cli_main(["extract", "--base", str(p["base"]), "--tuned", str(p["tuned"]), "--out", str(p["lora"]),
                     "--rank", "4"]) == 0
    nan_tuned = {**tuned, "proj.weight": tuned["proj.weight"].clone()}
    nan_tuned["proj.weight"][0, 0] = float("nan")
    save_file(nan_tuned, d / "nan_tuned.safetensors")
    inf_base = {**base, "block.pw.weight": base["block.pw.weight"].clone()}
    inf_base["block.pw.weight"].view(-1)[3] = float("inf")
    save_file(inf_base, d / "inf_base.safetensors")
    adapters = json.loads(safe_open(str(p["lora"]), "pt").metadata()["adapters"])
    nan_alpha = {sub: {**c, "lora_alpha": float("nan")} for sub, c in adapters.items()}
    zero_r = {sub: {**c, "r": 0} for sub, c in adapters.items()}
    _rewrite(p["lora"], d / "nan_lora.safetensors", _nan_first)
    _rewrite(p["lora"], d / "int8_lora.safetensors", lambda s: {k: (v * 100).to(torch.int8) for k, v in s.items()})
    _rewrite(p["lora"], d / "bool_lora.safetensors", lambda s: {k: v > 0 for k, v in s.items()})
    _rewrite(p["lora"], d / "bad_json.safetensors", adapters="{not json")
    _rewrite(p["lora"], d / "list_json.safetensors", adapters="[1, 2]")
    _rewrite(p["lora"], d / "bad_base_json.safetensors", base_model="{'name': 1}")
    _rewrite(p["lora"], d / "nan_alpha.safetensors", adapters=json.dumps(nan_alpha))
    _rewrite(p["lora"], d / "zero_r.safetensors", adapters=json.dumps(zero_r))
    with safe_open(str(p["lora"]), "pt") as f:  # the same adapter on modules the net does not have
        save_file({k.replace("model.", "model.other_", 1): f.get_tensor(k) for k in f.keys()},  # noqa: SIM118
                  d / "renamed.safetensors", metadata=f.metadata())
    # kohya files: a NaN alpha tensor
    from lightning_lora.adapters.formats import read_lora, write_kohya

    write_kohya(d / "kohya.safetensors", read_lora(p["lora"]).modules)
    _rewrite(d / "kohya.safetensors", d / "kohya_nan_alpha.safetensors",
             lambda s: {next(k for k in s if k.endswith(".alpha")): torch.tensor(float("nan"))})
    (d / "kohya.safetensors").unlink()
    # PEFT directories (from a real BERT snapshot): bad JSON, non-UTF-8, a NaN alpha, an int8 factor
    bert_final = _snapshot(EmbeddingHead(str(tiny_bert)), m / "bert_run" / "adapters" / "final", m / "bert_run")
    peft = bert_final / "encoder"
    config = json.loads((peft / "adapter_config.json").read_text())
    _peft_dir(peft, d / "peft_bad_json", b'{"r": 2, "lora_alpha": 4,')
    latin1 = json.dumps({**config, "base_model_name_or_path": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    _peft_dir(peft, d / "peft_latin1", latin1)
    _peft_dir(peft, d / "peft_nan_alpha", json.dumps({**config, "lora_alpha": float("nan")}).encode())
    _peft_dir(peft, d / "peft_int8", tensors=lambda s: {_first_a(s): s[_first_a(s)].to(torch.int8)})
    _peft_dir(peft, d / "peft_nan", tensors=_nan_first)
    # the families' bases and run snapshots
    sd = Path(ensure_tiny_sd(m / "sd"))
    lbm = Path(ensure_tiny_lbm(m / "lbm"))
    sd_final = _snapshot(DiffusionHead(str(sd), resolution=32), m / "sd_run" / "adapters" / "final", m / "sd_run")
    lbm_final = _snapshot(BridgeHead(str(lbm)), m / "lbm_run" / "adapters" / "final", m / "lbm_run")
    trellis = instantiate(compose_config(["model=trellis_ss_tiny"]).model)
    trellis_final = _snapshot(trellis, m / "trellis_run" / "adapters" / "final", m / "trellis_run")
    p.update(sd=sd, lbm=lbm, sd_final=sd_final, lbm_final=lbm_final, trellis_final=trellis_final,
             bert_final=bert_final, bert=tiny_bert, trellis_ckpt=Path(trellis.ckpt), lbm_file=lbm_final / LBM_FILE,
             trellis_file=next((m / "trellis_run" / "lora_ckpts").glob("*.safetensors")))
    # combine: the same LBM LoRA saying it is for another family / another base model
    _rewrite(p["lbm_file"], d / "lbm_as_trellis.safetensors", family="trellis")
    _rewrite(p["lbm_file"], d / "lbm_other_base.safetensors", base_model=json.dumps({"name": "another-model"}))
    from PIL import Image

    Image.fromarray(np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[:, None, None], (1, 16, 3))).save(d / "src.png")
    np.savez(d / "cond.npz", tokens=np.zeros((4, trellis.denoiser.cond_channels), dtype=np.float32))
    (d / "keep.safetensors").write_bytes(b"an earlier output, kept")
    (d / "keep.png").write_bytes(b"an earlier picture, kept")
    return d, m, p


# ---------------------------------------------------------------------------- the command-line table
def _cli_cases(d: Path, p: dict[str, Path]) -> dict[str, tuple[str, list, str]]:
    """name -> (kind, argv, needle)."""
    b, t, lora, keep = p["base"], p["tuned"], p["lora"], d / "keep.safetensors"
    merge = ["merge", "--base", b, "--out", keep, "--overwrite", "--lora"]
    combine_out = ["--out", keep, "--overwrite"]
    extract = ["extract", "--base", b, "--out", keep, "--overwrite"]
    sd = ["sample", "sd", "--pretrained", p["sd"], "--prompt", "a digit", "--steps", "1", "--out", d / "keep.png",
          "--overwrite"]
    lbm = ["sample", "lbm", "--pretrained", p["lbm"], "--source", d / "src.png", "--out", d / "keep.png",
           "--overwrite"]
    flow = ["sample", "flow3d", "--model", "trellis_ss_tiny", "--cond", d / "cond.npz", "--out", d / "s.npz",
            "--no-png"]
    nf, tb, mm = "non-finite", "traceback", "mismatch"
    return {
        # scales and weights must be finite; results are checked before they are written
        "merge weight 1e39 overflows": (nf, [*merge, f"{lora}:1e39"], "1e+39"),
        "merge weight nan": (nf, [*merge, f"{lora}:nan"], "'nan'"),
        "merge weight inf": (nf, [*merge, f"{lora}:inf"], "'inf'"),
        "merge weight -inf": (nf, [*merge, f"{lora}:-inf"], "'-inf'"),
        "merge lora NaN tensor": (nf, [*merge, d / "nan_lora.safetensors"], "block.conv"),
        "merge lora NaN alpha": (nf, [*merge, d / "nan_alpha.safetensors"], "lora_alpha=nan"),
        "merge kohya NaN alpha": (nf, [*merge, d / "kohya_nan_alpha.safetensors"], "lora_unet_block_conv"),
        "merge base with Inf": (nf, ["merge", "--base", d / "inf_base.safetensors", "--lora", lora, "--out", keep,
                                     "--overwrite"], "block.pw.weight"),
        "combine NaN tensor": (nf, ["combine", lora, d / "nan_lora.safetensors", *combine_out], "block.conv"),
        "combine NaN alpha": (nf, ["combine", lora, d / "nan_alpha.safetensors", *combine_out], "lora_alpha=nan"),
        "combine PEFT NaN alpha": (nf, ["combine", d / "peft_nan_alpha", *combine_out], "lora_alpha=nan"),
        "combine weight 1e39 concat": (nf, ["combine", f"{lora}:1e39", f"{lora}:1e39", *combine_out], ".up'"),
        "combine weight 1e39 svd": (nf, ["combine", f"{lora}:1e39", "--method", "svd", *combine_out],
                                    "weighted sum of module"),
        "combine weight nan": (nf, ["combine", f"{lora}:nan", lora, *combine_out], "'nan'"),
        "extract NaN in tuned": (nf, [*extract, "--tuned", d / "nan_tuned.safetensors"], "proj.weight"),
        "extract Inf in base": (nf, ["extract", "--base", d / "inf_base.safetensors", "--tuned", t, "--out", keep,
                                     "--overwrite"], "block.pw.weight"),
        "extract min-diff nan": (nf, [*extract, "--tuned", t, "--min-diff", "nan"], "--min-diff=nan"),
        "extract min-diff inf": (nf, [*extract, "--tuned", t, "--min-diff", "inf"], "--min-diff=inf"),
        "validate threshold nan": (nf, ["validate", "--base", b, "--tuned", t, "--lora", lora, "--threshold", "nan"],
                                   "--threshold=nan"),
        "validate threshold inf": (nf, ["validate", "--base", b, "--tuned", t, "--lora", lora, "--threshold", "inf"],
                                   "--threshold=inf"),
        "validate NaN in tuned": (nf, ["validate", "--base", b, "--tuned", d / "nan_tuned.safetensors", "--lora",
                                       lora, "--layers-out", d / "layers.txt"], "proj.weight"),
        "validate NaN lora": (nf, ["validate", "--base", b, "--tuned", t, "--lora", d / "nan_lora.safetensors",
                                   "--layers-out", d / "layers.txt"], "block.conv"),
        "sample sd scale nan": (nf, [*sd, "--scale", "nan"], "'nan'"),
        "sample sd scale inf": (nf, [*sd, "--scale", "inf"], "'inf'"),
        "sample sd guidance nan": (nf, [*sd, "--guidance", "nan"], "'nan'"),
        "sample sd lora 1e39": (nf, [*sd, "--lora", f"{p['sd_final']}:1e39"], "1e+39"),
        "sample lbm scale nan": (nf, [*lbm, "--scale", "nan"], "'nan'"),
        "sample lbm lora 1e39": (nf, [*lbm, "--lora", f"{p['lbm_final']}:1e39"], "1e+39"),
        "sample lbm NaN lora": (nf, [*lbm, "--lora", d / "nan_lora.safetensors"], "block.conv"),
        "sample flow3d scale inf": (nf, [*flow, "--scale", "inf"], "'inf'"),
        "sample flow3d cfg nan": (nf, [*flow, "--cfg", "nan"], "'nan'"),
        "sample flow3d rescale-t inf": (nf, [*flow, "--rescale-t", "inf"], "'inf'"),
        "sample flow3d lora scale 1e39": (nf, [*flow, "--lora", p["trellis_file"], "--scale", "1e39"], "1e+39"),
        "sample flow3d NaN lora": (nf, [*flow, "--lora", d / "nan_lora.safetensors"], "block.conv"),
        "inspect kohya NaN alpha": (nf, ["inspect", d / "kohya_nan_alpha.safetensors"], "lora_unet_block_conv"),
        "combine svd NaN tensor": (nf, ["combine", lora, d / "nan_lora.safetensors", "--method", "svd",
                                        *combine_out], "block.conv"),
        # adapters are float
        "validate int8 lora": (nf, ["validate", "--base", b, "--tuned", t, "--lora", d / "int8_lora.safetensors",
                                    "--layers-out", d / "layers.txt"], "int8"),
        "inspect int8 lora": (nf, ["inspect", d / "int8_lora.safetensors"], "int8"),
        "inspect int8 PEFT dir": (nf, ["inspect", d / "peft_int8"], "int8"),
        "merge int8 lora": (nf, [*merge, d / "int8_lora.safetensors"], "int8"),
        "combine bool lora": (nf, ["combine", lora, d / "bool_lora.safetensors", *combine_out], "bool"),
        # one line, not a traceback or a wrong message
        "inspect bad adapters JSON": (tb, ["inspect", d / "bad_json.safetensors"], "metadata 'adapters'"),
        "inspect adapters JSON list": (tb, ["inspect", d / "list_json.safetensors"], "metadata 'adapters'"),
        "inspect bad base_model JSON": (tb, ["inspect", d / "bad_base_json.safetensors"], "metadata 'base_model'"),
        "inspect r=0 in metadata": (tb, ["inspect", d / "zero_r.safetensors"], "r=0"),
        "inspect PEFT bad config JSON": (tb, ["inspect", d / "peft_bad_json"], "adapter_config.json"),
        "inspect PEFT config not UTF-8": (tb, ["inspect", d / "peft_latin1"], "adapter_config.json"),
        "merge bad adapters JSON": (tb, [*merge, d / "bad_json.safetensors"], "bad_json.safetensors"),
        "merge weight abc": (tb, [*merge, f"{lora}:abc"], "'abc' is not a number"),
        "combine weight abc": (tb, ["combine", f"{lora}:abc", *combine_out], "'abc' is not a number"),
        "sample sd lora weight abc": (tb, [*sd, "--lora", f"{lora}:abc"], "'abc' is not a number"),
        "sample sd steps 0": (tb, [*sd, "--steps", "0"], "'0'"),
        "sample sd steps -3": (tb, [*sd, "--steps", "-3"], "'-3'"),
        "sample sd steps abc": (tb, [*sd, "--steps", "abc"], "'abc'"),
        "sample sd resolution -8": (tb, [*sd, "--resolution", "-8"], "--resolution=-8"),
        "sample sd resolution 0": (tb, [*sd, "--resolution", "0"], "--resolution=0"),
        "sample sd resolution 12": (tb, [*sd, "--resolution", "12"], "multiple of 8"),
        "sample lbm steps 0": (tb, [*lbm, "--steps", "0"], "--steps=0"),
        "sample lbm size -8x16": (tb, [*lbm, "--size=-8x16"], "'-8x16'"),
        "sample flow3d steps 0": (tb, [*flow, "--steps", "0"], "'0'"),
        # combine refuses adapters that cannot be for one model
        "combine LBM and TRELLIS LoRAs": (mm, ["combine", p["lbm_file"], p["trellis_file"], *combine_out],
                                          "--allow-disjoint"),
        "combine LBM and TRELLIS snapshots": (mm, ["combine", p["lbm_final"], p["trellis_final"], *combine_out],
                                              "disagree on the base model"),
        "combine modules disjoint": (mm, ["combine", lora, d / "renamed.safetensors", *combine_out],
                                     "shares no module"),
        "combine families differ": (mm, ["combine", p["lbm_file"], d / "lbm_as_trellis.safetensors", *combine_out],
                                    "'diffusion' vs 'trellis'"),
        "combine base models differ": (mm, ["combine", p["lbm_file"], d / "lbm_other_base.safetensors",
                                            *combine_out], "another-model"),
    }


CLI_NAMES = list(_cli_cases(Path("d"), {k: Path(k) for k in (
    "base", "tuned", "lora", "sd", "lbm", "sd_final", "lbm_final", "trellis_final", "lbm_file", "trellis_file")}))


@pytest.mark.parametrize("name", CLI_NAMES)
def test_cli_hostile(world, name, capsys) -> None:
    d, _, p = world
    _, argv, needle = _cli_cases(d, p)[name]
    before = file_bytes(d)
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert_one_error_line(rc, err, needle, case=name)
    assert file_bytes(d) == before, name  # nothing written or replaced, no temporary left


# ---------------------------------------------------------------------------- the Python API table
def _peft_net(lora: Path):
    from lightning_lora.adapters import load_lora_weights

    return load_lora_weights(net_with(net_pair()[0]), lora)


def _api_cases(d: Path, p: dict[str, Path]) -> dict[str, tuple[str, object, str]]:
    """name -> (kind, call, needle)."""
    from lightning_lora.adapters import (
        LoRAModelWrapper,
        combine_concat,
        combine_svd,
        extract_lora,
        load_lora_weights,
        merge_adapter,
        merge_into,
        merge_lora_weights,
        read_adapters,
        read_lora,
        set_adapter_scale,
    )
    from lightning_lora.predict import Predictor

    nan, inf = float("nan"), float("inf")
    mods = lambda: read_lora(p["lora"]).modules  # noqa: E731
    net = lambda: net_with(net_pair()[0])  # noqa: E731
    nf, tb, mm = "non-finite", "traceback", "mismatch"
    return {
        "merge_lora_weights scale nan": (nf, lambda: merge_lora_weights(_peft_net(p["lora"]), nan), "scale=nan"),
        "merge_lora_weights scale inf": (nf, lambda: merge_lora_weights(_peft_net(p["lora"]), inf), "scale=inf"),
        "merge_lora_weights scale 1e39": (nf, lambda: merge_lora_weights(_peft_net(p["lora"]), 1e39), "'proj'"),
        "merge_adapter scale nan": (nf, lambda: merge_adapter(_peft_net(p["lora"]), nan), "scale=nan"),
        "set_adapter_scale -inf": (nf, lambda: set_adapter_scale(_peft_net(p["lora"]), -inf), "scale=-inf"),
        "LoRAModelWrapper.merge nan": (nf, lambda: LoRAModelWrapper.load(net(), p["lora"]).merge(nan), "scale=nan"),
        "combine_concat weight nan": (nf, lambda: combine_concat([(mods(), 1.0), (mods(), nan)]), "adapter 2"),
        "combine_svd weight inf": (nf, lambda: combine_svd([(mods(), inf)], None), "adapter 1"),
        "merge_into weight 1e39": (nf, lambda: merge_into(torch.zeros(16, 3), [(mods()["proj"], 1e39)], "proj"),
                                   "'proj'"),
        "extract_lora min_diff nan": (nf, lambda: extract_lora(*net_pair(), rank=2, min_diff=nan), "min_diff=nan"),
        "extract_lora NaN tuned": (nf, lambda: extract_lora(net_pair()[0], {
            **net_pair()[1], "proj.weight": torch.full((16, 3), nan)}, rank=2), "proj.weight"),
        "load_lora_weights NaN tensor": (nf, lambda: load_lora_weights(net(), d / "nan_lora.safetensors"),
                                         "block.conv"),
        "load_lora_weights NaN alpha": (nf, lambda: load_lora_weights(net(), d / "nan_alpha.safetensors"),
                                        "lora_alpha=nan"),
        "load_lora_weights int8": (nf, lambda: load_lora_weights(net(), d / "int8_lora.safetensors"), "int8"),
        "read_adapters PEFT NaN": (nf, lambda: read_adapters(d / "peft_nan"), "NaN"),
        "combine_concat disjoint": (mm, lambda: combine_concat([(mods(), 1.0), (read_lora(
            d / "renamed.safetensors").modules, 1.0)]), "allow_disjoint=True"),
        "combine_svd disjoint": (mm, lambda: combine_svd([(mods(), 1.0), (read_lora(
            d / "renamed.safetensors").modules, 1.0)], 2), "allow_disjoint=True"),
        "Predictor NaN adapter": (nf, lambda: Predictor.from_pretrained(str(p["bert"]), d / "peft_nan", family="text"),
                                  "NaN"),
        "Predictor int8 adapter": (nf, lambda: Predictor.from_pretrained(str(p["bert"]), d / "peft_int8",
                                                                         family="text"), "int8"),
        "Predictor bad adapter_config.json": (tb, lambda: Predictor.from_pretrained(
            str(p["bert"]), d / "peft_bad_json", family="text"), "adapter_config.json: the config is not valid JSON"),
        "load_lora_weights bad JSON": (tb, lambda: load_lora_weights(net(), d / "bad_json.safetensors"),
                                       "metadata 'adapters'"),
        "load_lora_weights PEFT bad JSON": (tb, lambda: load_lora_weights(net(), d / "peft_bad_json"),
                                            "adapter_config.json"),
        "read_adapters bad JSON": (tb, lambda: read_adapters(d / "bad_json.safetensors"), "not valid JSON"),
    }


API_NAMES = list(_api_cases(Path("d"), {"lora": Path("lora"), "bert": Path("bert")}))


@pytest.mark.parametrize("name", API_NAMES)
def test_api_hostile(world, name) -> None:
    d, _, p = world
    _, call, needle = _api_cases(d, p)[name]
    before = file_bytes(d)
    with pytest.raises(UserError) as info:
        call()
    line = user_message(info.value)
    assert line is not None and "\n" not in line and needle in line, (name, line)
    assert file_bytes(d) == before, name


@pytest.fixture(scope="module")
def predictor(world):
    from lightning_lora.predict import Predictor

    return Predictor.from_pretrained(str(world[2]["bert"]), world[2]["bert_final"], family="text")


@pytest.mark.parametrize("target", ["file", "folder"])
def test_predictor_merge_and_save_refuses_an_existing_output(world, predictor, target) -> None:
    d = world[0]
    out = d / ("keep.safetensors" if target == "file" else "peft_bad_json")
    before = file_bytes(d)
    with pytest.raises(UserError, match="pass overwrite=True") as info:
        predictor.merge_and_save(out)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert file_bytes(d) == before and predictor.adapters  # nothing merged either


# ---------------------------------------------------------------------------- what must still work
def test_allow_disjoint_combines_lbm_and_trellis(world, tmp_path, capsys) -> None:
    _, _, p = world
    out = tmp_path / "both.safetensors"
    assert cli_main(["combine", str(p["lbm_file"]), str(p["trellis_file"]), "--out", str(out),
                     "--allow-disjoint"]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()


@pytest.mark.parametrize("family", ["bert", "sd", "lbm", "trellis"])
def test_inspect_and_merge_take_a_runs_adapters_final(world, family, tmp_path, capsys) -> None:
    """The path training prints at the end (``Adapter: <run>/adapters/final``) is an adapter for every tool."""
    from lightning_lora.adapters.checkpoints import open_weights

    _, _, p = world
    final = p[f"{family}_final"]
    assert cli_main(["inspect", str(final)]) == 0
    shown = capsys.readouterr().out
    assert "run's adapter snapshot" in shown and "r=2 alpha=4" in shown
    if family == "lbm":  # the snapshot's own self-describing file names it
        assert "family: unknown" not in shown
    base = {"bert": p["bert"] / "model.safetensors", "sd": p["sd"], "lbm": p["lbm"] / "model.safetensors",
            "trellis": p["trellis_ckpt"]}[family]
    out = tmp_path / ("merged" if family == "sd" else "merged.safetensors")
    assert cli_main(["merge", "--base", str(base), "--lora", str(final), "--out", str(out)]) == 0
    merged, original = open_weights(out), open_weights(base)
    changed = [k for k in original if not torch.equal(original.get(k), merged.get(k))]
    assert changed and all(torch.isfinite(merged.get(k)).all() for k in changed)


def test_sample_flow3d_takes_a_runs_adapters_final(world, tmp_path, capsys) -> None:
    d, _, p = world
    out = tmp_path / "s.npz"
    assert cli_main(["sample", "flow3d", "--model", "trellis_ss_tiny", "--cond", str(d / "cond.npz"), "--lora",
                     str(p["trellis_final"]), "--steps", "1", "--out", str(out), "--no-png"]) == 0
    assert np.isfinite(np.load(out)["latent"]).all()


def test_the_table_has_the_cases_the_issue_lists() -> None:
    kinds = {}
    d, p = Path("d"), {k: Path(k) for k in ("base", "tuned", "lora", "sd", "lbm", "sd_final", "lbm_final",
                                           "trellis_final", "lbm_file", "trellis_file")}
    for kind, *_ in [*_cli_cases(d, p).values(), *_api_cases(d, {**p, "bert": Path("bert")}).values()]:
        kinds[kind] = kinds.get(kind, 0) + 1
    assert sum(kinds.values()) >= 45, kinds
    print(kinds)
