"""The pure-PyTorch TRELLIS denoisers: sparse ops against dense oracles, TRELLIS key names/shapes, loading, PEFT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import random_coords

from lightning_lora.errors import UserError
from lightning_lora.models.trellis import (
    AbsolutePositionEmbedder,
    ElasticSLatFlowModel,
    MultiHeadAttention,
    SLatFlowModel,
    SparseMultiHeadAttention,
    SparseStructureFlowModel,
    SparseTensor,
    SubMConv3d,
    TimestepEmbedder,
    load_trellis_model,
    save_trellis_model,
    sparse_downsample,
    sparse_upsample,
)
from lightning_lora.models.trellis.sparse_structure_flow import patchify, unpatchify

# tiny tensors gain nothing from threads, and on a busy 2-core box OpenMP waits made this module 10x slower
pytestmark = pytest.mark.usefixtures("one_thread")


# --- tiny configs and helpers -------------------------------------------------------------------------------------

TINY_SS = dict(
    resolution=8,
    in_channels=4,
    model_channels=32,
    cond_channels=24,
    out_channels=4,
    num_blocks=2,
    num_heads=4,
    mlp_ratio=2,
    patch_size=2,
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
)
TINY_SLAT = dict(
    resolution=16,
    in_channels=8,
    model_channels=32,
    cond_channels=24,
    out_channels=8,
    num_blocks=2,
    num_heads=4,
    mlp_ratio=2,
    patch_size=2,
    num_io_res_blocks=2,
    io_block_channels=[16],
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
)
# TRELLIS-image-large (configs/generation/ss_flow_img_dit_L_16l8_fp16.json, slat_flow_img_dit_L_64l8p2_fp16.json).
SS_L = dict(
    resolution=16,
    in_channels=8,
    out_channels=8,
    model_channels=1024,
    cond_channels=1024,
    num_blocks=24,
    num_heads=16,
    mlp_ratio=4,
    patch_size=1,
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
)
SLAT_L = dict(
    resolution=64,
    in_channels=8,
    out_channels=8,
    model_channels=1024,
    cond_channels=1024,
    num_blocks=24,
    num_heads=16,
    mlp_ratio=4,
    patch_size=2,
    num_io_res_blocks=2,
    io_block_channels=[128],
    pe_mode="ape",
    qk_rms_norm=True,
    use_fp16=True,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """TRELLIS zero-inits adaLN, conv2 and the output layer; random weights make every path observable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


def to_dense(coords: torch.Tensor, feats: torch.Tensor, batch: int, res: int) -> torch.Tensor:
    dense = feats.new_zeros(batch, feats.shape[1], res, res, res)
    dense[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]] = feats
    return dense


def tiny_slat_input(batch: int = 2, n: int = 60, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed + 1)
    coords = random_coords(batch, TINY_SLAT["resolution"], n, seed)
    x = SparseTensor(coords, torch.randn(coords.shape[0], 8, generator=g, dtype=dtype), resolution=16)
    t = torch.rand(batch, generator=g, dtype=dtype) * 1000
    cond = torch.randn(batch, 5, 24, generator=g, dtype=dtype)
    return x, t, cond


def tiny_ss_input(batch: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, 8, generator=g, dtype=dtype)
    return x, torch.rand(batch, generator=g, dtype=dtype) * 1000, torch.randn(batch, 5, 24, generator=g, dtype=dtype)


# --- SparseTensor -------------------------------------------------------------------------------------------------


def test_sparse_tensor_layout_and_replace():
    coords = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0], [1, 5, 5, 5], [1, 1, 1, 1], [1, 2, 2, 2]])
    x = SparseTensor(coords, torch.arange(10.0).view(5, 2), resolution=8)
    assert x.batch_size == 2 and x.shape == torch.Size([2, 2])
    assert x.layout == [slice(0, 2), slice(2, 5)]
    assert x.counts.tolist() == [2, 3]
    y = x.replace(torch.ones(5, 3))
    assert y.coords is x.coords and y.cache is x.cache and y.shape == torch.Size([2, 3])
    assert torch.equal(x.broadcast(torch.tensor([[1.0], [2.0]])).squeeze(1), torch.tensor([1.0, 1, 2, 2, 2]))
    assert x.to(dtype=torch.float64).feats.dtype == torch.float64 and x.coords.dtype == torch.long


