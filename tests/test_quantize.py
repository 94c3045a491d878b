"""tessera.quantize: exact E4M3 / E2M1 numerics, schemes and their validation, QuantLinear in the model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import mixed_arch, random_model, tiny_arch
from tessera.errors import TesseraError
from tessera.model import Transformer
from tessera.quantize import QuantLinear, fake_quantize_weights, get_scheme, quant_layers, quantize_weights
from tessera.quantize import numerics as nx


# ---------------------------------------------------------------------------- reference formats (from the bit layout)
def e4m3_reference() -> list[tuple[float, int]]:
    """Every finite non-negative E4M3 (fn) value with its code, decoded from the bits by the format definition."""
    out = []
    for code in range(128):
        e, m = code >> 3, code & 7
        if e == 15 and m == 7:
            continue  # NaN (the fn variant has no infinities)
        v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        out.append((v, code))
    return out


def e2m1_reference() -> list[tuple[float, int]]:
    out = []
    for code in range(8):
        e, m = code >> 1, code & 1
        out.append(((m / 2) * 2.0**0 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1), code))
    return out


@pytest.mark.parametrize("fmt", ["e4m3", "e2m1"])
def test_every_representable_value_and_every_tie(fmt):
    ref = e4m3_reference() if fmt == "e4m3" else e2m1_reference()
    rnd = nx.round_e4m3 if fmt == "e4m3" else nx.round_e2m1
    vals = torch.tensor([v for v, _ in ref], dtype=torch.float64)
    assert vals.max().item() == (448.0 if fmt == "e4m3" else 6.0)
    # every representable value (and its negative) is kept exactly
    both = torch.cat([vals, -vals]).float()
    assert torch.equal(rnd(both), both)
    # ties go to the even code; just off a tie goes to the nearer neighbour
    for (lo, clo), (hi, _chi) in zip(ref, ref[1:]):
        mid = (lo + hi) / 2
        even = lo if clo % 2 == 0 else hi
        assert rnd(torch.tensor([mid, -mid], dtype=torch.float32)).tolist() == [even, -even], (lo, hi)
        eps = (hi - lo) / 64
        assert rnd(torch.tensor([mid - eps, mid + eps])).tolist() == [lo, hi]


@pytest.mark.parametrize("fmt,top", [("e4m3", 448.0), ("e2m1", 6.0)])
def test_saturation_edges(fmt, top):
    rnd = nx.round_e4m3 if fmt == "e4m3" else nx.round_e2m1
    big = torch.tensor([top, top * 1.03, top * 1.5, 1e6, 3e38, -top * 1.03, -1e6])
    assert rnd(big).tolist() == [top, top, top, top, top, -top, -top]


def test_e2m1_codes_pack_roundtrip_and_signed_zero():
    x = torch.tensor([[0.0, -0.1, 0.5, -0.5, 6.0, -6.0, 2.5, -3.5]])
    codes = nx.e2m1_codes(x)
    assert codes.tolist() == [[0, 8, 1, 9, 7, 15, 4, 14]]  # -0.1 -> -0 (sign bit kept, as compressed-tensors)
    packed = nx.pack_fp4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 4)
    assert packed[0, 0].item() == (0 | (8 << 4)) and packed[0, 1].item() == (1 | (9 << 4))  # low nibble = even column
    assert torch.equal(nx.unpack_fp4(packed), codes)
    assert nx.e2m1_decode(codes).tolist() == [[0.0, 0.0, 0.5, -0.5, 6.0, -6.0, 2.0, -4.0]]


def test_fp8_qdq_per_channel_exact():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    scale = nx.fp8_scale(nx.amax(w, "channel"))
    assert scale.shape == (8, 1)
    deq = nx.fp8_qdq(w, scale)
    # the row maximum is exactly representable (448 * scale), every value is code * scale
    assert torch.allclose(deq.abs().amax(dim=1, keepdim=True), w.abs().amax(dim=1, keepdim=True), rtol=1e-6)
    assert torch.equal(nx.round_e4m3(deq / scale) * scale, deq)
    assert (deq - w).abs().max() <= w.abs().max() * 2**-4  # E4M3: 3 mantissa bits


def test_nvfp4_scales_and_qdq():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    w[0, :16] = 0.0  # an all-zero group stays zero without dividing by zero
    g = nx.nvfp4_global_scale(nx.amax(w, "tensor"))
    assert g.item() == pytest.approx(448 * 6 / w.abs().max().item())
    scales = nx.nvfp4_group_scales(nx.amax(w, "tensor_group", 16), g)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (4, 4)
    codes = nx.nvfp4_quantize(w, scales, g)
    deq = nx.nvfp4_dequantize(codes, scales, g)
    assert torch.equal(deq[0, :16], torch.zeros(16))
    assert torch.equal(deq, nx.nvfp4_qdq(w, g))
    # each nonzero group's largest code is 6 or close (the E4M3 scale rounding moves it by < 1 step)
    assert torch.equal(deq, nx.e2m1_decode(codes).reshape(4, 4, 16).mul(
        (scales.float() / g)[..., None]).reshape(4, 64))
    assert ((deq - w).abs() <= w.abs().max() / 6 * 1.01).all()  # within half a step of the largest spacing


def test_dynamic_per_token_fp8():
    x = torch.tensor([[[1.0, -2.0, 0.3], [100.0, 1e-3, -7.0]]])
    y = nx.dynamic_token_fp8_qdq(x)
    # each token keeps its own maximum exactly, and small values in a large-range token lose precision
    assert y[0, 0, 1].item() == -2.0 and y[0, 1, 0].item() == 100.0
    s1 = 100.0 / 448
    assert y[0, 1, 1].item() == pytest.approx(nx.round_e4m3(torch.tensor(1e-3 / s1)).item() * s1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_is_one_clear_error(bad):
    m = random_model(tiny_arch())
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(TesseraError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains 1 NaN/inf"):
        quantize_weights(m, "fp8-dynamic")


# ---------------------------------------------------------------------------- schemes
def test_schemes_in_compressed_tensors_vocabulary():
    fp8d = get_scheme("fp8-dynamic").to_config_group()
    assert fp8d["weights"]["strategy"] == "channel" and fp8d["weights"]["type"] == "float"
    assert fp8d["input_activations"]["strategy"] == "token" and fp8d["input_activations"]["dynamic"] is True
    assert fp8d["format"] == "float-quantized"
    nv = get_scheme("nvfp4").to_config_group()
    assert nv["weights"]["num_bits"] == 4 and nv["weights"]["group_size"] == 16
    assert nv["input_activations"]["dynamic"] == "local" and nv["format"] == "nvfp4-pack-quantized"
    assert get_scheme("nvfp4-weight-only").input_activations is None
    assert get_scheme("fp8").needs_calibration and not get_scheme("fp8-dynamic").needs_calibration
    assert get_scheme("fp8").with_options(kv_cache=True).kv_cache.num_bits == 8
    assert get_scheme("fp8").with_options(weight_strategy="channel").weights.strategy == "channel"


def test_validation_is_one_line():
    with pytest.raises(TesseraError, match="unknown quantization scheme 'int3'"):
        get_scheme("int3")
    mixed = random_model(mixed_arch())  # FFN widths 24 and 40: not multiples of 16
    with pytest.raises(TesseraError, match=r"model\.layers\.1\.mlp\.down_proj: input width 24 is not a multiple"):
        quantize_weights(mixed, "nvfp4")
    m = random_model(tiny_arch())
    from dataclasses import replace
    with pytest.raises(TesseraError, match="matches no Linear layer"):
        quantize_weights(m, replace(get_scheme("fp8"), targets=("re:.*cross_attn.*",)))
    with pytest.raises(TesseraError, match="--ignore 'model.layers.9.' matches no layer"):
        quantize_weights(m, get_scheme("fp8-dynamic").with_options(ignore=["model.layers.9."]))


def test_default_targets_and_ignore_on_heterogeneous_child():
    m = random_model(mixed_arch())
    q = quantize_weights(m, get_scheme("fp8-dynamic").with_options(ignore=["model.layers.0."]))
    assert "model.layers.2.self_attn.linear_attn" in q and "model.layers.2.mlp.linear_mlp" in q
    assert "lm_head" not in q and not any(n.startswith("model.layers.0.") for n in q)
    assert isinstance(m, Transformer) and type(m.lm_head) is nn.Linear
    assert isinstance(m.model.layers[1].mlp.down_proj, QuantLinear)
    assert set(quant_layers(m)) == set(q)


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "nvfp4-weight-only", "fp8", "nvfp4"])
def test_quantlinear_forward_is_exact_fake_quantization(scheme):
    m = random_model(tiny_arch())
    lin = m.model.layers[0].mlp.gate_proj
    w = lin.weight.detach().clone()
    quantize_weights(m, scheme)
    q = m.model.layers[0].mlp.gate_proj
    x = torch.randn(2, 5, 32)
    if scheme == "fp8":
        q.input_scale = torch.tensor([0.01])
        xq = nx.fp8_qdq(x, q.input_scale)
    elif scheme == "nvfp4":
        q.input_global_scale = nx.nvfp4_global_scale(x.abs().amax())
        xq = nx.nvfp4_qdq(x, q.input_global_scale)
    elif scheme == "fp8-dynamic":
        xq = nx.dynamic_token_fp8_qdq(x)
    else:
        xq = x
    if scheme.startswith("fp8"):
        wq = nx.fp8_qdq(w, nx.fp8_scale(nx.amax(w, "channel" if scheme == "fp8-dynamic" else "tensor")))
    else:
        wq = nx.nvfp4_qdq(w, nx.nvfp4_global_scale(w.abs().amax()))
    assert torch.equal(q.weight, wq)
    assert torch.allclose(q(x), xq @ wq.T, atol=1e-6, rtol=0)
    assert not torch.equal(q.weight, w)
    assert q.stored_bytes() < w.numel() * 4 / 3


def test_static_activation_needs_calibration():
    m = random_model(tiny_arch())
    quantize_weights(m, "fp8")
    with pytest.raises(TesseraError, match="need a calibrated input scale"):
        m(torch.randint(0, 96, (1, 4)))


def test_mse_observer_lowers_weight_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.StudentT(2.0).sample((16, 64)))  # heavy tails: clipping pays
    sch = get_scheme("nvfp4-weight-only")
    err = {}
    for obs in ("minmax", "mse"):
        q = QuantLinear.from_linear(lin, sch.weights, None, obs)
        err[obs] = (q.weight - lin.weight).pow(2).sum().item()
    assert err["mse"] < err["minmax"]


@pytest.mark.parametrize("scheme", ["nvfp4-weight-only", "fp8-dynamic"])
def test_mse_search_looks_above_the_largest_magnitude_and_never_loses_to_minmax(scheme):
    """The MSE grid reaches past 1x the amax: a scale that E4M3 rounding pulls down (NVFP4 group scales), or that
    puts a row's values badly on the FP8 grid, is moved up when that lowers the error; per group / row the chosen
    amax is never worse than min-max (which is tried first, so ties keep it)."""
    from tessera.quantize.observers import _qdq_with_amax, search_amax

    args = get_scheme(scheme).weights
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    g = nx.nvfp4_global_scale(nx.amax(x, "tensor")) if args.fp4 else None
    a0 = nx.amax(x, args.strategy, args.group_size)
    best = search_amax(x, args, "mse", global_scale=g)

    def err(a):
        e = (_qdq_with_amax(x, a, args, g, torch.float32) - x).pow(2)
        return nx.grouped(e, args.group_size).sum(-1) if args.fp4 else e.sum(-1, keepdim=True)

    assert (err(best) <= err(a0)).all()
    above = best > a0 * 1.001
    assert above.any()  # some groups / rows take an amax above their largest magnitude ...
    assert (err(best)[above] < err(a0)[above]).all()  # ... and only where it strictly lowers their error


def test_quantized_model_still_runs_and_stays_close():
    m = random_model(tiny_arch())
    ids = torch.randint(0, 96, (2, 12))
    ref = m(ids)
    quantize_weights(m, "fp8-dynamic")
    out = m(ids)
    assert not torch.equal(out, ref)
    assert torch.allclose(out, ref, atol=0.15 * ref.abs().max().item())


def test_fake_quantize_weights_for_puzzle_precisions():
    from tessera.puzzle.library import apply_precision

    m = random_model(tiny_arch())
    block = m.model.layers[0]
    w = block.mlp.up_proj.weight.detach().clone()
    apply_precision(block, "nvfp4")
    assert isinstance(block.mlp.up_proj, QuantLinear) and block.mlp.up_proj.aargs is None
    assert torch.equal(block.mlp.up_proj.weight, nx.nvfp4_qdq(w, nx.nvfp4_global_scale(w.abs().amax())))
    blk2 = fake_quantize_weights(random_model(tiny_arch()).model.layers[1], "fp8")
    assert blk2.self_attn.q_proj.aargs.strategy == "token"
    with pytest.raises(TesseraError, match="precision 'int4'"):
        fake_quantize_weights(block, "int4")
