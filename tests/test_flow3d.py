"""3D flow family: flow-matching maths, conditioning, checkpoints, a tiny end-to-end run, sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train
from helpers import random_coords, validated_loss
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_lora.adapters import load_lora_weights, read_adapter_file
from lightning_lora.errors import UserError
from lightning_lora.heads.flow3d import FlowMatching3DHead, noise_and_target
from lightning_lora.models.trellis import save_trellis_model
from lightning_lora.train import _user_error, run


def lora_files(*steps: int) -> list[str]:
    """The lora_ckpts/ names of these steps: the TRELLIS fork's .pt and the self-describing .safetensors twin."""
    return [f"denoiser_lora_step{step:07d}.{ext}" for step in steps for ext in ("pt", "safetensors")]


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


def test_validation_loss_weights_each_batch_by_its_objects() -> None:
    """A short last batch weighs by its objects in val/loss, not as much as a full one (batches of 2 and 1)."""
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.data.trellis import collate_trellis
    from lightning_lora.module import LoRAAdaptationModule

    head = _tiny()
    g = torch.Generator().manual_seed(0)
    items = [{"cond": torch.randn(8, 64, generator=g), "coords": random_coords(1, 32, 20 + 5 * i, seed=i)[:, 1:],
              "feats": torch.randn(20 + 5 * i, 8, generator=g)} for i in range(3)]
    batches = [collate_trellis(items[:2]), collate_trellis(items[2:])]
    head.eval()
    with torch.no_grad():
        losses = [float(head.validation_step(b)["loss"]) for b in batches]
    module = LoRAAdaptationModule(head, AdapterSpec(r=4, alpha=4))
    by_objects = (2 * losses[0] + losses[1]) / 3
    assert validated_loss(module, batches) == pytest.approx(by_objects, rel=1e-5)
    assert by_objects != pytest.approx(sum(losses) / 2, rel=1e-3)


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
    assert names == lora_files(3, 6)
    assert metrics["after"]["val/loss"] != metrics["before"]["val/loss"]

    configs, _, extra = read_adapter_file(out / "lora_ckpts" / names[-1])  # the .safetensors
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
    # through run(cfg): the data/model check stops it before the demo set or the base is built
    cfg = compose_train(["model=trellis_ss_tiny", "data=trellis_demo", "data.kind=slat", "data.num_shapes=8",
                         f"paths.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=1", "validate_before=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match="the model takes TRELLIS ss latents with condition tokens, the data yields "
                                        "TRELLIS slat latents with condition tokens"):
        run(cfg)
    assert not (tmp_path / "cache").exists()
    # a head used from Python says it too, at the first batch
    coords = torch.tensor([[0, 1, 2, 3], [1, 4, 5, 6]])
    batch = {"coords": coords, "feats": torch.randn(2, 8), "cond": torch.randn(2, 8, 64)}
    with pytest.raises(UserError, match="use data.kind=ss"):
        _tiny("trellis_ss_tiny").training_step(batch)


def test_released_presets_fetch_their_checkpoint_by_hub_id(tmp_path) -> None:
    # data.cond=tokens: the released presets condition on images, which need model.image_encoder.pretrained
    cfg = compose_train(["model=trellis_slat", "data=trellis_demo", "data.cond=tokens"])
    assert cfg.model.ckpt == "microsoft/TRELLIS-image-large/ckpts/slat_flow_img_dit_L_64l8p2_fp16.safetensors"
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"model.ckpt=microsoft/TRELLIS-image-large/ckpts/slat_flow_img_dit_L_64l8p2_"
                                        r"fp16.safetensors: not in the Hugging Face cache .* offline"):
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


