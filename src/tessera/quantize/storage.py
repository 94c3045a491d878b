"""How quantized layers are stored: the compressed-tensors and modelopt checkpoint layouts, both ways.

compressed-tensors (`config.json` `quantization_config`, `quant_method: compressed-tensors`):
* `float-quantized` (FP8): `weight` float8_e4m3fn [out, in], `weight_scale` (model dtype, [1] or [out, 1]),
  `input_scale` (model dtype [1], static activations only);
* `nvfp4-pack-quantized`: `weight_packed` uint8 [out, in/2] (low nibble = even column), `weight_scale`
  float8_e4m3fn [out, in/16], `weight_global_scale` float32 [1] and `input_global_scale` float32 [1], both
  inverted (448 * 6 / amax);
* FP8 KV cache: `self_attn.k_scale` / `self_attn.v_scale` (model dtype [1]) and `kv_cache_scheme`.
modelopt NVFP4 (`hf_quant_config.json`, `quant_method: modelopt`): `weight` uint8 packed, `weight_scale` float8,
`weight_scale_2` = 1 / weight_global_scale and `input_scale` = 1 / input_global_scale (float32 scalars), KV
scales `k_proj.k_scale` / `v_proj.v_scale`. Reading inverts them in float32 exactly as compressed-tensors' own
modelopt converter does (1 / x), so tessera and the library compute the same weights from the same file.

`encode` turns a model holding QuantLinears into (tensors, config additions, extra files); `decode` turns a
checkpoint's tensors back into plain tensors plus the stored form of each quantized layer, which `attach` swaps in
as QuantLinears. Neither imports `tessera.checkpoint` (which calls them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.errors import TesseraError
from tessera.quantize import numerics as nx
from tessera.quantize.modules import QuantLinear, quant_layers, set_module
from tessera.quantize.schemes import FP8_KV, QuantArgs, _matches, scheme_name

FORMATS = ("compressed-tensors", "modelopt")
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes (checked by tests/test_quantize_interop)
MODELOPT_VERSION = "0.37.0"
HF_QUANT_CONFIG = "hf_quant_config.json"


@dataclass
class StoredLayer:
    """One quantized Linear as a checkpoint holds it (compressed-tensors convention: inverted global scales)."""

    weights: QuantArgs
    input_activations: QuantArgs | None
    tensors: dict[str, torch.Tensor]  # weight_q, weight_scale, weight_global_scale, input_scale, input_global_scale
    output_scale: torch.Tensor | None = None  # FP8 KV-cache scale on a k/v projection


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TesseraError(f"quantized checkpoint format {fmt!r}: use one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------- writing
def encode(model: nn.Module, fmt: str = "compressed-tensors") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, `quantization_config` for config.json, extra files) of a model holding QuantLinears."""
    _check_format(fmt)
    qs = quant_layers(model)
    if not qs:
        raise TesseraError("the model has no quantized layers; quantize it first (tessera quantize)")
    groups = _groups(qs)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    arch = getattr(model, "arch", None)
    if arch is not None and arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = model.model.embed_tokens.weight.dtype if hasattr(model, "model") else next(model.parameters()).dtype
    for name, q in qs.items():
        state.pop(f"{name}.weight")
        state.update(stored_tensors(name, q, fmt, dtype))
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in qs)
    kv = any(q.output_scale is not None for q in qs.values())
    return (state, *quantization_config(groups, ignore, kv, fmt))


