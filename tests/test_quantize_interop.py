"""Interoperability with the `compressed-tensors` library (a test dependency) and the modelopt layout.

* the library decompresses tessera's exports to exactly the weights tessera's own dequantization gives (FP8 in the
  model dtype; NVFP4 in bfloat16, the dtype the library always decompresses NVFP4 to);
* tessera loads checkpoints written by the library's own compressor, and the weights equal the library's fake
  quantization of the original weights; tessera's min-max quantization of the same weights writes the same bytes;
* the library's modelopt converter turns tessera's modelopt export into tessera's compressed-tensors export.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

import tessera
from helpers import random_model, skip_or_fail, tiny_arch, tiny_tokenizer
from tessera.quantize import quant_layers, quantize_weights
from tessera.quantize.calibrate import quantize_model
from tessera.quantize.export import export

if importlib.util.find_spec("compressed_tensors") is None:
    skip_or_fail("compressed-tensors is not installed (pip install --no-deps compressed-tensors loguru)")

from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam  # noqa: E402


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _model(dtype=torch.float32):
    m = random_model(tiny_arch(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64)).to(dtype)
    m.tokenizer = tiny_tokenizer()
    return m


def _ids():
    return torch.randint(4, 96, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme,dtype", [("fp8-dynamic", torch.float32), ("fp8", torch.bfloat16),
                                          ("nvfp4", torch.bfloat16), ("nvfp4-weight-only", torch.float32)])
def test_library_decompresses_tessera_exports_exactly(tmp_path, scheme, dtype):
    q = quantize_model(_model(dtype), scheme, _ids())
    out = export(q, tmp_path / "q")
    cfg = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (group,) = cfg.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(group.format)
    tensors = _tensors(out)
    back = tessera.load(out)
    assert len(quant_layers(back)) == 14
    for name, layer in quant_layers(q).items():
        local = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        lib = compressor.decompress(local, group)["weight"]
        want = layer.weight if not layer.wargs.fp4 else layer.weight.to(torch.bfloat16)  # NVFP4 -> bf16 in the library
        assert lib.dtype == want.dtype and torch.equal(lib, want), name
        assert torch.equal(back.get_submodule(name).weight, layer.weight)


def _library_checkpoint(parent_dir, out, preset: str):
    """A checkpoint written by compressed-tensors' own compressor from a transformers model, with qparams from the
    library's own scale functions; returns the library's fake-quantized weights by layer name."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32)
    apply_quantization_config(hf, QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                                     ignore=["lm_head"]))
    ref = {}
    for name, mod in hf.named_modules():
        if not hasattr(mod, "quantization_scheme"):
            continue
        w, args = mod.weight.detach(), mod.quantization_scheme.weights
        if args.num_bits == 4:
            g = generate_gparam(w.min(), w.max())
            groups = w.reshape(w.shape[0], -1, 16)
            s, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=g)
            mod.weight_global_scale.data.copy_(g)
            mod.weight_scale.data.copy_(s)
            mod.input_global_scale.data.copy_(generate_gparam(torch.tensor(-3.0), torch.tensor(3.0)))
            ref[name] = fake_quantize(w, s, zp, args, global_scale=g)
        else:
            s, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
            mod.weight_scale.data.copy_(s)
            ref[name] = fake_quantize(w, s, zp, args)
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    hf.save_pretrained(str(out))
    compressor.update_config(str(out))
    return ref


@pytest.mark.parametrize("preset,scheme", [("NVFP4", "nvfp4"), ("FP8_DYNAMIC", "fp8-dynamic")])
def test_tessera_loads_what_the_library_wrote(tmp_path, preset, scheme):
    parent = _model()
    tessera.save(parent, tmp_path / "parent")
    ref = _library_checkpoint(tmp_path / "parent", tmp_path / "lib", preset)
    back = tessera.load(tmp_path / "lib")
    assert back.quantization["scheme"] == scheme and back.quantization["format"] == "compressed-tensors"
    assert set(quant_layers(back)) == set(ref)
    for name, w in ref.items():
        assert torch.equal(back.get_submodule(name).weight, w.float()), name
    if preset == "NVFP4":
        assert back.get_submodule("model.layers.0.mlp.up_proj").input_global_scale.item() == pytest.approx(448 * 6 / 3)
    # tessera's own min-max quantization of the same weights gives the same stored bytes as the library's
    quantize_weights(parent, scheme)
    export_dir = tmp_path / "tessera"
    parent.quantization = {"scheme": scheme}
    export(parent, export_dir)
    ours, theirs = _tensors(export_dir), _tensors(tmp_path / "lib")
    for name in ref:
        for leaf in ("weight_packed", "weight_scale", "weight_global_scale") if preset == "NVFP4" else ("weight",
                                                                                                        "weight_scale"):
            a, b = ours[f"{name}.{leaf}"], theirs[f"{name}.{leaf}"]
            view = (lambda t: t.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else (lambda t: t)
            assert a.dtype == b.dtype and torch.equal(view(a), view(b)), (name, leaf)


def test_library_converts_tessera_modelopt_export_to_tessera_compressed_tensors(tmp_path):
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter

    q = quantize_model(_model(), "nvfp4", _ids())
    ct = _tensors(export(q, tmp_path / "ct"))
    mo = _tensors(export(q, tmp_path / "mo", "modelopt"))
    converted = ModelOptNvfp4Converter(ignore=["lm_head"], targets=["Linear"]).process(dict(mo))
    # the library's converter (1 / weight_scale_2, 1 / input_scale) recovers what tessera reads back
    back = tessera.load(tmp_path / "mo")
    for name, layer in quant_layers(back).items():
        assert torch.equal(converted[f"{name}.weight_packed"], ct[f"{name}.weight_packed"])
        assert torch.equal(converted[f"{name}.weight_global_scale"].reshape(1), layer.weight_global_scale)
        assert torch.equal(converted[f"{name}.input_global_scale"].reshape(1), layer.input_global_scale)