# --------------------------------------------------------------------------- on-the-fly image conditioning
@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A 2-layer DINOv2-with-registers (hidden 64 = the tiny presets' cond_channels) saved as a local folder.
    Its final norm gets a non-trivial affine so the test can tell TRELLIS's features from last_hidden_state."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                       patch_size=8, num_register_tokens=4)
    model = Dinov2WithRegistersModel(config)
    with torch.no_grad():
        model.layernorm.weight.fill_(2.0)
        model.layernorm.bias.fill_(0.5)
    folder = tmp_path_factory.mktemp("tiny_dino")
    model.save_pretrained(folder)
    return folder


def _dino_head(tiny_dino, model: str = "trellis_ss_tiny") -> FlowMatching3DHead:
    return _tiny(model, **{"image_encoder.pretrained": str(tiny_dino), "image_encoder.image_size": 32})


def test_image_encoder_tokens_are_trellis_dinov2_features(tiny_dino) -> None:
    """tokens = layer_norm(x_prenorm) of the resized, ImageNet-normalised image: CLS + 4 registers + 4x4 patches."""
    import torch.nn.functional as F
    from transformers import AutoModel

    head = _dino_head(tiny_dino)
    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 40), indexing="ij")
    image = torch.stack([x, y, x * y])[None]  # a fixed 40x40 picture: resized to 32 by the encoder
    tokens = head.encode_images(image)
    assert tokens.shape == (1, 1 + 4 + 16, 64)

    reference = AutoModel.from_pretrained(tiny_dino).eval()
    seen = {}
    reference.layernorm.register_forward_pre_hook(lambda _, args: seen.update(prenorm=args[0]))
    small = F.interpolate(image, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        out = reference(pixel_values=(small - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    torch.testing.assert_close(tokens, F.layer_norm(seen["prenorm"], (64,)), rtol=0, atol=1e-6)
    # the hook saw the input of the model's own final norm (affine 2x + 0.5, eps 1e-6): the output it made is
    # last_hidden_state; the tokens are that same state normalised without affine, as TRELLIS's x_prenorm
    torch.testing.assert_close(F.layer_norm(seen["prenorm"], (64,), eps=1e-6) * 2 + 0.5, out.last_hidden_state)
    assert not torch.allclose(tokens, out.last_hidden_state, atol=0.1)
    assert abs(float(tokens.mean())) < 1e-5 and abs(float(tokens.std(-1, unbiased=False).mean()) - 1) < 1e-3
    torch.testing.assert_close(head.encode_images(small), tokens, rtol=0, atol=1e-6)  # 32 px: no resize


def test_image_encoder_is_frozen_and_outside_adapters(tiny_dino) -> None:
    from lightning_lora.adapters import AdapterSpec
    from lightning_lora.module import LoRAAdaptationModule

    head = _dino_head(tiny_dino)
    module = LoRAAdaptationModule(head, AdapterSpec(r=4, alpha=8))
    assert set(head.adaptable_submodules()) == {"denoiser"} and set(module.adapters) == {"denoiser"}
    assert not head.image_encoder.training and not any(m.training for m in head.image_encoder.modules())
    assert not any(p.requires_grad for p in head.image_encoder.parameters())
    assert not any("lora" in name for name, _ in head.image_encoder.named_modules())
    assert all(name.startswith("head.denoiser.") and "lora_" in name for name in module.trainable_names())
    assert head.base_model_identity()["image_encoder"] == str(tiny_dino)


def test_image_encoder_bad_input_is_one_line(tiny_dino, tmp_path) -> None:
    _expect_user_error(lambda: _tiny(**{"image_encoder.pretrained": str(tmp_path / "nowhere")}),
                       f"model.image_encoder.pretrained: no such directory {tmp_path / 'nowhere'}")
    from transformers import BertConfig

    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    _expect_user_error(lambda: _tiny(**{"image_encoder.pretrained": str(tmp_path / "bert")}),
                       "holds a 'bert' model, not DINOv2")
    wide = {"denoiser.cond_channels": 32, "denoiser.model_channels": 32, "denoiser.num_heads": 2}
    _expect_user_error(lambda: _tiny(**{"image_encoder.pretrained": str(tiny_dino), **wide}),
                       "model.image_encoder gives 64-dim tokens but the denoiser takes cond_channels=32")
    head = _tiny()  # no encoder: a batch of images says how to get one
    batch = {"cond_image": torch.rand(2, 3, 32, 32), "coords": torch.zeros(2, 4, dtype=torch.long),
             "feats": torch.zeros(2, 8)}
    _expect_user_error(lambda: head.training_step(batch), "set model.image_encoder.pretrained=")


@pytest.mark.parametrize(("model", "kind"), [("trellis_slat_tiny", "slat"), ("trellis_ss_tiny", "ss")])
def test_image_conditioned_run_trains_and_checkpoints_hold_no_encoder(tmp_path, tiny_dino, model, kind) -> None:
    import math

    cfg = compose_train([
        f"model={model}", "data=trellis_demo", f"data.kind={kind}", "data.num_shapes=12", "data.val_fraction=0.4",
        "data.cond=images", f"model.image_encoder.pretrained={tiny_dino}", "model.image_encoder.image_size=32",
        f"paths.cache_dir={tmp_path}", "trainer.max_steps=4", "callbacks.adapter_checkpoint.every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=2", "~callbacks.progress_bar", "adapter.init=random",
        "optimizer.lr=3e-3", "trainer.precision=32-true",
    ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    assert cfg.data.image_size == 32  # the data resizes the renders to the encoder's size
    metrics, objects = run(cfg)
    out = tmp_path / "run"
    names = sorted(p.name for p in (out / "lora_ckpts").iterdir())
    assert names == lora_files(2, 4)
    assert math.isfinite(metrics["before"]["val/loss"]) and math.isfinite(metrics["after"]["val/loss"])
    assert metrics["after"]["val/loss"] != metrics["before"]["val/loss"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys) and not any("image_encoder" in k for k in keys)
    batch = next(iter(objects["datamodule"].val_dataloader()))
    assert batch["cond_image"].shape[1:] == (3, 32, 32) and "cond" not in batch


# --------------------------------------------------------------------------- sample flow3d: pictures, image condition
def test_cli_sample_draws_the_sampled_voxels(tmp_path, capsys, tiny_dino) -> None:
    import numpy as np
    from PIL import Image

    from lightning_lora.cli import main
    from lightning_lora.data.trellis import (
        SLAT_MODEL,
        colour_image,
        decode_demo_ss,
        feature_colours,
        make_trellis_demo,
        voxel_colour_picture,
        voxel_picture,
    )

    demo = make_trellis_demo(tmp_path / "demo", n=2, resolution=32)
    sha = sorted((demo / "cond_tokens").iterdir())[0].stem
    tokens, xyz = demo / "cond_tokens" / f"{sha}.npz", demo / "latents" / SLAT_MODEL / f"{sha}.npz"

    # structured latent: the voxels are the given coords and the sample is their features, drawn as colours (the
    # preset's previews.colours: pca); the tiny (demo) preset writes <out>.png by itself
    slat = ["sample", "flow3d", "--model", "trellis_slat_tiny", "--cond", str(tokens), "--coords", str(xyz),
            "--steps", "2"]
    assert main([*slat, "--out", str(tmp_path / "slat.npz")]) == 0
    assert "voxels coloured by model.previews.colours=pca" in capsys.readouterr().out
    with Image.open(tmp_path / "slat.png") as image:
        picture = np.asarray(image)
        assert image.mode == "RGB" and image.size == (3 * 128 + 2 * 4, 128)  # 32^3 grid, 4 pixels per voxel
    sampled = np.load(tmp_path / "slat.npz")
    expected = colour_image(voxel_colour_picture(sampled["coords"], feature_colours(sampled["feats"]), 32))
    assert np.array_equal(picture, np.asarray(expected))
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # features differ voxel to voxel: many colours

    # sparse-structure latent: decoded by inverting the demo's stand-in encoding; --png chooses the place
    ss = ["sample", "flow3d", "--model", "trellis_ss_tiny", "--cond", str(tokens), "--steps", "2"]
    assert main([*ss, "--out", str(tmp_path / "ss.npz"), "--png", str(tmp_path / "pics" / "ss_voxels.png")]) == 0
    latent = np.load(tmp_path / "ss.npz")["latent"]
    with Image.open(tmp_path / "pics" / "ss_voxels.png") as image:
        picture = np.asarray(image)
    assert picture.shape == (128, 3 * 128 + 2 * 4)  # 16^3 grid, 8 pixels per voxel
    assert np.array_equal(picture, np.asarray(voxel_picture([decode_demo_ss(x) for x in latent])))
    assert len(np.unique(picture)) > 2  # voxels drawn, with depth shading
    assert main([*ss, "--out", str(tmp_path / "quiet.npz"), "--no-png"]) == 0
    assert (tmp_path / "quiet.npz").exists() and not (tmp_path / "quiet.png").exists()
    capsys.readouterr()

    # a released SS model's latent needs TRELLIS's SS decoder: refused in one line, before any loading
    assert main(["sample", "flow3d", "--model", "trellis_ss", "--ckpt", str(tmp_path / "none.safetensors"),
                 "--cond", str(tokens), "--out", str(tmp_path / "big.npz"), "--png", str(tmp_path / "big.png")]) == 2
    assert "TRELLIS's SS decoder" in capsys.readouterr().err

    # an image as the condition, encoded by a local DINOv2-with-registers folder
    render = demo / "renders_cond" / sha / "000.png"
    image_args = ["--model", "trellis_slat_tiny", "--cond", str(render), "--coords", str(xyz), "--steps", "2"]
    assert main(["sample", "flow3d", *image_args, "--out", str(tmp_path / "img.npz")]) == 2
    assert "pass --image-encoder DIR" in capsys.readouterr().err
    assert main(["sample", "flow3d", *image_args, "--image-encoder", str(tiny_dino), "--image-size", "32",
                 "--out", str(tmp_path / "img.npz")]) == 0
    feats = np.load(tmp_path / "img.npz")["feats"]
    assert feats.shape == (len(np.load(xyz)["coords"]), 8) and np.isfinite(feats).all()


# --------------------------------------------------------------------------- lightning-lora encode-cond
def _rendered_root(tmp_path):
    """A demo data root with its condition renders and no condition tokens yet."""
    import shutil

    from lightning_lora.data.trellis import COND_DIR, make_trellis_demo

    root = make_trellis_demo(tmp_path / "root", n=4, resolution=16, cond_dim=64)
    shutil.rmtree(root / COND_DIR)
    return root


def test_encode_cond_writes_the_tokens_training_would_compute(tmp_path, tiny_dino, capsys) -> None:
    import numpy as np

    from lightning_lora.cli import main
    from lightning_lora.data.trellis import COND_DIR, TrellisDataModule, cond_views, read_cond_image, rendered_objects

    root = _rendered_root(tmp_path)
    command = ["encode-cond", str(root), "--image-encoder", str(tiny_dino), "--image-size", "32"]
    assert main([*command, "--dtype", "float32"]) == 0
    assert "encoded 4 objects of tokens [21, 64] (float32), skipped 0" in capsys.readouterr().out
    head = _dino_head(tiny_dino)
    shas = rendered_objects(root)
    for sha in shas:  # the first view, prepared and encoded as data.cond=images does in validation
        view = cond_views(root / "renders_cond" / sha)[0]
        expected = head.encode_images(read_cond_image(view, 32)[None])[0]
        got = torch.from_numpy(np.load(root / COND_DIR / f"{sha}.npz")["tokens"])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    # resumable: what exists is skipped (the encoder is not even loaded), a missing file is written again
    stamps = {p.name: p.stat().st_mtime_ns for p in (root / COND_DIR).iterdir()}
    (root / COND_DIR / f"{shas[0]}.npz").unlink()
    assert main(["encode-cond", str(root), "--image-encoder", str(tmp_path / "nowhere")]) == 2  # needs it now
    assert main(command) == 0
    assert "encoded 1 objects of tokens [21, 64] (float16), skipped 3 already encoded" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (root / COND_DIR).iterdir()}
    assert {n for n in after if after[n] != stamps.get(n)} == {f"{shas[0]}.npz"}
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp")]  # each file was written atomically
    assert main([*command, "--overwrite"]) == 0 and "encoded 4 objects" in capsys.readouterr().out

    data = TrellisDataModule(str(root), kind="slat", resolution=16, val_fraction=0.0, cond="tokens", batch_size=4)
    data.setup("fit")
    assert data.train_dataloader().dataset[0]["cond"].shape == (21, 64)


def test_encode_cond_errors_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    import lightning_lora.heads.flow3d as flow3d
    from lightning_lora.cli import main

    monkeypatch.setattr(flow3d, "ENCODE_COND_PRESET", "trellis_slat_tiny")  # a preset with no image encoder

    assert main(["encode-cond", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"error: encode-cond: no such directory: {tmp_path / 'none'}"
    assert main(["encode-cond", str(tmp_path)]) == 2
    assert "has no metadata.csv" in capsys.readouterr().err
    root = _rendered_root(tmp_path)  # no encoder named and none in the preset: one must be named
    assert main(["encode-cond", str(root)]) == 2
    assert "encode-cond: --image-encoder is required" in capsys.readouterr().err


def test_keep_last_removes_old_snapshots_their_lora_ckpts_and_checkpoints_but_never_final(tmp_path) -> None:
    out = tmp_path / "run"
    common = ["model=trellis_slat_tiny", "data.num_shapes=12", f"paths.cache_dir={tmp_path / 'cache'}",
              "callbacks.adapter_checkpoint.every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.keep_last=2", "validate_before=false", "validate_after=false", "~callbacks.progress_bar",
              "~callbacks.sample_previews", "trainer.precision=32-true"]

    def train(*extra: str) -> None:
        cfg = compose_train([*common, *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        run(cfg)

    def on_disk() -> tuple[list[str], list[str], list[str]]:
        return tuple(sorted(p.name for p in (out / d).iterdir()) for d in ("adapters", "lora_ckpts", "checkpoints"))

    train("trainer.max_steps=4")
    assert on_disk() == (["final", "step_0000003", "step_0000004"],
                         lora_files(3, 4),
                         ["last.ckpt", "step_0000003.ckpt", "step_0000004.ckpt"])
    train("trainer.max_steps=6", "resume=last")  # the resumed run goes on removing what the first one wrote
    assert on_disk() == (["final", "step_0000005", "step_0000006"],
                         lora_files(5, 6),
                         ["last.ckpt", "step_0000005.ckpt", "step_0000006.ckpt"])
    assert (out / "adapters" / "final" / "denoiser" / "adapter_model.safetensors").is_file()