def stored_tensors(name: str, q: QuantLinear, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of the quantized Linear `name` (full module name): its stored weight and scales, and
    its FP8 KV-cache scale when it has one. `dtype` is the model's (FP8 scales are stored in it)."""
    out = {f"{name}.{k}": v for k, v in _layer_tensors(q, fmt, dtype).items()}
    if q.output_scale is not None:
        parent, _, leaf = name.rpartition(".")
        kind = "k" if leaf == "k_proj" else "v"
        if fmt == "modelopt":
            out[f"{name}.{kind}_scale"] = q.output_scale.float().reshape(())
        else:
            out[f"{parent}.{kind}_scale"] = q.output_scale.to(dtype).reshape(1)
    return out


def quantization_config(groups: dict[tuple[QuantArgs, QuantArgs | None], list[str]], ignore: list[str], kv: bool,
                        fmt: str) -> tuple[dict, dict]:
    """(`quantization_config` for config.json, extra files) of a checkpoint whose quantized layers fall in
    `groups` ((weights, input activations) -> layer names), leaving the Linears `ignore` unquantized, with FP8
    KV-cache scales when `kv`."""
    _check_format(fmt)
    if fmt == "modelopt" and (len(groups) != 1 or not next(iter(groups))[0].fp4):
        raise TesseraError("the modelopt layout is written for NVFP4 (nvfp4 / nvfp4-weight-only) only; export FP8 "
                           "schemes as compressed-tensors")
    if fmt == "compressed-tensors":
        fmt_name = "nvfp4-pack-quantized" if next(iter(groups))[0].fp4 else "float-quantized"
        cfg = {"quant_method": "compressed-tensors", "format": fmt_name, "quantization_status": "compressed",
               "config_groups": {}, "ignore": ignore, "kv_cache_scheme": FP8_KV.to_dict() if kv else None,
               "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
               "version": CT_VERSION}
        for gi, ((w, a), names) in enumerate(groups.items()):
            cfg["config_groups"][f"group_{gi}"] = {
                "targets": ["Linear"] if len(groups) == 1 else sorted(names), "weights": w.to_dict(),
                "input_activations": None if a is None else a.to_dict(), "output_activations": None,
                "format": "nvfp4-pack-quantized" if w.fp4 else "float-quantized"}
        return cfg, {}
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8" if kv else None, "group_size": 16,
             "exclude_modules": ignore}
    hf_quant = {"producer": {"name": "modelopt", "version": MODELOPT_VERSION}, "quantization": quant}
    return {"quant_method": "modelopt", **quant}, {HF_QUANT_CONFIG: json.dumps(hf_quant, indent=2) + "\n"}


def _groups(qs: dict[str, QuantLinear]) -> dict[tuple[QuantArgs, QuantArgs | None], list[str]]:
    groups: dict[tuple[QuantArgs, QuantArgs | None], list[str]] = {}
    for name, q in qs.items():
        groups.setdefault((q.wargs, q.aargs), []).append(name)
    return groups


def _layer_tensors(q: QuantLinear, fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if not q.wargs.fp4:
        out = {"weight": q.weight_q, "weight_scale": q.weight_scale.to(dtype)}
        if q.input_scale is not None:
            out["input_scale"] = q.input_scale.to(dtype).reshape(1)
        return out
    if fmt == "modelopt":
        out = {"weight": q.weight_q, "weight_scale": q.weight_scale,
               "weight_scale_2": (1.0 / q.weight_global_scale).float().reshape(())}
        if q.input_global_scale is not None:
            out["input_scale"] = (1.0 / q.input_global_scale).float().reshape(())
        return out
    out = {"weight_packed": q.weight_q, "weight_scale": q.weight_scale, "weight_global_scale": q.weight_global_scale}
    if q.input_global_scale is not None:
        out["input_global_scale"] = q.input_global_scale.float().reshape(1)
    return out


def layer_bytes(model: nn.Module) -> dict[str, int]:
    """Stored bytes of each quantized layer (weights and scales as written)."""
    return {n: q.stored_bytes() for n, q in quant_layers(model).items()}


# ---------------------------------------------------------------------------- reading
@dataclass
class QuantInfo:
    """A checkpoint's quantization: its format and, per config group, the args and targets."""

    fmt: str
    groups: list[tuple[QuantArgs, QuantArgs | None, list[str]]]
    ignore: list[str]
    kv: bool
    raw: dict

    @property
    def scheme(self) -> str:
        return ", ".join(sorted({scheme_name(w, a) for w, a, _ in self.groups}))


def read_info(path: Path, config: dict[str, Any]) -> QuantInfo | None:
    """The quantization of a checkpoint directory (config.json's `quantization_config`, hf_quant_config.json), or
    None for an unquantized one; an unsupported method or format is one line."""
    qc = config.get("quantization_config")
    hfq = path / HF_QUANT_CONFIG
    if qc is None and not hfq.is_file():
        return None
    method = (qc or {}).get("quant_method", "modelopt" if hfq.is_file() else None)
    if method == "modelopt" or (qc is None and hfq.is_file()):
        q = json.loads(hfq.read_text()).get("quantization", {}) if hfq.is_file() else qc
        algo = q.get("quant_algo")
        if algo != "NVFP4":
            raise TesseraError(f"{path}: modelopt quant_algo {algo!r} is not supported; tessera reads NVFP4")
        w = QuantArgs(4, "float", "tensor_group", group_size=q.get("group_size", 16))
        a = QuantArgs(4, "float", "tensor_group", group_size=q.get("group_size", 16), dynamic="local")
        return QuantInfo("modelopt", [(w, a, ["Linear"])], list(q.get("exclude_modules") or []),
                         q.get("kv_cache_quant_algo") == "FP8", q)
    if method != "compressed-tensors":
        raise TesseraError(f"{path}: quantization method {method!r} is not supported; tessera reads "
                           "compressed-tensors (float-quantized, nvfp4-pack-quantized) and modelopt NVFP4")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise TesseraError(f"{path}: quantization_status {qc.get('quantization_status')!r}: tessera reads "
                           "compressed checkpoints")
    groups = []
    for name, g in (qc.get("config_groups") or {}).items():
        fmt = g.get("format") or qc.get("format")
        if fmt not in ("float-quantized", "nvfp4-pack-quantized"):
            raise TesseraError(f"{path}: config group {name} has format {fmt!r}; tessera reads float-quantized and "
                               "nvfp4-pack-quantized")
        try:
            w = QuantArgs.from_dict(g.get("weights"))
            a = QuantArgs.from_dict(g.get("input_activations"))
        except TypeError as exc:
            raise TesseraError(f"{path}: config group {name}: {exc}") from None
        if w is None:
            raise TesseraError(f"{path}: config group {name} quantizes no weights; tessera reads weight quantization")
        groups.append((w, a, list(g.get("targets") or ["Linear"])))
    return QuantInfo("compressed-tensors", groups, list(qc.get("ignore") or []), qc.get("kv_cache_scheme") is not None,
                     qc)


_CT_KEYS = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "input_scale",
            "weight_zero_point", "input_zero_point")
