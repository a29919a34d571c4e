"""The adapters room: spec validation, injection errors, merge and unload, and file round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny import TinyDenoiser, tiny_batch

from lightning_lora.adapters import (
    AdapterSpec,
    LoRAModelWrapper,
    apply_lora_to_model,
    get_lora_config,
    inject_adapter,
    load_lora_weights,
    merge_lora_weights,
    print_trainable_parameters,
    read_adapter_file,
    save_lora_weights,
    save_peft_dir,
)
from lightning_lora.errors import UserError


def _model(seed: int = 0) -> TinyDenoiser:
    torch.manual_seed(seed)
    return TinyDenoiser().eval()


def _out(model: torch.nn.Module) -> torch.Tensor:
    b = tiny_batch()
    with torch.no_grad():
        return model(b["x"], b["context"])


def _adapted(r: int = 4, alpha: float = 8, seed: int = 0) -> PeftModel:
    """A model whose adapter has random (non-zero) B, so it changes the outputs."""
    spec = AdapterSpec(r=r, alpha=alpha, init="random")
    return inject_adapter(_model(seed), spec.lora_config(["to_q", "to_kv", "to_out", "to_qkv"]))


# ---------------------------------------------------------------- spec
@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"r": 0}, "adapter.r=0"),
        ({"r": -4}, "adapter.r=-4"),
        ({"r": 2.5}, "adapter.r=2.5"),
        ({"r": True}, "adapter.r=True"),
        ({"r": "8"}, "adapter.r='8'"),
        ({"alpha": 0}, "adapter.alpha=0"),
        ({"alpha": -1.0}, "adapter.alpha=-1.0"),
        ({"dropout": 1.0}, "adapter.dropout=1.0"),
        ({"dropout": -0.1}, "adapter.dropout=-0.1"),
        ({"init": "xavier"}, "adapter.init='xavier'"),
        ({"bias": "some"}, "adapter.bias='some'"),
        ({"targets": []}, "adapter.targets=[]"),
        ({"targets": [1, 2]}, "adapter.targets=[1, 2]"),
    ],
)
def test_spec_rejects_bad_values_with_one_line(fields: dict, needle: str) -> None:
    with pytest.raises(UserError) as info:
        AdapterSpec(**fields)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_spec_from_config_names_unknown_field_and_valid_ones() -> None:
    with pytest.raises(UserError, match=r"adapter\.rank is not an adapter field; valid: .*alpha.*r, rslora"):
        AdapterSpec.from_config({"rank": 8})


def test_spec_scaling_and_lora_config() -> None:
    spec = AdapterSpec(r=12, alpha=24, dropout=0.05, targets=["query", "value"])
    assert spec.scaling == 2.0 and AdapterSpec(r=16, alpha=8, rslora=True).scaling == 2.0
    config = spec.lora_config(spec.targets_for("encoder", ["dense"]))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (12, 24, 0.05)
    assert set(config.target_modules) == {"query", "value"}
    per_sub = AdapterSpec(targets={"unet": ["to_q"]})
    assert per_sub.targets_for("unet", ["x"]) == ["to_q"] and per_sub.targets_for("text", ["x"]) == ["x"]


# ---------------------------------------------------------------- injection
def test_targets_that_match_nothing_list_existing_layers() -> None:
    with pytest.raises(UserError) as info:
        inject_adapter(_model(), AdapterSpec().lora_config(["to_v", "to_w"]), where="denoiser")
    msg = str(info.value)
    assert "['to_v', 'to_w'] match no module in denoiser" in msg and "to_qkv x2" in msg and "to_out x4" in msg
    # one target list for several families: the listed targets that match nothing are named in a warning
    with pytest.warns(UserWarning, match=r"adapter targets \['to_v'\] match no module in denoiser; LoRA goes into "
                                         r"\['to_q'\]"):
        peft = inject_adapter(_model(), AdapterSpec().lora_config(["to_q", "to_v"]), where="denoiser")
    assert {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft.named_parameters() if ".lora_A." in n} == {"to_q"}


def test_target_on_unsupported_layer_type_is_refused() -> None:
    with pytest.raises(UserError, match="LayerNorm"):
        inject_adapter(_model(), AdapterSpec().lora_config(["norm"]))


def test_injection_freezes_base_and_zero_init_keeps_outputs() -> None:
    base = _model()
    reference = _out(copy.deepcopy(base))
    peft = inject_adapter(base, AdapterSpec(r=4, alpha=8).lora_config(["to_q", "to_kv", "to_out", "to_qkv"]))
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert torch.equal(_out(peft), reference)  # B = 0 at init: nothing changes until training


# ---------------------------------------------------------------- merge maths
# merge = W + scale·(alpha/r)·B·A by hand, idempotent, unmerge restores W: test_families.py, on every family


def test_merge_and_unload_gives_plain_module_with_same_outputs() -> None:
    peft = _adapted()
    expected = _out(peft)
    merged = merge_lora_weights(peft)
    assert isinstance(merged, TinyDenoiser)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_out(merged), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- files
def test_peft_dir_round_trip_and_peft_from_pretrained(tmp_path) -> None:
    peft = _adapted()
    expected = _out(peft)
    save_peft_dir(peft, tmp_path / "ad", base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())

    ours = load_lora_weights(_model(), tmp_path / "ad")
    assert torch.equal(_out(ours), expected)
    theirs = PeftModel.from_pretrained(_model(), str(tmp_path / "ad"))
    assert torch.equal(_out(theirs), expected)
    assert not torch.equal(_out(_model()), expected)  # the adapter really does something


def test_single_file_describes_itself(tmp_path) -> None:
    peft = _adapted(r=4, alpha=12)
    expected = _out(peft)
    path = save_lora_weights(peft, tmp_path / "lora.safetensors", base_model="tiny-denoiser")
    configs, _, extra = read_adapter_file(path)
    assert configs[""].r == 4 and configs[""].lora_alpha == 12
    assert set(configs[""].target_modules) == {"to_q", "to_kv", "to_out", "to_qkv"}
    assert extra["base_model"] == {"name": "tiny-denoiser"}
    loaded = load_lora_weights(_model(), path)  # no r / alpha / targets needed
    assert torch.equal(_out(loaded), expected)


def test_bare_pt_state_dict_loads_with_weights_only(tmp_path) -> None:
    peft = _adapted(r=4, alpha=8)
    expected = _out(peft)
    state = {k: v for k, v in peft.state_dict().items() if "lora_" in k}  # module-style keys with ".default"
    torch.save(state, tmp_path / "denoiser_lora_step0000010.pt")
    loaded = load_lora_weights(_model(), tmp_path / "denoiser_lora_step0000010.pt", r=4, lora_alpha=8)
    assert torch.equal(_out(loaded), expected)
    with pytest.raises(UserError, match="pass r= and lora_alpha="):
        load_lora_weights(_model(), tmp_path / "denoiser_lora_step0000010.pt")


def test_shape_mismatch_names_module_and_both_shapes(tmp_path) -> None:
    save_peft_dir(_adapted(r=4), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.blocks.0.self_attn.to_qkv.lora_A.weight"
    state[key] = torch.zeros(4, 7)
    save_file(state, weights)
    with pytest.raises(UserError) as info:
        load_lora_weights(_model(), tmp_path / "ad")
    msg = str(info.value)
    assert "(4, 7)" in msg and "(4, 16)" in msg and "'blocks.0.self_attn.to_qkv'" in msg


def test_strict_refuses_missing_keys_and_non_strict_loads_the_rest(tmp_path) -> None:
    peft = _adapted()
    save_peft_dir(peft, tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    state = load_file(weights)
    dropped = "base_model.model.blocks.1.cross_attn.to_q.lora_B.weight"
    del state[dropped]
    save_file(state, weights)
    with pytest.raises(UserError, match="1 adapter tensors missing"):
        load_lora_weights(_model(), tmp_path / "ad")
    with pytest.warns(UserWarning, match="1 of the model's are missing from the file"):
        partial = load_lora_weights(_model(), tmp_path / "ad", strict=False)
    kept = "base_model.model.blocks.0.cross_attn.to_q"
    torch.testing.assert_close(
        partial.get_submodule(kept).lora_B["default"].weight, peft.get_submodule(kept).lora_B["default"].weight
    )


def test_directory_without_adapter_config_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="has no adapter_config.json"):
        load_lora_weights(_model(), tmp_path / "ad")


def test_missing_adapter_file_names_path(tmp_path) -> None:
    with pytest.raises(UserError, match="adapter file not found: .*nope.safetensors"):
        load_lora_weights(_model(), tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- the seed-000 utility API
def test_seed_utility_api(tmp_path, capsys) -> None:
    config = get_lora_config(r=8, lora_alpha=16)
    assert set(config.target_modules) == {"to_q", "to_kv", "to_out", "to_qkv"}
    peft = apply_lora_to_model(_model(), r=8, lora_alpha=16, init="random")
    text = print_trainable_parameters(peft, "Tiny")
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert f"Trainable: {trainable:,}" in text and "Tiny Parameters" in capsys.readouterr().out
    expected = _out(peft)
    LoRAModelWrapper(peft).save(tmp_path / "w.safetensors")
    wrapper = LoRAModelWrapper.load(_model(), tmp_path / "w.safetensors")
    assert torch.equal(_out(wrapper.get_model()), expected)
    merged = wrapper.merge()
    torch.testing.assert_close(_out(merged), expected, rtol=1e-5, atol=1e-5)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path) -> None:
    path = save_lora_weights(_adapted(), tmp_path / "lora.safetensors")
    frozen = load_lora_weights(_model(), path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_lora_weights(_model(), path, trainable=True)
    grads = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