@pytest.mark.parametrize(
    ("coords", "feats", "match"),
    [
        (torch.tensor([[0, 1, 2, 8]]), torch.zeros(1, 2), r"\[0, 1, 2, 8\].*\[0, 8\)"),
        (torch.tensor([[0, 1, -1, 2]]), torch.zeros(1, 2), r">= 0, got \[0, 1, -1, 2\]"),
        (torch.tensor([[0, 1, 2]]), torch.zeros(1, 2), r"\[N, 4\].*\[1, 3\]"),
        (torch.tensor([[0.0, 1, 2, 3]]), torch.zeros(1, 2), r"integer.*float32"),
        (torch.tensor([[0, 1, 2, 3]]), torch.zeros(2, 2), r"one row per voxel.*\[2, 2\]"),
        (torch.tensor([[1, 1, 2, 3], [0, 1, 2, 3]]), torch.zeros(2, 2), r"sorted by batch.*row 1 has batch 0"),
        (torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]), torch.zeros(2, 2), r"unique.*\[0, 1, 2, 3\]"),
        (torch.tensor([[0, 1, 2, 3], [2, 1, 2, 3]]), torch.zeros(2, 2), r"batch item 1 has no voxels"),
    ],
)
def test_sparse_tensor_rejects_bad_coords(coords, feats, match):
    with pytest.raises(UserError, match=match) as err:
        SparseTensor(coords, feats, resolution=8)
    assert "\n" not in str(err.value)


# --- submanifold convolution --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "res", "n", "cin", "cout"), [(1, 5, 40, 3, 4), (3, 7, 90, 5, 2), (2, 4, 64, 2, 3)])
def test_submanifold_conv_matches_dense_conv3d(batch, res, n, cin, cout):
    coords = random_coords(batch, res, n, seed=res)
    g = torch.Generator().manual_seed(n)
    feats = torch.randn(coords.shape[0], cin, generator=g, dtype=torch.float64)
    conv = SubMConv3d(cin, cout, 3).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    assert conv.weight.shape == (cout, 3, 3, 3, cin)  # spconv KRSC layout, loaded unchanged
    out = conv(SparseTensor(coords, feats, resolution=res)).feats
    dense_w = conv.weight.permute(0, 4, 1, 2, 3)  # [out, in, kx, ky, kz] for conv3d
    ref = F.conv3d(to_dense(coords, feats, batch, res), dense_w, conv.bias, padding=1)
    ref = ref[coords[:, 0], :, coords[:, 1], coords[:, 2], coords[:, 3]]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_submanifold_conv_asymmetric_kernel_orientation():
    # One tap set: output at p reads x at p + (1, 0, -1) (cross-correlation, offsets on x, y, z in that order).
    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 0]])
    conv = SubMConv3d(1, 1, 3, bias=False).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 2, 1, 0, 0] = 1.0
    out = conv(SparseTensor(coords, torch.tensor([[3.0], [7.0]], dtype=torch.float64))).feats
    assert out.squeeze(1).tolist() == [7.0, 0.0]


# --- down/upsample ------------------------------------------------------------------------------------------------


def test_downsample_pools_sum_over_n_plus_one_like_trellis():
    # Cell (0,0,0) holds values 2 and 4 -> (2+4)/3 = 2; cell (1,0,0) holds 5 alone -> 5/2; item 1 has 9 -> 4.5.
    coords = torch.tensor([[0, 3, 1, 0], [0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0]])
    x = SparseTensor(coords, torch.tensor([[5.0], [2.0], [4.0], [9.0]]), resolution=4)
    y = sparse_downsample(x)
    assert y.coords.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]  # sorted by (b, x, y, z)
    assert y.feats.squeeze(1).tolist() == [2.0, 2.5, 4.5]
    assert y.resolution == 2 and y.counts.tolist() == [2, 1]
    z = sparse_upsample(y.replace(y.feats * 10))
    assert torch.equal(z.coords, coords) and z.resolution == 4
    assert z.feats.squeeze(1).tolist() == [25.0, 20.0, 20.0, 45.0]


