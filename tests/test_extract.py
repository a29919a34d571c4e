"""SVD extraction, combination, merging and LoRA file formats (the algorithms behind the CLI)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import low_rank, net_pair, net_with
from peft import PeftModel

from lightning_lora.adapters import load_lora_weights
from lightning_lora.adapters.combine import combine_concat, combine_svd, merge_into
from lightning_lora.adapters.extract import extract_lora, parse_rank, select_modules
from lightning_lora.adapters.factors import Factors
from lightning_lora.adapters.formats import (
    kohya_name,
    lora_config_for,
    read_lora,
    resolve_modules,
    write_diffusers,
    write_kohya,
    write_lora_file,
    write_peft_dir,
)
from lightning_lora.adapters.svd import factorize
from lightning_lora.errors import UserError

# one intra-op thread: on a busy 2-core machine torch's multi-threaded SVD can be 100x slower
pytestmark = pytest.mark.usefixtures("one_thread")


def _decaying(out: int, inn: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """A delta with a decaying spectrum plus a flat noise tail (the hard case for randomized SVD)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inn)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inn, k, generator=g))
    s = torch.logspace(0, -2, k)
    return (u * s) @ v.T + noise * torch.randn(out, inn, generator=g) / math.sqrt(inn)


def _optimum(delta: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    return float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())


# ---------------------------------------------------------------------------- factorize
@pytest.mark.parametrize("shape", [(24, 40), (24, 16, 1, 1), (24, 8, 3, 3)], ids=["linear", "conv1x1", "conv3x3"])
@pytest.mark.parametrize("method", ["full", "randomized"])
def test_exact_low_rank_delta_is_reconstructed(shape, method):
    delta = low_rank(shape, 5)
    f, info = factorize(delta, 5, method=method)
    assert f.down.shape == (5, *shape[1:])
    assert f.up.shape == (shape[0], 5, *([1] * (len(shape) - 2)))
    assert f.alpha == 5 and f.scale == 1.0
    err = float((f.delta() - delta).abs().max())
    assert err <= 1e-5 * float(delta.abs().max())
    assert info.rel_error < 1e-5 and info.energy == pytest.approx(1.0, abs=1e-5)
    # singular values are split symmetrically: both factors carry the same energy
    assert float(f.up.square().sum()) == pytest.approx(float(f.down.square().sum()), rel=1e-4)


@pytest.mark.parametrize("method", ["full", "randomized"])
@pytest.mark.parametrize(("shape", "r"), [((320, 320), 32), ((256, 128 * 9), 16), ((640, 320), 8)])
def test_truncated_error_is_the_eckart_young_optimum(method, shape, r):
    torch.manual_seed(0)  # svd_lowrank draws its sketch from the global generator
    delta = _decaying(shape[0], math.prod(shape[1:]), seed=r)
    f, info = factorize(delta.reshape(shape[0], -1), r, method=method, randomized_min_dim=128)
    achieved = float((f.delta() - delta).norm() / delta.norm())
    best = _optimum(delta, r)
    assert best > 0.01  # a real truncation
    assert best * (1 - 1e-4) <= achieved <= 1.01 * best
    assert info.rel_error == pytest.approx(achieved, rel=1e-3)
    if method == "randomized":  # the sketch itself is good enough here: no fallback to the full SVD
        assert info.method == "randomized"
        assert 0.99 * best <= info.optimum <= 1.001 * best  # the cheap estimate of the optimum is close


def test_randomized_falls_back_to_full_svd_when_the_sketch_is_poor():
    delta = _decaying(300, 300, seed=3, noise=0.5)
    f, info = factorize(delta, 40, method="randomized", max_steps=1, randomized_min_dim=128)
    assert info.method == "full (fallback)"
    assert float((f.delta() - delta).norm() / delta.norm()) == pytest.approx(_optimum(delta, 40), rel=1e-4)


