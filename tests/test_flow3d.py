"""3D flow family: flow-matching maths, conditioning, checkpoints, a tiny end-to-end run, sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_lora.adapters import load_lora_weights, read_adapter_file
from lightning_lora.errors import UserError
from lightning_lora.heads.flow3d import FlowMatching3DHead, noise_and_target
from lightning_lora.models.trellis import save_trellis_model
from lightning_lora.train import _user_error, run


def _tiny(model: str = "trellis_slat_tiny", **overrides) -> FlowMatching3DHead:
    cfg = compose_train([f"model={model}", *[f"model.{k}={v}" for k, v in overrides.items()]])
    torch.manual_seed(0)
    return instantiate(cfg.model)


def test_noise_and_target_follow_rectified_flow() -> None:
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    t = torch.tensor([0.0, 0.5, 1.0])
    x_t, v = noise_and_target(x0, t, eps, sigma_min=1e-5)
    torch.testing.assert_close(x_t[0], x0[0] + 1e-5 * eps[0])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(v, (1 - 1e-5) * eps - x0)
    # integrating the exact velocity from t=1 to t=0 lands on x0 (the sampler's Euler step is exact here)
    torch.testing.assert_close(x_t[1] - 0.5 * v[1], x0[1] + 1e-5 * eps[1], rtol=1e-5, atol=1e-5)


def test_condition_noise_then_cfg_drop() -> None:
    head = _tiny(p_uncond=0.5, cond_noise_schedule="fixed", cond_noise_std=0.3)
    cond = torch.ones(400, 4, 64)
    out = head.condition(cond, torch.Generator().manual_seed(0))
    dropped = (out == 0).flatten(1).all(1)
    assert 150 < int(dropped.sum()) < 250  # about p_uncond of the rows are all-zero (the null condition)
    kept = out[~dropped] - 1
    assert abs(float(kept.std()) - 0.3) < 0.01  # noise was added before the drop, with the fixed std
    assert torch.equal(head.condition(cond, train=False), cond)  # no noise or drop at inference


def test_checkpoint_round_trip_and_mismatch(tmp_path) -> None:
    head = _tiny()
    path = save_trellis_model(head.denoiser, tmp_path / "slat_tiny")
    loaded = _tiny(ckpt=str(path))
    for (name, a), (_, b) in zip(head.denoiser.state_dict().items(), loaded.denoiser.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    _expect_user_error(lambda: _tiny(ckpt=str(path), **{"denoiser.model_channels": 32}),
                       "'t_embedder.mlp.0.weight' has shape [64, 256] in the checkpoint, [32, 256] in the model")
    _expect_user_error(lambda: _tiny(ckpt=str(tmp_path / "nope.safetensors")), "checkpoint not found")


def _expect_user_error(fn, needle: str) -> None:
    with pytest.raises(Exception) as info:  # Hydra's instantiate wraps errors raised in constructors
        fn()
    err = _user_error(info.value)
    assert err is not None and needle in str(err) and "\n" not in str(err), info.value


@pytest.mark.parametrize(("model", "kind"), [("trellis_slat_tiny", "slat"), ("trellis_ss_tiny", "ss")])
def test_tiny_run_trains_writes_lora_ckpts_reloads_and_samples(tmp_path, model: str, kind: str) -> None:
    cfg = compose_train([
        f"model={model}", "data=trellis_demo", f"data.kind={kind}", "data.num_shapes=12", "data.val_fraction=0.4",
        f"paths.cache_dir={tmp_path}",
        "trainer.max_steps=6", "callbacks.adapter_checkpoint.every_n_steps=3", "~callbacks.progress_bar",
        "adapter.init=random", "optimizer.lr=3e-3", "trainer.precision=32-true",
    ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics, objects = run(cfg)
    head: FlowMatching3DHead = objects["head"]
    out = tmp_path / "run"
    names = sorted(p.name for p in (out / "lora_ckpts").iterdir())
    assert names == ["denoiser_lora_step0000003.safetensors", "denoiser_lora_step0000006.safetensors"]
    assert metrics["after"]["val/loss"] != metrics["before"]["val/loss"]

    configs, _, extra = read_adapter_file(out / "lora_ckpts" / names[-1])
    assert extra["family"] == "flow3d" and configs[""].r == 8 and set(configs[""].target_modules) == {
        "to_q", "to_kv", "to_out", "to_qkv"}
    torch.manual_seed(cfg.seed)  # the run built its random base right after seeding
    fresh = instantiate(cfg.model).denoiser
    reloaded = load_lora_weights(fresh, out / "lora_ckpts" / names[-1]).eval()
    batch = next(iter(objects["datamodule"].val_dataloader()))
    cond = batch["cond"]
    t = torch.full((cond.shape[0],), 500.0)
    head.eval()
    with torch.no_grad():
        if kind == "ss":
            x = batch["x0"]
            assert torch.equal(reloaded(x, t, cond), head.denoiser(x, t, cond))
            sample = head.sample(cond, steps=3, seed=1)
            assert sample.shape == x.shape and torch.equal(sample, head.sample(cond, steps=3, seed=1))
        else:
            from lightning_lora.models.trellis import SparseTensor

            x = SparseTensor(batch["coords"], batch["feats"])
            assert torch.equal(reloaded(x, t, cond).feats, head.denoiser(x, t, cond).feats)
            sample = head.sample(cond, coords=batch["coords"], steps=3, seed=1)
            assert sample.feats.shape == batch["feats"].shape and torch.isfinite(sample.feats).all()


def test_dense_model_on_sparse_data_is_one_line(tmp_path) -> None:
    cfg = compose_train(["model=trellis_ss_tiny", "data=trellis_demo", "data.kind=slat", "data.num_shapes=8",
                         f"paths.cache_dir={tmp_path}", "trainer.max_steps=1", "validate_before=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(Exception) as info:
        run(cfg)
    err = _user_error(info.value)
    assert err is not None and "use data.kind=ss" in str(err)


def test_released_presets_need_a_checkpoint(tmp_path) -> None:
    cfg = compose_train(["model=trellis_slat", "data=trellis_demo"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match="model.ckpt is required: pass model.ckpt=<value>"):
        run(cfg)


def test_cli_sample_with_the_trained_lora(tmp_path, capsys) -> None:
    """lightning-lora sample flow3d: the adapter changes the sample, --scale 0 gives the base's sample."""
    import numpy as np

    from lightning_lora.cli import main
    from lightning_lora.data.trellis import SLAT_MODEL, make_trellis_demo

    demo = make_trellis_demo(tmp_path / "demo", n=2, resolution=32)
    sha = sorted((demo / "cond_tokens").iterdir())[0].name
    from lightning_lora.adapters import AdapterSpec, inject_adapter, save_lora_weights

    torch.manual_seed(42)  # the CLI's --base-seed default: the same random tiny base
    base = instantiate(compose_train(["model=trellis_slat_tiny"]).model).denoiser
    config = AdapterSpec(r=4, alpha=8, init="random").lora_config(["to_q", "to_kv", "to_out", "to_qkv"])
    lora = save_lora_weights(inject_adapter(base, config), tmp_path / "lora.safetensors")
    common = ["sample", "flow3d", "--model", "trellis_slat_tiny", "--cond", str(demo / "cond_tokens" / sha),
              "--coords", str(demo / "latents" / SLAT_MODEL / sha), "--steps", "3"]
    outs = {}
    runs = {"base": [], "lora": ["--lora", str(lora)], "off": ["--lora", str(lora), "--scale", "0"]}
    for name, extra in runs.items():
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.npz")]) == 0
        outs[name] = np.load(tmp_path / f"{name}.npz")["feats"]
    assert not np.allclose(outs["base"], outs["lora"])
    np.testing.assert_allclose(outs["off"], outs["base"], rtol=1e-5, atol=1e-5)
    assert main([*common, "--out", str(tmp_path / "base.npz")]) == 2  # refuses to overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