_MO_KEYS = ("weight_scale", "weight_scale_2", "input_scale")


def decode(state: dict[str, torch.Tensor], info: QuantInfo, linear_names: list[str],
           dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, StoredLayer]]:
    """Split a quantized checkpoint's tensors into plain tensors (a dequantized `weight` stands in for each
    quantized layer, so shapes check as for any checkpoint) and the stored form of each quantized layer."""
    state = dict(state)
    stored: dict[str, StoredLayer] = {}
    for name in linear_names:
        marker = f"{name}.weight_packed" if info.fmt == "compressed-tensors" else f"{name}.weight_scale"
        if marker not in state and f"{name}.weight_scale" not in state:
            continue
        group = next(((w, a) for w, a, targets in info.groups
                      if any(_matches(name, nn.Linear(1, 1), t) for t in targets)), None)
        if group is None:
            raise TesseraError(f"{name} holds quantized tensors but no config group targets it; the checkpoint's "
                               "quantization_config does not match its weights")
        w, a = group
        t: dict[str, torch.Tensor] = {}
        if info.fmt == "modelopt":
            t["weight_q"] = state.pop(f"{name}.weight")
            t["weight_scale"] = state.pop(f"{name}.weight_scale")
            t["weight_global_scale"] = (1 / state.pop(f"{name}.weight_scale_2").float()).reshape(1)
            if f"{name}.input_scale" in state:
                t["input_global_scale"] = (1 / state.pop(f"{name}.input_scale").float()).reshape(1)
        elif w.fp4:
            t["weight_q"] = state.pop(f"{name}.weight_packed")
            t["weight_scale"] = state.pop(f"{name}.weight_scale")
            t["weight_global_scale"] = state.pop(f"{name}.weight_global_scale").float().reshape(1)
            if f"{name}.input_global_scale" in state:
                t["input_global_scale"] = state.pop(f"{name}.input_global_scale").float().reshape(1)
        else:
            t["weight_q"] = state.pop(f"{name}.weight")
            t["weight_scale"] = state.pop(f"{name}.weight_scale")
            if f"{name}.input_scale" in state:
                t["input_scale"] = state.pop(f"{name}.input_scale").reshape(1)
        for zp in ("weight_zero_point", "input_zero_point"):
            z = state.pop(f"{name}.{zp}", None)
            if z is not None and bool(z.float().abs().max() > 0):
                raise TesseraError(f"{name}.{zp} is not zero: asymmetric quantization is not supported")
        layer = StoredLayer(w, a, t)
        state[f"{name}.weight"] = _dequantized(layer).to(dtype)
        stored[name] = layer
    # KV-cache scales
    for name in list(state):
        leaf = name.rpartition(".")[2]
        if leaf in ("k_scale", "v_scale"):
            base = name.rpartition(".")[0]
            proj = f"{base}.{leaf[0]}_proj" if info.fmt == "compressed-tensors" else base
            if proj not in stored:
                raise TesseraError(f"{name}: a KV-cache scale for a projection that is not quantized; tessera keeps "
                                   "KV scales on quantized k/v projections only")
            stored[proj].output_scale = state.pop(name).float().reshape(1)
    leftovers = [n for n in state if n.rpartition(".")[2] in _CT_KEYS + _MO_KEYS]
    if leftovers:
        raise TesseraError(f"{leftovers[0]}: a quantization tensor for a layer the config does not quantize; the "
                           "checkpoint's quantization_config does not match its weights")
    return state, stored


