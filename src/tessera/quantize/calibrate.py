"""Calibration and the quantization stage: `quantize_model(model, scheme, calib)`.

Calibration runs the calibration text (by default the calibration split of the shared corpus, `tessera.data`)
through the model layer by layer with `tessera.stream.executor.run_layers`: an observer hooks the target Linears
of the one layer being run and keeps, per layer, the largest input magnitude (plus, for the MSE observer, a
bounded sample of input rows, and for KV-cache scales the largest k/v projection output). So calibration never
holds more than one layer's activations, and works unchanged on a streamed parent.

Static scales from the statistics:
* FP8 static activations: `input_scale = amax / 448` (amax searched by MSE over the sampled rows with `mse`);
* NVFP4 activations: `input_global_scale = 448 * 6 / amax` (group scales stay dynamic, per call);
* FP8 KV cache: `k_scale`, `v_scale = amax / 448` of the k/v projection outputs. For K that amax is an upper
  bound valid under any RoPE rotation (the norm of each rotated pair), so no rotated key saturates.
Weights are quantized from themselves (min-max or MSE scale search), optionally with GPTQ error compensation
(`tessera.quantize.gptq`) from the same pass's input Hessians.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tessera.data import DataSplit, load_split
from tessera.errors import TesseraError
from tessera.model import Transformer
from tessera.prune import clone
from tessera.quantize import numerics as nx
from tessera.quantize.modules import QuantLinear, quant_layers, quantize_weights
from tessera.quantize.observers import ActivationStats
from tessera.quantize.schemes import Scheme, get_scheme, resolve_targets
from tessera.stream.executor import Observer, run_layers


@dataclass(frozen=True)
class CalibrationConfig:
    """How much calibration text, how it is cut, and which observer turns statistics into scales."""

    samples: int = 128  # sequences of the calibration split
    seq_len: int = 512
    batch_size: int = 4
    observer: str | None = None  # None: the scheme's (min-max unless set)
    gptq: bool = False  # GPTQ-style error compensation of the weights (needs calibration text)
    gptq_dampening: float = 0.01
    gptq_act_order: bool = True  # GPTQ visits columns by decreasing Hessian diagonal (group scales unchanged)
    gptq_sequential: bool = False  # layer i's Hessians from the outputs of the already-quantized layers 0..i-1
    corpus: str | None = None  # None: the shared corpus

    def __post_init__(self):
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise TesseraError("calibration needs --calib-samples >= 1, --calib-seq-len >= 2 and a positive batch size")
        if self.observer is not None and self.observer not in ("minmax", "mse"):
            raise TesseraError(f"observer {self.observer!r}: use minmax or mse")


def calibration_data(tokenizer, cfg: CalibrationConfig) -> DataSplit:
    """`cfg.samples` chunks of `cfg.seq_len` tokens of the calibration split (disjoint from selection/reporting)."""
    if tokenizer is None:
        raise TesseraError("calibration needs the model's tokenizer; copy tokenizer.json into the model directory")
    data = load_split(tokenizer, "calibration", Path(cfg.corpus) if cfg.corpus else None, seq_len=cfg.seq_len,
                      max_tokens=cfg.samples * cfg.seq_len)
    return data.take(cfg.samples)


@dataclass
class LayerStats:
    """What calibration saw at one target Linear."""

    inputs: ActivationStats
    hessian: torch.Tensor | None = None  # sum of x x^T over input rows (GPTQ)
    rows: int = 0
    output_amax: torch.Tensor | None = None  # k/v projections with KV-cache scales


class _CalibrationObserver(Observer):
    def __init__(self, needs: dict[str, tuple[bool, bool]], kv: set[str], head_dim: int, gptq: set[str],
                 on_layer: Callable | None = None, batches: int = 0):
        self.needs, self.kv, self.head_dim, self.gptq = needs, kv, head_dim, gptq
        self.stats: dict[str, LayerStats] = {}
        self.on_layer, self.batches = on_layer, batches
        self.block = None

    def after_batch(self, i: int, b: int, x, y) -> None:
        if self.on_layer is not None and b == self.batches - 1:  # layer i has seen every batch: hand it over
            prefix = f"model.layers.{i}."
            done = {n: self.stats.pop(n) for n in list(self.stats) if n.startswith(prefix)}
            self.on_layer(i, self.block, done)

    def attach(self, i: int, block) -> list:
        self.block = block
        handles = []
        for rel, mod in block.named_modules():
            full = f"model.layers.{i}.{rel}"
            if full in self.needs or full in self.gptq:
                st = self.stats.setdefault(full, LayerStats(ActivationStats()))
                keep_rows = self.needs.get(full, (False, False))[1]
                handles.append(mod.register_forward_pre_hook(
                    lambda _m, args, st=st, full=full, keep=keep_rows: self._inputs(st, full, args[0], keep)))
            if full in self.kv:
                st = self.stats.setdefault(full, LayerStats(ActivationStats()))
                rot = full.endswith("k_proj")
                handles.append(mod.register_forward_hook(
                    lambda _m, _a, out, st=st, full=full, rot=rot: self._outputs(st, full, out, rot)))
        return handles

    def _inputs(self, st: LayerStats, name: str, x: torch.Tensor, keep_rows: bool) -> None:
        st.inputs.update(x, f"calibration activations at {name}", keep_rows)
        if name in self.gptq:
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            h = x2.T @ x2
            st.hessian = h if st.hessian is None else st.hessian + h
            st.rows += x2.shape[0]

    def _outputs(self, st: LayerStats, name: str, y: torch.Tensor, rotated: bool) -> None:
        nx.check_finite(y, f"calibration activations at {name} (output)")
        y = y.detach().float()
        if rotated:  # RoPE rotates pairs (j, j + d/2) of each head: their norm bounds every rotated value
            h = y.reshape(*y.shape[:-1], -1, 2, self.head_dim // 2)
            y = h.pow(2).sum(-2).sqrt()
        a = y.abs().amax().reshape(1).cpu()
        st.output_amax = a if st.output_amax is None else torch.maximum(st.output_amax, a)


def calibrate(model: Transformer, scheme: Scheme | str, data: DataSplit | torch.Tensor, *, batch_size: int = 4,
              observer: str | None = None, gptq: bool = False,
              progress: Callable[[int, int], None] | None = None,
              on_layer: Callable[[int, torch.nn.Module, dict[str, LayerStats]], None] | None = None
              ) -> dict[str, LayerStats]:
    """Statistics of every target layer's inputs (and k/v outputs for KV-cache scales) over `data`, one layer at a
    time; the model is left unchanged. Targets outside the decoder layers cannot be calibrated (one line).

    With `on_layer`, `on_layer(i, block, stats_of_layer_i)` is called as soon as layer i has seen every batch,
    while it is still materialised, and its statistics are handed over rather than kept (a streamed quantization
    quantizes and writes the layer there, so at most one layer's statistics, GPTQ Hessians included, exist)."""
    scheme = get_scheme(scheme)
    ob, chunks, _targets = _observer_for(model, scheme, observer or scheme.observer, gptq, data, batch_size, on_layer)
    run_layers(model, chunks, batch_size=batch_size, observer=ob, progress=progress).close()
    return ob.stats


def _observer_for(model: Transformer, scheme: Scheme, obs: str, gptq: bool, data: DataSplit | torch.Tensor,
                  batch_size: int, on_layer: Callable | None = None
                  ) -> tuple[_CalibrationObserver, torch.Tensor, dict[str, torch.nn.Linear]]:
    """The observer of `scheme`'s targets (what each one needs), the calibration chunks and the targets (name ->
    module, `resolve_targets`), or one clear error."""
    targets = resolve_targets(model, scheme)
    a = scheme.input_activations
    static = a is not None and a.dynamic is not True
    needs = {n: (True, obs == "mse") for n in targets} if static else {}
    kv = {n for n in targets if n.endswith(("self_attn.k_proj", "self_attn.v_proj"))} if scheme.kv_cache else set()
    want_gptq = set(targets) if gptq else set()
    outside = [n for n in (*needs, *want_gptq) if not n.startswith("model.layers.")]
    if outside:
        raise TesseraError(f"{outside[0]} is outside the decoder layers and cannot be calibrated; --ignore it or "
                           "use a dynamic scheme")
    chunks = data.chunks if isinstance(data, DataSplit) else data
    if chunks.numel() == 0:
        raise TesseraError("calibration text gave no tokens; pass a longer corpus or fewer --calib-seq-len")
    from tessera.stream.executor import batch_slices

    return _CalibrationObserver(needs, kv, model.arch.head_dim, want_gptq, on_layer,
                                len(batch_slices(len(chunks), batch_size))), chunks, targets


def quantize_sequentially(model: Transformer, scheme: Scheme | str, data: DataSplit | torch.Tensor, *,
                          cfg: CalibrationConfig, observer: str,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, LayerStats]:
    """GPTQ as its authors run it, in place on `model`: layer by layer, layer i is calibrated on the outputs of
    the already-quantized layers 0..i-1 (so its Hessians, activation scales and the error it compensates are
    those of the quantized model it will sit in), then quantized, then run again to feed layer i + 1. Holds one
    layer's activations and one layer's Hessians, like `calibrate`. Returns the statistics it used (Hessians
    dropped)."""
    from tessera.quantize.gptq import gptq_linear
    from tessera.quantize.modules import set_module
    from tessera.stream.executor import batch_slices, rope_for

    scheme = get_scheme(scheme)
    ob, chunks, targets = _observer_for(model, scheme, observer, True, data, cfg.batch_size)
    n, seq_len = chunks.shape
    dtype = model.model.embed_tokens.weight.dtype
    slices = batch_slices(n, cfg.batch_size)
    with torch.no_grad():
        xs = [model.model.embed_tokens(chunks[s].to(model.device)) for s in slices]
        ropes = {r: rope_for(model, r, seq_len, dtype) for r in {s.stop - s.start for s in slices}}
        layers = model.model.layers
        for i, block in enumerate(layers):
            handles = ob.attach(i, block)
            try:
                for x in xs:
                    block(x, *ropes[x.shape[0]], None, None, 0)
            finally:
                for h in handles:
                    h.remove()
            for name in [t for t in targets if t.startswith(f"model.layers.{i}.")]:
                st = ob.stats.get(name)
                q = gptq_linear(targets[name], scheme, None if st is None else st.hessian, observer=observer,
                                dampening=cfg.gptq_dampening, act_order=cfg.gptq_act_order, name=name)
                apply_layer_stats(q, name, scheme, st, observer, dtype)
                set_module(model, name, q)
                if st is not None:
                    st.hessian = None  # one layer's Hessians at a time
            xs = [block(x, *ropes[x.shape[0]], None, None, 0) for x in xs]
            if progress is not None:
                progress(i + 1, len(layers))
    return ob.stats


def quantize_model(model: Transformer, scheme: Scheme | str, calib: DataSplit | torch.Tensor | None = None, *,
                   config: CalibrationConfig | None = None, inplace: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> Transformer:
    """The quantization stage: a copy of `model` (or `model` itself with inplace) with QuantLinears swapped in for
    the scheme's targets, weights quantized and static scales calibrated on `calib` (token chunks, e.g.
    `calibration_data(...)`). Calibration runs on the unquantized model, one layer at a time. The result records
    what was done in `quantization` and `provenance`; `tessera.save` writes it as a compressed-tensors checkpoint
    (`tessera.quantize.export` for modelopt)."""
    from tessera.stream.model import is_streamed

    cfg = config or CalibrationConfig()
    scheme = get_scheme(scheme)
    observer = cfg.observer or scheme.observer
    if is_streamed(model):
        raise TesseraError("a streamed model cannot be quantized in memory; use tessera.quantize.export.quantize_to_dir "
                           "(tessera quantize --stream on writes a streamed parent layer by layer)")
    check_quantizable(model, scheme, cfg, calib)
    t0 = time.perf_counter()
    stats = {}
    if cfg.gptq and cfg.gptq_sequential:
        out = model if inplace else clone(model)
        stats = quantize_sequentially(out, scheme, calib, cfg=cfg, observer=observer, progress=progress)
    else:
        if calib is not None and (scheme.needs_calibration or cfg.gptq):
            stats = calibrate(model, scheme, calib, batch_size=cfg.batch_size, observer=observer, gptq=cfg.gptq,
                              progress=progress)
        out = model if inplace else clone(model)
        if cfg.gptq:
            from tessera.quantize.gptq import gptq_quantize_weights

            gptq_quantize_weights(out, scheme, stats, observer=observer, dampening=cfg.gptq_dampening,
                                  act_order=cfg.gptq_act_order)
        else:
            quantize_weights(out, scheme, observer=observer)
        apply_stats(out, scheme, stats, observer)
    record = quantize_record(scheme, cfg, calib if stats else None, time.perf_counter() - t0)
    out.quantization = record
    out.provenance = [*getattr(model, "provenance", []), record]
    return out


def quantize_record(scheme: Scheme, cfg: CalibrationConfig, calib: DataSplit | torch.Tensor | None,
                    seconds: float) -> dict:
    """The provenance record of a quantization (`calib`: the data the scales were calibrated on, or None)."""
    return {"stage": "quantize", "scheme": scheme.name, "config_group": scheme.to_config_group(),
            "ignore": list(scheme.ignore), "kv_cache": scheme.kv_cache is not None,
            "observer": cfg.observer or scheme.observer,
            "calibration": None if calib is None else
            (calib.record() if isinstance(calib, DataSplit) else {"chunks": len(calib), "seq_len": calib.shape[1]}),
            "config": asdict(cfg), "seconds": round(seconds, 3)}


def check_quantizable(model: Transformer, scheme: Scheme, cfg: CalibrationConfig, calib) -> dict:
    """The scheme's targets in `model`, after the checks every quantization makes first (one line each)."""
    if quant_layers(model):
        raise TesseraError("the model is already quantized; quantize the unquantized parent")
    targets = resolve_targets(model, scheme)  # refuse bad targets before any work
    if (scheme.needs_calibration or cfg.gptq) and calib is None:
        raise TesseraError(f"scheme {scheme.name} needs calibration text (static activation / KV scales or GPTQ); "
                           "pass calibration data")
    return targets


def apply_stats(model: Transformer, scheme: Scheme, stats: dict[str, LayerStats], observer: str) -> None:
    """Static scales from calibration statistics onto the model's QuantLinears."""
    dtype = model.model.embed_tokens.weight.dtype
    for name, q in quant_layers(model).items():
        apply_layer_stats(q, name, scheme, stats.get(name), observer, dtype)


def apply_layer_stats(q: QuantLinear, name: str, scheme: Scheme, st: LayerStats | None, observer: str,
                      dtype: torch.dtype) -> None:
    """Static scales of one QuantLinear (`name`: its full module name) from its statistics; `dtype` the model's."""
    a = scheme.input_activations
    if a is not None and a.dynamic is not True:
        if st is None:
            raise TesseraError(f"{name}: no calibration statistics; calibrate before quantizing")
        amax = st.inputs.tensor_amax(a, observer, dtype)
        if a.fp4:
            q.input_global_scale = nx.nvfp4_global_scale(amax)
        else:
            q.input_scale = nx.fp8_scale(amax, dtype).to(q.weight.device)
    if scheme.kv_cache is not None and st is not None and st.output_amax is not None:
        q.output_scale = nx.fp8_scale(st.output_amax, dtype).to(q.weight.device)


__all__ = ["CalibrationConfig", "LayerStats", "QuantLinear", "apply_layer_stats", "apply_stats", "calibrate",
           "calibration_data", "check_quantizable", "quantize_model", "quantize_record", "quantize_sequentially"]
