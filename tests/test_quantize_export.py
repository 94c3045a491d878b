"""tessera.quantize calibration, export (compressed-tensors, modelopt), loading back, CLI, inspect."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import tessera
from helpers import cli, mixed_arch, random_model, tiny_arch, tiny_tokenizer
from tessera.errors import TesseraError
from tessera.quantize import QuantLinear, get_scheme, quant_layers
from tessera.quantize import numerics as nx
from tessera.quantize.calibrate import CalibrationConfig, calibrate, quantize_model
from tessera.quantize.export import export


def _ids(n=6, t=16, seed=0):
    return torch.randint(4, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def _tensors(path):
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


@pytest.fixture
def model():
    m = random_model(tiny_arch(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64))
    m.tokenizer = tiny_tokenizer()
    return m


def test_calibration_observes_one_layer_at_a_time_and_matches_direct_amax(model):
    ids = _ids()
    stats = calibrate(model, "fp8", ids, batch_size=4)
    # the input of layer 1's down_proj, computed directly from a whole forward pass
    seen = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    model(ids)
    h.remove()
    assert torch.equal(stats["model.layers.1.mlp.down_proj"].inputs.amax, seen["x"].abs().amax().reshape(1))
    assert len(stats) == 14  # 7 Linears x 2 layers, lm_head ignored


def test_quantize_model_static_fp8_is_a_copy_with_calibrated_scales(model):
    ids = _ids()
    q = quantize_model(model, "fp8", ids)
    assert not quant_layers(model) and len(quant_layers(q)) == 14
    lin = q.model.layers[0].self_attn.q_proj
    stats = calibrate(model, "fp8", ids)
    assert torch.equal(lin.input_scale, nx.fp8_scale(stats["model.layers.0.self_attn.q_proj"].inputs.amax))
    assert q.provenance[-1]["stage"] == "quantize" and q.quantization["scheme"] == "fp8"
    assert q(ids).shape == model(ids).shape


def test_nan_in_calibration_activations_is_one_clear_error(model):
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(TesseraError, match="calibration activations at model.layers.0.self_attn.q_proj contains"):
        quantize_model(model, "nvfp4", _ids())


def test_needs_calibration_refused_without_data(model):
    with pytest.raises(TesseraError, match="needs calibration text"):
        quantize_model(model, "fp8", None)
    q = quantize_model(model, "fp8-dynamic", None)  # dynamic: no calibration needed
    assert q.quantization["calibration"] is None


@pytest.mark.parametrize("scheme", ["fp8", "fp8-dynamic", "nvfp4", "nvfp4-weight-only"])
def test_compressed_tensors_export_roundtrip(model, tmp_path, scheme):
    ids = _ids()
    q = quantize_model(model, get_scheme(scheme).with_options(kv_cache=scheme == "fp8"), ids)
    out = export(q, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
    assert cfg["format"] == ("nvfp4-pack-quantized" if scheme.startswith("nvfp4") else "float-quantized")
    assert cfg["ignore"] == ["lm_head"]
    t = _tensors(out)
    name = "model.layers.1.mlp.down_proj"
    if scheme.startswith("nvfp4"):
        assert t[f"{name}.weight_packed"].dtype == torch.uint8 and t[f"{name}.weight_packed"].shape == (32, 32)
        assert t[f"{name}.weight_scale"].dtype == torch.float8_e4m3fn and t[f"{name}.weight_scale"].shape == (32, 4)
        g = t[f"{name}.weight_global_scale"]
        amax = model.get_submodule(name).weight.abs().max().item()
        assert g.dtype == torch.float32 and g.item() == pytest.approx(448 * 6 / amax)
        assert (f"{name}.input_global_scale" in t) == (scheme == "nvfp4")
    else:
        assert t[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert t[f"{name}.weight_scale"].shape == ((1,) if scheme == "fp8" else (32, 1))
        assert (f"{name}.input_scale" in t) == (scheme == "fp8")
    if scheme == "fp8":
        assert cfg["kv_cache_scheme"]["num_bits"] == 8 and "model.layers.0.self_attn.k_scale" in t
    back = tessera.load(out)
    assert len(quant_layers(back)) == 14
    for n, m in quant_layers(q).items():
        b = back.get_submodule(n)
        assert torch.equal(b.weight, m.weight), n
        for k in QuantLinear.STORED:
            a, c = getattr(m, k), getattr(b, k)
            assert (a is None) == (c is None), (n, k)
            if a is not None:
                assert torch.equal(a.float().reshape(-1), c.float().reshape(-1)), (n, k)
    assert torch.equal(back(ids), q(ids))
    # save again: byte-identical tensors
    export(back, tmp_path / "q2")
    t2 = _tensors(tmp_path / "q2")
    assert t.keys() == t2.keys() and all(torch.equal(t[k].view(torch.uint8) if t[k].dtype == torch.float8_e4m3fn
                                                     else t[k], t2[k].view(torch.uint8) if t2[k].dtype ==
                                                     torch.float8_e4m3fn else t2[k]) for k in t)


def test_modelopt_roundtrip(model, tmp_path):
    ids = _ids()
    q = quantize_model(model, get_scheme("nvfp4").with_options(kv_cache=True), ids)
    out = export(q, tmp_path / "mo", "modelopt")
    hfq = json.loads((out / "hf_quant_config.json").read_text())
    assert hfq["producer"]["name"] == "modelopt" and hfq["quantization"]["quant_algo"] == "NVFP4"
    assert hfq["quantization"]["group_size"] == 16 and hfq["quantization"]["exclude_modules"] == ["lm_head"]
    assert hfq["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    t = _tensors(out)
    name = "model.layers.0.mlp.up_proj"
    ql = q.get_submodule(name)
    assert t[f"{name}.weight"].dtype == torch.uint8 and torch.equal(t[f"{name}.weight"], ql.weight_q)
    assert t[f"{name}.weight_scale_2"].shape == () and t[f"{name}.weight_scale_2"].item() == pytest.approx(
        1 / ql.weight_global_scale.item(), rel=1e-6)
    assert t[f"{name}.input_scale"].item() == pytest.approx(1 / ql.input_global_scale.item(), rel=1e-6)
    assert "model.layers.0.self_attn.k_proj.k_scale" in t
    back = tessera.load(out)
    b = back.get_submodule(name)
    # modelopt's own dequantization: codes * weight_scale * weight_scale_2, equal to tessera's up to float rounding
    mo = nx.e2m1_decode(nx.unpack_fp4(t[f"{name}.weight"])).reshape(64, 2, 16) * (
        t[f"{name}.weight_scale"].float() * t[f"{name}.weight_scale_2"])[..., None]
    assert torch.allclose(b.weight, mo.reshape(64, 32), rtol=1e-6, atol=0)
    assert torch.allclose(back(ids), q(ids), atol=1e-4)
    export(back, tmp_path / "mo2", "modelopt")
    t2 = _tensors(tmp_path / "mo2")
    assert torch.equal(t2[f"{name}.weight"], t[f"{name}.weight"])
    assert torch.equal(t2[f"{name}.weight_scale"].view(torch.uint8), t[f"{name}.weight_scale"].view(torch.uint8))


def test_modelopt_refuses_fp8(model, tmp_path):
    q = quantize_model(model, "fp8-dynamic")
    with pytest.raises(TesseraError, match="modelopt holds NVFP4 only"):
        export(q, tmp_path / "x", "modelopt")


def test_heterogeneous_child_stays_nemotron_nas(tmp_path):
    m = random_model(mixed_arch(hidden=32))
    m.tokenizer = tiny_tokenizer()
    q = quantize_model(m, "fp8-dynamic")
    out = export(q, tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas"
    back = tessera.load(out)
    assert back.arch == m.arch
    assert isinstance(back.model.layers[2].self_attn.linear_attn, QuantLinear)
    ids = _ids(2, 8)
    assert torch.equal(back(ids), q(ids))


def test_gptq_lowers_output_error(model):
    ids = _ids(8, 16)
    ref = model(ids)
    errs = {}
    for gptq in (False, True):
        q = quantize_model(model, "nvfp4-weight-only", ids, config=CalibrationConfig(gptq=gptq))
        errs[gptq] = (q(ids) - ref).pow(2).mean().item()
    assert errs[True] < errs[False]


def test_cli_quantize_inspect_and_eval_commands(model, tmp_path, shared_dir):
    src = tmp_path / "parent"
    tessera.save(model, src)
    out = tmp_path / "q"
    r = cli("quantize", src, "--scheme", "nvfp4", "--out", out, "--calib-samples", 4, "--calib-seq-len", 16,
            "--observer", "mse", "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output)
    assert payload["scheme"] == "nvfp4" and payload["calibration"]["split"] == "calibration"
    assert payload["calibration"]["chunks"] == 4 and payload["observer"] == "mse"
    r = cli("inspect", out, "--json")
    info = json.loads(r.output)
    qinfo = info["weights"]["quantization"]
    assert qinfo["scheme"] == "nvfp4" and qinfo["quantized_layers"] == 14
    per_layer = [row["stored_bytes"] for row in info["layers"]]
    # 2 x (q,k,v,o: 32x32 ... ) packed: half a byte per weight + E4M3 scales per 16 + scales, plus 2 norms (fp32)
    params = sum(32 * 32 for _ in range(2)) + 2 * 32 * 16 * 2 + 3 * 32 * 64
    assert per_layer[0] == per_layer[1] and per_layer[0] < params  # fewer bytes than parameters
    r = cli("inspect", out)
    assert "quantization: nvfp4 (compressed-tensors), 14 Linear layers quantized" in r.output
    r = cli("kld", src, out, "--seq-len", 16, "--max-tokens", 128, "--json", "--stream", "off")
    assert r.exit_code == 0 and json.loads(r.output)["kld"] > 0
    r = cli("quantize", src, "--scheme", "int2", "--out", tmp_path / "bad")
    assert r.exit_code == 2 and "unknown quantization scheme 'int2'" in r.output
    r = cli("quantize", src, "--scheme", "fp8", "--out", out)
    assert r.exit_code == 2 and "--force" in r.output


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "nvfp4"])
def test_gptq_act_order_keeps_the_layout_and_lowers_output_error(scheme):
    """Act-order GPTQ: same scales as without it (each column under its own group's scale), the permutation is
    undone (a diagonal Hessian gives round-to-nearest in any order), and on a layer whose inputs differ in scale
    (a few high-energy channels, correlated with the rest) the held-out output error is lower than in-order GPTQ."""
    from tessera.quantize.gptq import gptq_weight

    args = get_scheme(scheme).weights
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    mix = torch.randn(64, 64, generator=gen) * 0.3 + torch.eye(64)
    gain = torch.ones(64)
    gain[torch.randperm(64, generator=gen)[:8]] = 8.0
    x = (torch.randn(2048, 64, generator=gen) @ mix) * gain
    xc, xh = x[:1024], x[1024:]

    def dq(res):
        return nx.nvfp4_dequantize(*res) if args.fp4 else nx.fp8_dequantize(*res)

    diag = torch.diag(torch.linspace(1.0, 3.0, 64).flip(0)[torch.randperm(64, generator=gen)])
    rtn = gptq_weight(w, diag * 1e6, args, act_order=False, dampening=0.0)
    for ao in (False, True):
        res = gptq_weight(w, diag * 1e6, args, act_order=ao, dampening=0.0)
        assert torch.equal(dq(res), dq(rtn)) and all(torch.equal(a.float(), b.float()) for a, b in zip(res[1:], rtn[1:]))
    h = xc.T @ xc
    plain, ordered = gptq_weight(w, h, args, act_order=False), gptq_weight(w, h, args, act_order=True)
    for a, b in zip(plain[1:], ordered[1:]):  # scales (and NVFP4's global scale) do not depend on the order
        assert torch.equal(a.float(), b.float())
    err = {k: (xh @ (dq(r) - w).T).pow(2).sum().item() for k, r in (("plain", plain), ("ordered", ordered))}
    assert err["ordered"] < err["plain"], err


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "nvfp4"])
def test_sequential_gptq_calibrates_each_layer_on_the_quantized_layers_before_it(model, scheme):
    """`gptq_sequential`: layer 0 sees the same inputs either way, so it is quantized identically; layer 1's
    Hessian comes from the outputs of the *quantized* layer 0, so its weights are the GPTQ of the original weights
    under that Hessian (checked on q_proj, whose input is the block's input) and differ from the one-pass result."""
    from tessera.quantize.gptq import gptq_weight

    ids = _ids(8, 16)
    one = quantize_model(model, scheme, ids, config=CalibrationConfig(gptq=True, batch_size=3))
    seq = quantize_model(model, scheme, ids, config=CalibrationConfig(gptq=True, gptq_sequential=True, batch_size=3))
    q1, qs = quant_layers(one), quant_layers(seq)
    assert q1.keys() == qs.keys() and seq.quantization["config"]["gptq_sequential"] is True
    for name in q1:
        if name.startswith("model.layers.0."):
            assert torch.equal(q1[name].weight, qs[name].weight), name
    layer1 = [n for n in q1 if n.startswith("model.layers.1.")]
    assert any(not torch.equal(q1[n].weight, qs[n].weight) for n in layer1)
    name = "model.layers.1.self_attn.q_proj"
    rows = []
    hook = qs[name].register_forward_pre_hook(lambda _m, a: rows.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        for b in range(0, 8, 3):
            seq(ids[b:b + 3])
    hook.remove()
    x = torch.cat(rows)
    args = get_scheme(scheme).weights
    res = gptq_weight(dict(model.named_modules())[name].weight, x.T @ x, args, act_order=True)
    expect = nx.nvfp4_dequantize(*res) if args.fp4 else nx.fp8_dequantize(*res)
    assert torch.allclose(qs[name].weight.float(), expect, rtol=0, atol=1e-6)
    out = seq(ids[:2])
    assert torch.isfinite(out).all() and not torch.equal(out, one(ids[:2]))
