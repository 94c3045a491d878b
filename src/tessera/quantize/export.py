"""Writing a quantized model: `export(model, out, fmt)` (compressed-tensors or modelopt NVFP4).

A quantized model (one holding QuantLinears, from `quantize_model` or loaded from a quantized checkpoint) is
written in its stored form by `tessera.checkpoint.save`, which calls `tessera.quantize.storage.encode`; this is
that save with the format named, and checks that the format can hold the scheme before any work. Loading back is
`tessera.load(out)`: a nemotron-nas child stays nemotron-nas, its quantized layers come back as QuantLinears.

`quantize_to_dir(model, scheme, calib, out)` is the quantization stage and the export in one, one decoder layer at a
time, for a parent streamed from its shards (`tessera.stream`, an 8B parent on a small machine): each layer is read
once, calibrated (when the scheme or GPTQ needs it), quantized and written, and the shards fill as the layers come,
so memory holds the resident tensors, one layer (with its statistics) and one shard. The directory is byte for byte
what `export(quantize_model(...))` writes for the same model, except the seconds in the provenance record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tessera.checkpoint import MAX_SHARD_BYTES, save
from tessera.errors import TesseraError
from tessera.model import Transformer
from tessera.quantize.modules import QuantLinear, quant_layers
from tessera.quantize.storage import FORMATS, quantization_config, stored_tensors


def check_format(scheme_name: str, fmt: str) -> None:
    """One line when `fmt` cannot hold `scheme_name` (modelopt is written for NVFP4 only)."""
    if fmt not in FORMATS:
        raise TesseraError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "modelopt" and not scheme_name.startswith("nvfp4"):
        raise TesseraError(f"--format modelopt holds NVFP4 only; export {scheme_name} as compressed-tensors")


def export(model: Transformer, out: str | os.PathLike, fmt: str = "compressed-tensors", *,
           force: bool = False) -> Path:
    """Write a quantized model to `out` in `fmt` (atomic; refuses to overwrite without force)."""
    if not quant_layers(model):
        raise TesseraError("the model has no quantized layers; quantize it first (tessera.quantize.quantize_model)")
    check_format(getattr(model, "quantization", {}).get("scheme", "nvfp4"), fmt)
    return save(model, out, force=force, quant_format=fmt)


def quantize_to_dir(model: Transformer, scheme, calib=None, out: str | os.PathLike = "", *,
                    fmt: str = "compressed-tensors", config=None, force: bool = False,
                    progress: Callable[[int, int], None] | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Quantize `model` (streamed or loaded whole) to `scheme` and write it to `out` in `fmt`, one decoder layer at
    a time (see the module doc); `calib` and `config` as for `tessera.quantize.calibrate.quantize_model`. Returns
    the provenance record (what `quantize_model` puts in `model.quantization`). Atomic; refuses to overwrite
    without force."""
    from tessera.checkpoint import ShardWriter, _natural_key, write_model_files
    from tessera.io import atomic_dir, refuse_overwrite
    from tessera.quantize import get_scheme
    from tessera.quantize.calibrate import (
        CalibrationConfig,
        apply_layer_stats,
        calibrate,
        check_quantizable,
        quantize_record,
    )
    from tessera.quantize.gptq import gptq_linear
    from tessera.stream.executor import layer

    cfg = config or CalibrationConfig()
    scheme = get_scheme(scheme)
    check_format(scheme.name, fmt)
    refuse_overwrite(Path(out), force, "output directory")
    observer = cfg.observer or scheme.observer
    targets = check_quantizable(model, scheme, cfg, calib)
    if cfg.gptq and cfg.gptq_sequential:
        raise TesseraError("sequential GPTQ runs on a model loaded whole; quantize this parent with --stream off "
                           "or without gptq_sequential")
    outside = [n for n in targets if not n.startswith("model.layers.")]
    if outside:
        raise TesseraError(f"{outside[0]} is outside the decoder layers; --ignore it (a streamed quantization "
                           "quantizes decoder layers)")
    by_layer: dict[int, list[str]] = {}
    for name in targets:
        by_layer.setdefault(int(name.split(".")[2]), []).append(name)
    dtype = model.model.embed_tokens.weight.dtype
    calibrated = calib is not None and (scheme.needs_calibration or cfg.gptq)
    kv = False
    resident = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                if not k.startswith("model.layers.")}
    if model.arch.tie_word_embeddings:
        resident.pop("lm_head.weight", None)
    t0 = time.perf_counter()
    with atomic_dir(out, force=force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        last = ""

        def add(tensors: dict[str, torch.Tensor]) -> None:
            nonlocal last
            for name in sorted(tensors, key=_natural_key):  # tessera.save's order, checked as it goes
                if last and _natural_key(name) <= _natural_key(last):
                    raise RuntimeError(f"streamed quantization: {name} after {last} breaks tessera.save's order")
                writer.add(name, tensors[name])
                last = name

        def finish(i: int, block: nn.Module, stats: dict) -> None:
            nonlocal kv
            prefix = f"model.layers.{i}."
            tensors = {prefix + k: v.detach().contiguous().cpu() for k, v in block.state_dict().items()}
            for name in by_layer.get(i, []):
                lin = block.get_submodule(name[len(prefix):])
                st = stats.get(name)
                if cfg.gptq:
                    q = gptq_linear(lin, scheme, None if st is None else st.hessian, observer=observer,
                                    dampening=cfg.gptq_dampening, act_order=cfg.gptq_act_order, name=name)
                else:
                    q = QuantLinear.from_linear(lin, scheme.weights, scheme.input_activations, observer,
                                                what=f"{name}.weight")
                apply_layer_stats(q, name, scheme, st, observer, dtype)
                kv = kv or q.output_scale is not None
                del tensors[f"{name}.weight"]
                tensors.update(stored_tensors(name, q, fmt, dtype))
            add(tensors)

        add({k: v for k, v in resident.items() if _natural_key(k) < _natural_key("model.layers")})
        n = model.arch.num_layers
        if calibrated:
            left = calibrate(model, scheme, calib, batch_size=cfg.batch_size, observer=observer, gptq=cfg.gptq,
                             progress=progress, on_layer=finish)
            assert not left, f"calibration statistics never used: {sorted(left)[:3]}"
        else:
            for i in range(n):
                with layer(model, i) as block:
                    finish(i, block, {})
                if progress is not None:
                    progress(i + 1, n)
        add({k: v for k, v in resident.items() if _natural_key(k) > _natural_key("model.layers")})
        writer.close()
        record = quantize_record(scheme, cfg, calib if calibrated else None, time.perf_counter() - t0)
        groups = {(scheme.weights, scheme.input_activations): list(targets)}
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets)
        qcfg, files = quantization_config(groups, ignore, kv, fmt)
        write_model_files(tmp, model.arch, dtype=model.dtype, provenance=[*getattr(model, "provenance", []), record],
                          tokenizer=model.tokenizer, extra_files=files, quantization_config=qcfg)
    return record