def test_rank_is_capped_and_alpha_is_the_used_rank():
    f, info = factorize(low_rank((6, 20), 6), 32)
    assert f.rank == 6 and info.rank == 6 and f.alpha == 6.0
    f, _ = factorize(low_rank((16, 2, 3, 3), 4), 64)  # conv: cap at min(out, in·kh·kw) = 16 ... 18 -> 16
    assert f.rank == 16 and f.alpha == 16.0
    f, _ = factorize(low_rank((10, 12), 3), None)  # full rank keeps every singular value
    assert f.rank == 10


def test_clamp_quantile_bounds_factors_and_is_off_by_default():
    delta = _decaying(64, 64, seed=1)
    plain, _ = factorize(delta, 8)
    clamped, info = factorize(delta, 8, clamp_quantile=0.9)
    values = torch.cat([plain.up.flatten(), plain.down.flatten()]).abs().sort().values
    hi = float(values[math.ceil(0.9 * values.numel()) - 1])  # the 90% quantile (upper value, no interpolation)
    clamped_values = torch.cat([clamped.up.flatten(), clamped.down.flatten()]).abs()
    assert float(clamped_values.max()) == pytest.approx(hi, rel=1e-6)
    assert int((clamped_values >= hi * (1 - 1e-6)).sum()) >= 0.1 * values.numel() - 1  # the top 10% were clamped
    assert info.rel_error > _optimum(delta, 8) * 1.001  # clamping costs accuracy


@pytest.mark.parametrize("value", ["0", "-3", "abc", "2.5", ""])
def test_parse_rank_rejects(value):
    with pytest.raises(UserError, match="--rank"):
        parse_rank(value)


def test_parse_rank_accepts():
    assert parse_rank("full") is None and parse_rank("16") == 16 and parse_rank(8) == 8


def test_select_modules_globs_and_substrings():
    names = ["down.attn1.to_q", "down.attn2.to_k", "up.conv"]
    assert select_modules(names, ["attn1"]) == ["down.attn1.to_q"]
    assert select_modules(names, ["*.to_?", "up*"]) == names