def test_downsample_matches_torch_scatter_reduce_mean_and_round_trip():
    coords = random_coords(2, 8, 120, seed=3)
    feats = torch.randn(coords.shape[0], 3, dtype=torch.float64)
    x = SparseTensor(coords, feats)
    y = sparse_downsample(x)
    coarse = coords.clone()
    coarse[:, 1:] //= 2
    uniq, idx = torch.unique(coarse, dim=0, return_inverse=True)  # lexicographic (b, x, y, z) order
    ref = torch.scatter_reduce(
        torch.zeros(uniq.shape[0], 3, dtype=torch.float64), 0, idx[:, None].expand(-1, 3), feats, reduce="mean"
    )
    assert torch.equal(y.coords, uniq)
    torch.testing.assert_close(y.feats, ref)
    up = sparse_upsample(y)
    assert torch.equal(up.coords, coords)
    torch.testing.assert_close(up.feats, ref[idx])
    assert up.cache is x.cache  # the fine level's cache (its neighbour map) comes back with the fine coords


def test_upsample_without_downsample_fails():
    x = SparseTensor(torch.tensor([[0, 0, 0, 0]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="sparse_downsample"):
        sparse_upsample(x)


# --- attention ----------------------------------------------------------------------------------------------------


def manual_attention(q, k, v):
    """[L, H, d] reference: softmax(q k^T / sqrt(d)) v per head."""
    w = torch.einsum("lhd,mhd->hlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hlm,mhd->lhd", w.softmax(-1), v)


def test_dense_self_attention_with_qk_rms_norm_matches_formula():
    torch.manual_seed(0)
    attn = randomize_(MultiHeadAttention(16, 4, type="self", qk_rms_norm=True).double())
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    q, k, v = attn.to_qkv(x[0]).view(7, 3, 4, 4).unbind(1)  # [L, 3, H, d], ordered q, k, v
    q = F.normalize(q, dim=-1) * attn.q_rms_norm.gamma * 2.0  # sqrt(d) = 2
    k = F.normalize(k, dim=-1) * attn.k_rms_norm.gamma * 2.0
    ref = attn.to_out(manual_attention(q, k, v).reshape(7, 16))
    torch.testing.assert_close(attn(x)[0], ref)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_sparse_attention_equals_dense_attention_per_item(kind):
    torch.manual_seed(1)
    kwargs = dict(type=kind, qk_rms_norm=True)
    if kind == "cross":
        kwargs["ctx_channels"] = 12
    sparse_attn = randomize_(SparseMultiHeadAttention(16, 4, **kwargs).double())
    dense_attn = MultiHeadAttention(16, 4, **kwargs).double()
    dense_attn.load_state_dict(sparse_attn.state_dict())
    counts = [5, 11, 1]
    coords = torch.cat(
        [random_coords(1, 4, c, seed=c).index_fill_(1, torch.tensor([0]), b) for b, c in enumerate(counts)]
    )
    x = SparseTensor(coords, torch.randn(coords.shape[0], 16, dtype=torch.float64))
    ctx = torch.randn(3, 6, 12, dtype=torch.float64) if kind == "cross" else None
    out = sparse_attn(x, ctx).feats
    for b, rows in enumerate(x.layout):
        ref = dense_attn(x.feats[rows][None], None if ctx is None else ctx[b : b + 1])[0]
        torch.testing.assert_close(out[rows], ref)


# --- embedders ----------------------------------------------------------------------------------------------------


def test_timestep_and_position_embeddings_follow_trellis_formulas():
    emb = TimestepEmbedder.timestep_embedding(torch.tensor([0.0, 500.0]), 256)
    assert emb.shape == (2, 256)
    assert emb[0, :128].tolist() == [1.0] * 128 and emb[0, 128:].tolist() == [0.0] * 128  # cos first
    assert emb[1, 1].item() == pytest.approx(math.cos(500 * math.exp(-math.log(1e4) / 128)), rel=1e-5)
    pe = AbsolutePositionEmbedder(1024, 3)(torch.tensor([[1, 2, 3]]))
    assert pe.shape == (1, 1024) and pe[0, 1020:].tolist() == [0.0] * 4  # 3 * 2 * 170 = 1020, zero-padded
    f1 = 1 / 10000 ** (1 / 170)
    assert pe[0, 0].item() == pytest.approx(math.sin(1.0)) and pe[0, 170].item() == pytest.approx(math.cos(1.0))
    assert pe[0, 341].item() == pytest.approx(math.sin(2 * f1), rel=1e-5)  # y axis starts at 340
    assert pe[0, 680 + 170].item() == pytest.approx(math.cos(3.0), rel=1e-5)


def test_patchify_order_and_inverse():
    x = torch.arange(2 * 3 * 4 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 24, 2, 2, 2)
    # channel c*8 + (i*2 + j)*2 + k at patch (X, Y, Z) holds x[c, 2X+i, 2Y+j, 2Z+k]
    assert p[1, 2 * 8 + 5, 1, 0, 1] == x[1, 2, 3, 0, 3]
    assert torch.equal(unpatchify(p, 2), x)


# --- models -------------------------------------------------------------------------------------------------------


def test_ss_model_shapes_and_batch_independence():
    model = randomize_(SparseStructureFlowModel(**TINY_SS)).double()
    x, t, cond = tiny_ss_input(dtype=torch.float64)
    y = model(x, t, cond)
    assert y.shape == x.shape and y.abs().sum() > 0
    torch.testing.assert_close(model(x[1:], t[1:], cond[1:]), y[1:])
    assert model.pos_emb.shape == (64, 32)


def test_slat_model_batch_independence_and_coordinates_preserved():
    # Every sparse op must keep items apart (conv neighbours, pooling, padded attention).
    model = randomize_(SLatFlowModel(**TINY_SLAT)).double()
    x, t, cond = tiny_slat_input(batch=3, dtype=torch.float64)
    y = model(x, t, cond)
    assert torch.equal(y.coords, x.coords) and y.feats.shape == (x.coords.shape[0], 8)
    rows = x.layout[1]
    single = SparseTensor(x.coords[rows].clone().index_fill_(1, torch.tensor([0]), 0), x.feats[rows])
    torch.testing.assert_close(model(single, t[1:2], cond[1:2]).feats, y.feats[rows])


def test_gradient_checkpointing_gives_same_gradients():
    x, t, cond = tiny_slat_input()
    grads = []
    for use_ckpt in (False, True):
        model = randomize_(ElasticSLatFlowModel(**{**TINY_SLAT, "use_checkpoint": use_ckpt}))
        model(x, t, cond).feats.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    model = ElasticSLatFlowModel(**TINY_SLAT)
    with model.with_mem_ratio(0.5) as ratio:
        assert [b.use_checkpoint for b in model.blocks] == [True, True] and ratio == 0.5
    assert [b.use_checkpoint for b in model.blocks] == [False, False]


def test_share_mod_moves_modulation_to_model_level():
    model = randomize_(SparseStructureFlowModel(**{**TINY_SS, "share_mod": True}))
    keys = set(model.state_dict())
    assert "adaLN_modulation.1.weight" in keys and not any(k.startswith("blocks.0.adaLN") for k in keys)
    x, t, cond = tiny_ss_input()
    assert model(x, t, cond).shape == x.shape


def test_convert_to_fp16_casts_block_linears_only():
    model = SLatFlowModel(**TINY_SLAT)
    assert model.dtype == torch.float32  # use_fp16=True is recorded, weights stay fp32 (autocast instead)
    model.convert_to_fp16()
    assert model.blocks[0].self_attn.to_qkv.weight.dtype == torch.float16
    assert model.input_blocks[0].conv1.conv.weight.dtype == torch.float16
    assert model.blocks[0].norm2.weight.dtype == torch.float32 and model.input_layer.weight.dtype == torch.float32
    model.convert_to_fp32()
    assert model.dtype == torch.float32


def test_models_reject_bad_inputs_with_the_value_named():
    ss = SparseStructureFlowModel(**TINY_SS)
    x, t, cond = tiny_ss_input()
    with pytest.raises(UserError, match=r"\[2, 4, 8, 8, 8\].*got \[2, 4, 8, 8, 9\]"):
        ss(torch.zeros(2, 4, 8, 8, 9), t, cond)
    with pytest.raises(UserError, match=r"cond must have shape \[2, L, 24\], got \[2, 5, 7\]"):
        ss(x, t, torch.zeros(2, 5, 7))
    with pytest.raises(UserError, match=r"t must have shape \[2\].*got \[3\]"):
        ss(x, torch.zeros(3), cond)
    slat = SLatFlowModel(**TINY_SLAT)
    xs, ts, cs = tiny_slat_input()
    far = SparseTensor(torch.tensor([[0, 16, 0, 0], [1, 0, 0, 0]]), torch.zeros(2, 8))
    with pytest.raises(UserError, match=r"\[0, 16, 0, 0\].*\[0, 16\)"):
        slat(far, ts, cs)
    with pytest.raises(UserError, match=r"\[N, 8\], got \[120, 3\]"):
        slat(xs.replace(torch.zeros(120, 3)), ts, cs)
    with pytest.raises(UserError, match="pe_mode='rope'.*valid: 'ape'"):
        SLatFlowModel(**{**TINY_SLAT, "pe_mode": "rope"})
    with pytest.raises(UserError, match=r"io_block_channels=\[16, 8\]"):
        SLatFlowModel(**{**TINY_SLAT, "io_block_channels": [16, 8]})


# --- checkpoints --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("cls", [SparseStructureFlowModel, SLatFlowModel, ElasticSLatFlowModel])
def test_checkpoint_round_trip_is_strict_and_exact(tmp_path, fmt, cls):
    args = TINY_SS if cls is SparseStructureFlowModel else TINY_SLAT
    model = randomize_(cls(**args), seed=7).eval()
    weights = save_trellis_model(model, tmp_path / "denoiser", fmt=fmt)
    assert weights.name == f"denoiser.{fmt}" and (tmp_path / "denoiser.json").is_file()
    loaded = load_trellis_model(tmp_path / "denoiser" if fmt == "safetensors" else weights).eval()
    assert type(loaded) is cls and loaded.config == model.config
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    x, t, cond = tiny_ss_input() if cls is SparseStructureFlowModel else tiny_slat_input()
    with torch.no_grad():
        a, b = model(x, t, cond), loaded(x, t, cond)
    a, b = (a, b) if cls is SparseStructureFlowModel else (a.feats, b.feats)
    assert a.abs().sum() > 0 and torch.equal(a, b)


def test_fp16_safetensors_checkpoint_loads_as_fp32(tmp_path):
    from safetensors.torch import save_file

    model = randomize_(SparseStructureFlowModel(**TINY_SS))
    save_trellis_model(model, tmp_path / "m")
    save_file({k: v.half() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    loaded = load_trellis_model(tmp_path / "m.json")
    assert loaded.out_layer.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.out_layer.weight, model.out_layer.weight.half().float())


def test_load_errors_are_one_line_user_errors(tmp_path):
    model = SLatFlowModel(**TINY_SLAT)
    save_trellis_model(model, tmp_path / "ok")

    def check(path, match):
        with pytest.raises(UserError, match=match) as err:
            load_trellis_model(path)
        assert "\n" not in str(err.value)

    check(tmp_path / "missing", r"not found: .*missing\.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    (tmp_path / "bad.json").write_text((tmp_path / "ok.json").read_text())
    check(tmp_path / "bad", r"cannot read checkpoint .*bad\.safetensors")
    (tmp_path / "bad2.pt").write_bytes(b"not a pickle")
    check(tmp_path / "bad2.pt", r"model config not found: .*bad2\.json")
    (tmp_path / "bad2.json").write_text((tmp_path / "ok.json").read_text())
    check(tmp_path / "bad2.pt", r"cannot read checkpoint .*bad2\.pt: UnpicklingError")
    torch.save([torch.zeros(1)], tmp_path / "bad2.pt")
    check(tmp_path / "bad2.pt", r"bad2\.pt is not a flat state dict")
    (tmp_path / "ok2.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes())
    (tmp_path / "ok2.json").write_text('{"name": "SLatVAE", "args": {}}')
    check(
        tmp_path / "ok2",
        r"unknown TRELLIS model name 'SLatVAE'; valid: SparseStructureFlowModel, SLatFlowModel, "
        r"ElasticSLatFlowModel",
    )
    (tmp_path / "ok2.json").write_text('{"name": "SLatFlowModel", "args": {"resolution": 64, "widths": 3}}')
    check(tmp_path / "ok2", r"bad args for SLatFlowModel: TypeError: .*'widths'")
    (tmp_path / "ok2.json").write_text("{not json")
    check(tmp_path / "ok2", r"cannot read model config .*ok2\.json")


def test_load_names_the_first_mismatched_missing_or_unexpected_key(tmp_path):
    save_trellis_model(SLatFlowModel(**{**TINY_SLAT, "model_channels": 48}), tmp_path / "wide")
    save_trellis_model(SLatFlowModel(**TINY_SLAT), tmp_path / "ok")
    (tmp_path / "wide.json").write_text((tmp_path / "ok.json").read_text())  # config of the smaller model
    with pytest.raises(
        UserError,
        match=r"'t_embedder\.mlp\.0\.weight' has shape \[48, 256\] in the checkpoint, "
        r"\[32, 256\] in the model",
    ):
        load_trellis_model(tmp_path / "wide")
    sd = SLatFlowModel(**TINY_SLAT).state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"}
    torch.save(missing, tmp_path / "ok.pt")
    with pytest.raises(UserError, match=r"missing key 'blocks\.1\.norm2\.bias'"):
        load_trellis_model(tmp_path / "ok.pt")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "ok.pt")
    with pytest.raises(UserError, match=r"unexpected key 'extra\.weight'"):
        load_trellis_model(tmp_path / "ok.pt")
    # SS checkpoint into an SLat class: the first model key it lacks is named
    save_trellis_model(SparseStructureFlowModel(**TINY_SS), tmp_path / "ss")
    with pytest.raises(UserError, match=r"SLatFlowModel: missing key 'input_layer\.weight'|SLatFlowModel: .*shape"):
        load_trellis_model(tmp_path / "ss.safetensors", config=tmp_path / "ok.json")


# --- released L configs on the meta device ------------------------------------------------------------------------


def dit_block_params(c: int, cond: int, heads: int, mlp: int = 4) -> int:
    """Per block, from the notes' key list: adaLN, norm2, to_qkv, q/k gamma, to_out, to_q, to_kv, to_out, mlp."""
    return (
        (c * 6 * c + 6 * c)
        + 2 * c
        + (c * 3 * c + 3 * c)
        + 2 * c
        + (c * c + c)
        + (c * c + c)
        + (cond * 2 * c + 2 * c)
        + (c * c + c)
        + (c * mlp * c + mlp * c)
        + (mlp * c * c + c)
    )


def test_released_ss_config_has_trellis_keys_and_shapes():
    with torch.device("meta"):
        model = SparseStructureFlowModel(**SS_L)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "pos_emb": (4096, 1024),
        "t_embedder.mlp.0.weight": (1024, 256),
        "t_embedder.mlp.2.weight": (1024, 1024),
        "input_layer.weight": (1024, 8),
        "input_layer.bias": (1024,),
        "blocks.0.adaLN_modulation.1.weight": (6144, 1024),
        "blocks.0.norm2.weight": (1024,),
        "blocks.0.norm2.bias": (1024,),
        "blocks.0.self_attn.to_qkv.weight": (3072, 1024),
        "blocks.0.self_attn.q_rms_norm.gamma": (16, 64),
        "blocks.0.self_attn.k_rms_norm.gamma": (16, 64),
        "blocks.0.self_attn.to_out.weight": (1024, 1024),
        "blocks.0.cross_attn.to_q.weight": (1024, 1024),
        "blocks.0.cross_attn.to_kv.weight": (2048, 1024),
        "blocks.0.cross_attn.to_out.bias": (1024,),
        "blocks.0.mlp.mlp.0.weight": (4096, 1024),
        "blocks.0.mlp.mlp.2.weight": (1024, 4096),
        "blocks.23.mlp.mlp.2.bias": (1024,),
        "out_layer.weight": (8, 1024),
        "out_layer.bias": (8,),
    }
    assert {k: sd.get(k) for k in expected} == expected
    assert "blocks.24.norm2.weight" not in sd and not any("cross_attn.q_rms_norm" in k for k in sd)
    assert not any(k.startswith(("blocks.0.norm1", "blocks.0.norm3")) for k in sd)  # non-affine norms
    n_params = sum(p.numel() for p in model.parameters())
    head = (256 * 1024 + 1024) + (1024 * 1024 + 1024) + (8 * 1024 + 1024) + (1024 * 8 + 8)
    assert n_params == head + 24 * dit_block_params(1024, 1024, 16) == 555_543_560
    assert len(sd) == 1 + 4 + 4 + 24 * 20


def test_released_slat_config_has_trellis_keys_and_shapes():
    with torch.device("meta"):
        model = ElasticSLatFlowModel(**SLAT_L)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "input_layer.weight": (128, 8),
        "input_blocks.0.norm1.weight": (128,),
        "input_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 128),
        "input_blocks.0.conv2.conv.bias": (128,),
        "input_blocks.0.emb_layers.1.weight": (256, 1024),
        "input_blocks.1.conv1.conv.weight": (1024, 3, 3, 3, 128),
        "input_blocks.1.conv2.conv.weight": (1024, 3, 3, 3, 1024),
        "input_blocks.1.skip_connection.weight": (1024, 128),
        "input_blocks.1.emb_layers.1.weight": (2048, 1024),
        "blocks.0.self_attn.to_qkv.weight": (3072, 1024),
        "blocks.0.self_attn.q_rms_norm.gamma": (16, 64),
        "blocks.0.cross_attn.to_kv.weight": (2048, 1024),
        "blocks.0.adaLN_modulation.1.bias": (6144,),
        "out_blocks.0.norm1.weight": (2048,),
        "out_blocks.0.conv1.conv.weight": (128, 3, 3, 3, 2048),
        "out_blocks.0.skip_connection.weight": (128, 2048),
        "out_blocks.1.conv1.conv.weight": (128, 3, 3, 3, 256),
        "out_blocks.1.skip_connection.weight": (128, 256),
        "out_layer.weight": (8, 128),
        "t_embedder.mlp.0.weight": (1024, 256),
    }
    assert {k: sd.get(k) for k in expected} == expected
    assert "pos_emb" not in sd and "input_blocks.0.skip_connection.weight" not in sd
    assert "input_blocks.2.norm1.weight" not in sd and "out_blocks.2.norm1.weight" not in sd

    def res_block(cin: int, cout: int) -> int:  # norm1 + conv1 + conv2 + emb_layers + skip
        skip = cin * cout + cout if cin != cout else 0
        return 2 * cin + (27 * cin * cout + cout) + (27 * cout * cout + cout) + (1024 * 2 * cout + 2 * cout) + skip

    io = res_block(128, 128) + res_block(128, 1024) + res_block(2048, 128) + res_block(256, 128)
    head = (256 * 1024 + 1024) + (1024 * 1024 + 1024) + (8 * 128 + 128) + (128 * 8 + 8)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == head + io + 24 * dit_block_params(1024, 1024, 16) == 600_432_520


# --- PEFT ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SparseStructureFlowModel, ElasticSLatFlowModel])
def test_peft_lora_on_attention_projections_trains(cls):
    from peft import LoraConfig, get_peft_model

    model = randomize_(cls(**(TINY_SS if cls is SparseStructureFlowModel else TINY_SLAT)))
    targets = ["to_q", "to_kv", "to_out", "to_qkv"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 5 * 2  # 2 blocks x (to_qkv, to_out, to_q, to_kv, to_out) x (A, B)
    assert all(p.requires_grad for p in lora.values())
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    x, t, cond = tiny_ss_input() if cls is SparseStructureFlowModel else tiny_slat_input()
    out = peft_model(x, t, cond)
    (out if cls is SparseStructureFlowModel else out.feats).square().mean().backward()
    for name, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "base_model.model.blocks.0.self_attn.to_qkv.lora_A.default.weight" in dict(peft_model.named_parameters())


def test_bf16_autocast_runs_close_to_fp32():
    model = randomize_(SLatFlowModel(**TINY_SLAT), seed=3)
    x, t, cond = tiny_slat_input()
    with torch.no_grad():
        ref = model(x, t, cond).feats
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, cond).feats
    assert model.input_layer.weight.dtype == torch.float32
    rel = (out.float() - ref).norm() / ref.norm()
    assert 0 < rel < 0.1