def _dequantized(layer: StoredLayer) -> torch.Tensor:
    t = layer.tensors
    if layer.weights.fp4:
        return nx.nvfp4_dequantize(nx.unpack_fp4(t["weight_q"]), t["weight_scale"], t["weight_global_scale"])
    return nx.fp8_dequantize(t["weight_q"], t["weight_scale"])


def attach(model: nn.Module, stored: dict[str, StoredLayer]) -> None:
    """Swap a QuantLinear holding each stored layer into `model` (in place)."""
    for name, layer in stored.items():
        lin = model.get_submodule(name)
        dtype = lin.weight.dtype
        q = QuantLinear(lin.in_features, lin.out_features, layer.weights, layer.input_activations,
                        bias=lin.bias is not None, device=lin.weight.device, dtype=dtype)
        t = layer.tensors
        if layer.weights.fp4:
            q.set_nvfp4(t["weight_q"], t["weight_scale"], t["weight_global_scale"])
        else:
            q.set_fp8(t["weight_q"], t["weight_scale"].to(dtype))
        q.input_scale = t.get("input_scale")
        q.input_global_scale = t.get("input_global_scale")
        q.output_scale = layer.output_scale
        if lin.bias is not None:
            q.bias.data = lin.bias.data
        set_module(model, name, q)


# ---------------------------------------------------------------------------- checking without loading
def verify(path: Path, info: QuantInfo, arch, index) -> dict[str, Any]:
    """Check a quantized checkpoint's tensor headers (`index`: a `tessera.stream.weights.WeightIndex`) against
    `arch` and its quantization, without loading a tensor; returns the quantization summary and the real bytes of
    each layer."""
    from tessera.model import Transformer
    from tessera.stream.writer import expected_tensors

    with torch.device("meta"):
        model = Transformer(arch)
    expected = expected_tensors(arch)
    if arch.tie_word_embeddings:
        index.tensors.pop("lm_head.weight", None)
    have = index.tensors
    quantized = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or f"{name}.weight_scale" not in have:
            continue
        quantized.append(name)
        out_f, in_f = mod.out_features, mod.in_features
        fp4 = f"{name}.weight_packed" in have or (info.fmt == "modelopt")
        main = f"{name}.weight_packed" if info.fmt == "compressed-tensors" and fp4 else f"{name}.weight"
        expected.pop(f"{name}.weight")
        expected[main] = (out_f, in_f // 2) if fp4 else (out_f, in_f)
        if fp4:
            expected[f"{name}.weight_scale"] = (out_f, in_f // 16)
    for n in list(have):
        leaf = n.rpartition(".")[2]
        if leaf in _CT_KEYS + _MO_KEYS + ("k_scale", "v_scale") and n not in expected:
            expected[n] = tuple(have[n].shape)  # scales: any of the layouts' shapes ([1], [out, 1], [])
    index.check(arch, expected)
    per_layer = [0] * arch.num_layers
    for n, t in have.items():
        if n.startswith("model.layers."):
            per_layer[int(n.split(".")[2])] += t.nbytes
    return {"format": info.fmt, "scheme": info.scheme, "quantized_layers": len(quantized),
            "ignore": info.ignore, "kv_cache": info.kv, "layer_bytes": per_layer,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in have.values()})}