# ---------------------------------------------------------------------------- whole models and loading
def test_extracted_file_loads_with_load_lora_weights_and_reproduces_outputs(tmp_path):
    base, tuned = net_pair()
    tuned["norm.weight"] = base["norm.weight"]
    result = extract_lora(base, tuned, rank=6, conv_rank=4, min_diff=1e-3)
    assert set(result.factors) == {"proj", "block.conv", "block.pw"}  # block.proj is unchanged
    assert {m: f.rank for m, f in result.factors.items()} == {"proj": 3, "block.conv": 4, "block.pw": 6}
    path = write_lora_file(tmp_path / "x.safetensors", result.factors, all_modules=["proj", "block.proj",
                                                                                    "block.conv", "block.pw"])
    peft_model = load_lora_weights(net_with(base), path)
    assert isinstance(peft_model, PeftModel)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        want, got = net_with(tuned)(x), peft_model(x)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # only the three changed layers got LoRA (not block.proj, whose name ends like 'proj')
    lora_layers = sorted(n for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    assert len(lora_layers) == 3 and not any("block.proj" in n for n in lora_layers)
    loaded = read_lora(path)
    assert {m: (f.rank, f.alpha) for m, f in loaded.modules.items()} == {
        "proj": (3, 3.0), "block.conv": (4, 4.0), "block.pw": (6, 6.0)}


def test_peft_dir_output_loads(tmp_path):
    base, tuned = net_pair()
    tuned["norm.weight"] = base["norm.weight"]
    factors = extract_lora(base, tuned, rank=6, conv_rank=4).factors
    d = write_peft_dir(tmp_path / "peft", factors, all_modules=["proj", "block.proj", "block.conv", "block.pw"])
    peft_model = PeftModel.from_pretrained(net_with(base), str(d))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(peft_model(x), net_with(tuned)(x), atol=1e-5)
    assert read_lora(d).format == "peft"


def test_lora_config_uses_plain_names_when_unambiguous():
    f = Factors(torch.zeros(2, 4), torch.zeros(3, 2))
    g = Factors(torch.zeros(5, 4), torch.zeros(3, 5))
    config = lora_config_for({"a.q": f, "a.k": f, "b.v": g}, all_modules=["a.q", "a.k", "b.v", "c.w"])
    assert sorted(config.target_modules) == ["a.k", "a.q", "b.v"]
    assert config.r == 2 and config.lora_alpha == 2
    assert list(config.rank_pattern.values()) == [5] and list(config.alpha_pattern.values()) == [5]


# ---------------------------------------------------------------------------- combine and merge
def _random_factors(shapes: dict[str, tuple[int, ...]], r: int, scale: float, seed: int) -> dict[str, Factors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        extra = (1,) * (len(shape) - 2)
        out[name] = Factors(torch.randn(r, *shape[1:], generator=g), torch.randn(shape[0], r, *extra, generator=g),
                            scale)
    return out


SHAPES = {"a": (12, 10), "b": (8, 4, 3, 3)}


def test_concat_equals_applying_both_adapters():
    la = _random_factors(SHAPES, 3, scale=2.0, seed=0)  # alpha/r = 2
    lb = _random_factors({"a": SHAPES["a"]}, 5, scale=0.25, seed=1)
    combined = combine_concat([(la, 0.7), (lb, -1.5)])
    assert combined["a"].rank == 8 and combined["a"].scale == 1.0 and combined["b"].rank == 3
    for name, shape in SHAPES.items():
        w = torch.randn(shape)
        parts = [(la[name], 0.7)] + ([(lb[name], -1.5)] if name in lb else [])
        want = merge_into(w, parts)
        got = merge_into(w, [(combined[name], 1.0)])
        assert torch.allclose(got, want, atol=1e-4)
        direct = w + 0.7 * 2.0 * (la[name].up.reshape(shape[0], 3) @ la[name].down.reshape(3, -1)).reshape(shape)
        if name in lb:
            direct += -1.5 * 0.25 * (lb[name].up @ lb[name].down)
        assert torch.allclose(want, direct, atol=1e-4)


def test_combine_svd_exact_at_summed_rank_and_optimal_below():
    la = _random_factors(SHAPES, 3, 1.0, 0)
    lb = _random_factors(SHAPES, 2, 0.5, 1)
    exact = {n: 0.3 * la[n].delta() + 0.9 * lb[n].delta() for n in SHAPES}
    full = combine_svd([(la, 0.3), (lb, 0.9)], None)
    for n in SHAPES:
        assert full[n].rank == 5
        assert torch.allclose(full[n].delta(), exact[n], atol=1e-4)
    low = combine_svd([(la, 0.3), (lb, 0.9)], 2)
    for n in SHAPES:
        err = float((low[n].delta() - exact[n]).norm() / exact[n].norm())
        assert err == pytest.approx(_optimum(exact[n], 2), rel=1e-3)


def test_combine_refuses_different_shapes():
    with pytest.raises(UserError, match="module 'a' has shape"):
        combine_concat([(_random_factors({"a": (4, 4)}, 2, 1.0, 0), 1.0), (_random_factors({"a": (4, 5)}, 2, 1, 1), 1)])


def test_merge_of_full_rank_extraction_gives_tuned():
    base, tuned = net_pair()
    factors = extract_lora(base, tuned, rank=None, min_diff=0).factors
    for name, f in factors.items():
        key = f"{name}.weight"
        assert torch.allclose(merge_into(base[key], [(f, 1.0)]), tuned[key], atol=1e-5)


# ---------------------------------------------------------------------------- other formats
def test_kohya_and_diffusers_round_trip(tmp_path):
    factors = _random_factors({"down_blocks.0.attn1.to_q": (8, 6), "conv_in": (8, 4, 3, 3)}, 2, 0.5, 0)
    k = read_lora(write_kohya(tmp_path / "k.safetensors", factors))
    assert k.format == "kohya" and set(k.modules) == {"lora_unet_down_blocks_0_attn1_to_q", "lora_unet_conv_in"}
    assert kohya_name("text_encoder.layers.0.q") == "lora_te_layers_0_q"
    names = resolve_modules(k.modules, ["conv_in", "down_blocks.0.attn1.to_q", "down_blocks.0.attn1.to_k"])
    assert names == {"lora_unet_down_blocks_0_attn1_to_q": "down_blocks.0.attn1.to_q", "lora_unet_conv_in": "conv_in"}
    for kname, name in names.items():
        assert torch.allclose(k.modules[kname].delta(), factors[name].delta())
    d = read_lora(write_diffusers(tmp_path / "d.safetensors", factors))
    assert d.format == "diffusers" and set(d.modules) == {"unet.down_blocks.0.attn1.to_q", "unet.conv_in"}
    assert torch.allclose(d.modules["unet.conv_in"].delta(), factors["conv_in"].delta())  # scale folded into B
    with pytest.raises(UserError, match="'lora_unet_conv_in' is not a layer"):
        resolve_modules(k.modules, ["down_blocks.0.attn1.to_q"])


def test_plain_target_names_with_rank_patterns_load_in_peft(tmp_path):
    """No suffix ambiguity (TRELLIS-style names): a plain target list; capped ranks go to rank_pattern."""
    from tiny import TinyDenoiser, tiny_batch

    torch.manual_seed(0)
    plain = TinyDenoiser().eval()
    base = {k: v.clone() for k, v in plain.state_dict().items()}
    tuned = {k: v + (0.05 * torch.randn_like(v) if v.ndim == 2 else 0) for k, v in base.items()}
    result = extract_lora(base, tuned, rank=None, min_diff=0)
    assert {f.rank for f in result.factors.values()} == {4, 16}  # inp/out capped at 4
    path = write_lora_file(tmp_path / "t.safetensors", result.factors, all_modules=list(result.factors))
    assert {m: f.rank for m, f in read_lora(path).modules.items()}["inp"] == 4
    from lightning_lora.adapters.io import read_adapter_file

    cfg = read_adapter_file(path)[0][""]
    assert isinstance(cfg.target_modules, (set, list)) and "blocks.0.self_attn.to_qkv" in cfg.target_modules
    assert cfg.r == 16 and cfg.rank_pattern == {"inp": 4, "out": 4} and cfg.alpha_pattern == {"inp": 4, "out": 4}
    tuned_model = TinyDenoiser().eval()
    tuned_model.load_state_dict(tuned)
    b = tiny_batch()
    with torch.no_grad():
        got = load_lora_weights(plain, path)(b["x"], b["context"])
        want = tuned_model(b["x"], b["context"])
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------- the randomized method's certificate
def _power_law(out: int, inn: int, exponent: float, seed: int = 0) -> torch.Tensor:
    """A full-rank delta with singular values σᵢ = i^-exponent (slowly falling, as fine-tuning deltas' do)."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inn)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inn, k, generator=g, dtype=torch.float64))
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -exponent
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("exponent", [0.5, 0.75, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("shape", [(256, 384), (384, 256), (160, 16, 3, 3)], ids=["wide", "tall", "conv3x3"])
def test_randomized_is_certified_within_one_percent_on_power_law_spectra(exponent, shape):
    delta = _power_law(shape[0], math.prod(shape[1:]), exponent, seed=int(10 * exponent)).reshape(shape)
    f, info = factorize(delta, 16, method="randomized", randomized_min_dim=128)
    assert info.method == "randomized"  # kept: the certificate holds without the full SVD
    best = _optimum(delta, 16)
    achieved = float((f.delta().double() - delta.double()).norm() / delta.double().norm())
    assert achieved <= 1.01 * best
    assert info.rel_error == pytest.approx(achieved, rel=1e-4)
    assert info.optimum <= best * (1 + 1e-6)  # the certified lower bound is below the true optimum ...
    assert info.rel_error <= 1.01 * info.optimum  # ... and the error is within 1% of that bound


def test_max_error_ratio_is_the_contract_and_a_flat_spectrum_falls_back():
    """Equal singular values leave no gap: no sketch can be certified, so the module gets the full SVD."""
    g = torch.Generator().manual_seed(0)
    flat, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    _, info = factorize(flat, 16, method="randomized", randomized_min_dim=128)
    assert info.method == "full (fallback)"
    assert info.rel_error == pytest.approx(math.sqrt(240 / 256), rel=1e-5) == info.optimum
    # a ratio of exactly 1 certifies nothing but an exact fit: every module of a real spectrum falls back
    delta = _power_law(256, 256, 1.0)
    small = {"method": "randomized", "randomized_min_dim": 128}
    assert factorize(delta, 16, max_error_ratio=1.0, **small)[1].method == "full (fallback)"
    assert factorize(delta, 16, max_error_ratio=1.02, **small)[1].method == "randomized"


@pytest.mark.parametrize("value", [0.99, float("nan"), float("inf"), -1.0])
def test_max_error_ratio_is_checked(value):
    with pytest.raises(UserError, match=r"--max-error-ratio=.* must be a finite number >= 1"):
        factorize(torch.zeros(4, 4), 2, method="randomized", max_error_ratio=value)
    with pytest.raises(UserError, match="--max-error-ratio"):
        extract_lora({"a.weight": torch.zeros(4, 4)}, {"a.weight": torch.ones(4, 4)}, max_error_ratio=value)


def test_residual_norm_bounds_are_upper_bounds_that_tighten():
    """Every probabilistic bound on ‖(I − VVᵀ)ΔW‖₂² holds, the power steps tighten it, and it ends within 2× of the
    truth, on slowly and quickly falling spectra."""
    from lightning_lora.adapters.svd import _ResidualProbes

    for exponent in (0.25, 0.5, 1.0):
        delta = _power_law(200, 300, exponent, seed=3)
        g = torch.Generator().manual_seed(1)
        basis = torch.linalg.qr(delta @ torch.randn(300, 40, generator=g)).Q
        truth = float(torch.linalg.matrix_norm((delta - basis @ (basis.mT @ delta)).double(), ord=2)) ** 2
        steps = list(_ResidualProbes(delta @ torch.randn(300, 32, generator=g)).bounds(delta, basis))
        bounds = [upper for upper, _ in steps]
        assert len(steps) == 4 and all(upper >= truth for upper in bounds)
        assert bounds == sorted(bounds, reverse=True) and bounds[-1] <= 2 * truth
        assert all(truth * 0.9 <= estimate <= upper for upper, estimate in steps)


def test_chi2_lower_quantile_is_below_the_true_quantile():
    chi2 = pytest.importorskip("scipy.stats").chi2  # scipy comes with the [demo] extra (scikit-learn)
    from lightning_lora.adapters.svd import _chi2_lower

    for dof, prob in ((16, 1e-12), (32, 1e-12), (32, 1e-3), (4, 0.01)):
        x = _chi2_lower(dof, prob)
        assert chi2.cdf(x, dof) <= prob  # a valid quantile ...
        assert x >= 0.5 * chi2.ppf(prob, dof)  # ... and not a uselessly small one


def test_sq_norm_matches_float64_on_a_large_tensor():
    from lightning_lora.adapters.svd import sq_norm

    x = torch.randn(3_000_007, generator=torch.Generator().manual_seed(0)) * 1e-3  # not a multiple of the row size
    assert sq_norm(x) == pytest.approx(float(x.double().square().sum()), rel=1e-8)


def test_small_modules_get_the_full_svd_by_default():
    """Below 400 on the smaller side the full SVD is as fast as a Krylov space half that wide."""
    delta = _power_law(320, 768, 0.75)
    assert factorize(delta, 32, method="randomized")[1].method == "full"
    assert factorize(delta, 32, method="randomized", randomized_min_dim=128)[1].method == "randomized"


@pytest.mark.parametrize("value", ["0.5", "nan"])
def test_cli_max_error_ratio_is_one_line_before_any_weight_is_read(tmp_path, capsys, value):
    from helpers import assert_one_error_line

    from lightning_lora.cli import main as cli_main

    rc = cli_main(["extract", "--base", str(tmp_path / "missing_base.safetensors"), "--tuned",
                   str(tmp_path / "missing_tuned.safetensors"), "--out", str(tmp_path / "x.safetensors"),
                   "--max-error-ratio", value])
    assert_one_error_line(rc, capsys.readouterr().err, f"--max-error-ratio={float(value)!r}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("delta_rank", "rank"), [(8, 16), (40, 32), (60, 32)])
def test_randomized_on_exactly_low_rank_deltas(delta_rank, rank):
    """A delta of rank ≤ the block fills the Krylov space at once (the next block is rounding noise); one of a
    little more is exact after a step or two: both are kept, at the optimum, with the right error."""
    delta = low_rank((300, 450), delta_rank, seed=delta_rank)
    f, info = factorize(delta, rank, method="randomized", randomized_min_dim=128)
    assert info.method == "randomized"
    best = _optimum(delta, rank)
    achieved = float((f.delta().double() - delta.double()).norm() / delta.double().norm())
    assert achieved <= 1.01 * best + 1e-6 and info.rel_error == pytest.approx(achieved, abs=1e-5)


def test_a_block_narrower_than_the_rank_still_certifies():
    delta = _power_law(300, 450, 0.75, seed=4)
    _, info = factorize(delta, 32, method="randomized", block=8, randomized_min_dim=128)
    assert info.method == "randomized" and info.rel_error <= 1.01 * _optimum(delta, 32)


def test_extract_lora_from_python_names_mismatched_pairs_before_reading_weights() -> None:
    """Mappings of different keys or shapes get one line naming them, not a KeyError or torch's broadcast error."""
    base = {"a.weight": torch.zeros(4, 6), "b.weight": torch.zeros(3, 3)}
    shapes = r"^base and tuned differ in shape for 1 tensors: a.weight \[4, 6\] vs \[6, 4\]"
    with pytest.raises(UserError, match=shapes):
        extract_lora(base, {"a.weight": torch.ones(6, 4), "b.weight": torch.ones(3, 3)}, rank=2)
    with pytest.raises(UserError, match=r"^base and tuned have different keys: 1 only in base, e.g. b.weight"):
        extract_lora(base, {"a.weight": torch.ones(4, 6)}, rank=2)
    assert set(extract_lora(base, {k: v + 1 for k, v in base.items()}, rank=2).factors) == {"a", "b"}


def test_extraction_holds_one_read_weight_at_a_time() -> None:
    """Each read of a checkpoint is a copy out of the file: the delta is made from the tuned weight, then the base
    one, so the extraction's peak is the delta buffer plus one weight, not two (and no earlier read is kept)."""
    import weakref

    from lightning_lora.adapters.extract import _MappingSource

    handed: list[weakref.ref] = []
    alive_at_read: list[int] = []

    class Reads(_MappingSource):  # a checkpoint that hands out a fresh copy per read, as safetensors' get_tensor does
        def get(self, key: str) -> torch.Tensor:
            alive_at_read.append(sum(ref() is not None for ref in handed))
            out = self.tensors[key].clone()
            handed.append(weakref.ref(out))
            return out

    base = {"a.weight": torch.randn(8, 6), "b.weight": torch.randn(5, 5)}
    tuned = {k: v + low_rank(tuple(v.shape), 2, seed=i) for i, (k, v) in enumerate(base.items())}
    result = extract_lora(Reads(base), Reads(tuned), rank=2)
    assert len(alive_at_read) == 4 and max(alive_at_read) == 0
    assert set(result.factors) == {"a", "b"} and max(r.rel_error for r in result.results) < 1e-5


def test_incremental_rayleigh_ritz_equals_the_direct_one():
    """Growing VᵀP, PᵀP and VᵀV block by block gives the Ritz values and the residuals' Gram matrix that the direct
    (P − V·T) computation gives, on a float32 basis (orthonormal only to rounding), and ``reset`` starts afresh."""
    from lightning_lora.adapters.svd import _next_block, _RayleighRitz

    delta = _power_law(200, 300, 0.5, seed=5)
    g = torch.Generator().manual_seed(2)
    blocks = [torch.linalg.qr(delta @ torch.randn(300, 16, generator=g)).Q]
    images: list[torch.Tensor] = []
    rr = _RayleighRitz()
    for _ in range(4):
        images.append(delta @ (delta.mT @ blocks[-1]))
        basis, image = torch.cat(blocks, dim=1), torch.cat(images, dim=1)
        theta, vecs, gram = rr(basis, image)
        v, p = basis.double(), image.double()
        t = (v.mT @ p + p.mT @ v) / 2
        direct_theta, direct_vecs = torch.linalg.eigh(t)
        resid = (p - v @ t) @ direct_vecs.flip(1)
        scale = float(direct_theta[-1]) ** 2
        assert torch.allclose(theta, direct_theta.flip(0).clamp_min(0), rtol=0, atol=1e-12 * scale ** 0.5)
        overlap = (vecs.mT @ direct_vecs.flip(1)).abs()  # the same Ritz vectors, up to sign
        assert torch.allclose(overlap, torch.eye(overlap.shape[0], dtype=overlap.dtype), atol=1e-6)
        # the Gram matrix in each one's own eigenvector signs: compare |entries| and the diagonal
        assert torch.allclose(gram.abs(), (resid.mT @ resid).abs(), rtol=0, atol=1e-11 * scale)
        assert float(gram.diagonal().min()) > 0
        blocks.append(_next_block(images[-1], basis))
    rr.reset()
    first = rr(blocks[0], delta @ (delta.mT @ blocks[0]))
    assert first[0].shape == (16,)


def test_residual_probes_carry_their_power_steps_to_a_wider_basis():
    """Probes that took two steps on a narrower basis go on on a wider one: the projected iterate gives a bound with no
    new pass, every bound stays above the wider basis' true ‖R‖₂², and one more step is tighter than a fresh start's
    first step (so the steps on the narrower basis were not lost)."""
    import itertools

    from lightning_lora.adapters.svd import _ResidualProbes

    for exponent in (0.25, 0.5, 1.0):
        delta = _power_law(300, 600, exponent, seed=3)
        g = torch.Generator().manual_seed(1)
        basis = torch.linalg.qr(delta @ torch.randn(600, 40, generator=g)).Q
        for _ in range(2):
            basis = torch.linalg.qr(torch.cat([basis, delta @ (delta.mT @ basis[:, -40:])], 1)).Q
        narrow, wide = basis[:, :80], basis
        truth = float(torch.linalg.matrix_norm((delta - wide @ (wide.mT @ delta)).double(), ord=2)) ** 2
        start = delta @ torch.randn(600, 32, generator=g)
        probes = _ResidualProbes(start)
        assert len(list(itertools.islice(probes.bounds(delta, narrow), 2))) == 2 and probes.steps == 2
        carried = list(probes.bounds(delta, wide))
        fresh = list(_ResidualProbes(start).bounds(delta, wide))
        assert len(carried) == 5 and probes.steps == 6  # the free bound, then four steps
        assert all(upper >= truth for upper, _ in carried + fresh)
        assert carried[1][0] < fresh[0][0] and carried[-1][0] <= 2 * truth
