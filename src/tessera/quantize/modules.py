"""`QuantLinear`: a drop-in `nn.Linear` that computes exactly what a quantized checkpoint serves.

It holds the stored form (E4M3 codes or packed E2M1 nibbles, and their scales, as plain tensors) and,
as `weight`, the dequantized weight those give, so the rest of tessera (forward, generation, evaluation,
fingerprints) sees an ordinary Linear. On each call it fake-quantizes its input as the scheme says: per token at
run time (FP8-dynamic), with a calibrated per-tensor scale (FP8 static), or per group of 16 under a calibrated
global scale (NVFP4, `dynamic: "local"`). A k/v projection can also carry an FP8 KV-cache scale (`output_scale`):
its output is then rounded as the cache would store it (for K before RoPE — an approximation of the cache).

`quantize_weights` swaps QuantLinears into any module (a whole `Transformer`, a `Block`) in place: no second
model class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.errors import TesseraError
from tessera.quantize import numerics as nx
from tessera.quantize.observers import search_amax
from tessera.quantize.schemes import QuantArgs, Scheme, get_scheme, resolve_targets


class QuantLinear(nn.Linear):
    """A Linear whose weight is stored quantized and whose input is fake-quantized like the serving kernel's."""

    def __init__(self, in_features: int, out_features: int, weights: QuantArgs, input_activations: QuantArgs | None,
                 *, bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        self.wargs, self.aargs = weights, input_activations
        # The stored form: plain attributes, not buffers, so `model.to(dtype)` never re-types codes or scales
        # (`_apply` moves them between devices only).
        self.weight_q: torch.Tensor | None = None
        self.weight_scale: torch.Tensor | None = None
        self.weight_global_scale: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        self.input_global_scale: torch.Tensor | None = None
        self.output_scale: torch.Tensor | None = None

    STORED = ("weight_q", "weight_scale", "weight_global_scale", "input_scale", "input_global_scale", "output_scale")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.weight.device
        for name in self.STORED:
            t = getattr(self, name)
            if t is not None and t.device != device:
                setattr(self, name, t.to(device))
        return self

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(cls, linear: nn.Linear, weights: QuantArgs, input_activations: QuantArgs | None,
                    observer: str = "minmax", what: str = "weight") -> QuantLinear:
        """Quantize `linear`'s weight (scale search by `observer`) into a new QuantLinear."""
        w = linear.weight.detach()
        nx.check_finite(w, what)
        q = cls(linear.in_features, linear.out_features, weights, input_activations, bias=linear.bias is not None,
                device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        if weights.fp4:
            g = nx.nvfp4_global_scale(nx.amax(w, "tensor"))
            a = search_amax(w, weights, observer, global_scale=g)
            scales = nx.nvfp4_group_scales(a, g)
            q.set_nvfp4(nx.pack_fp4(nx.nvfp4_quantize(w, scales, g)), scales, g)
        else:
            a = search_amax(w, weights, observer, scale_dtype=w.dtype)
            scale = nx.fp8_scale(a, w.dtype)
            q.set_fp8(nx.fp8_quantize(w, scale), scale)
        return q

    def set_fp8(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Stored FP8 weight (float8_e4m3fn [out, in]) and scale ([1] or [out, 1], model dtype)."""
        self.weight_q, self.weight_scale = codes.to(torch.float8_e4m3fn), scale
        self.weight.data = nx.fp8_dequantize(codes, scale).to(self.weight.dtype)

    def set_nvfp4(self, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> None:
        """Stored NVFP4 weight: packed nibbles (uint8 [out, in/2]), E4M3 group scales ([out, in/16]) and the
        inverted global scale (float32 [1])."""
        self.weight_q, self.weight_scale = packed.to(torch.uint8), scales.to(torch.float8_e4m3fn)
        self.weight_global_scale = global_scale.float().reshape(1)
        deq = nx.nvfp4_dequantize(nx.unpack_fp4(packed), self.weight_scale, self.weight_global_scale)
        self.weight.data = deq.to(self.weight.dtype)

    # ------------------------------------------------------------------ running
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        a = self.aargs
        if a is None:
            return x
        if a.strategy == "token":
            return nx.dynamic_token_fp8_qdq(x).to(x.dtype)
        if a.fp4:
            if self.input_global_scale is None:
                raise TesseraError("NVFP4 activations need a calibrated input global scale; run calibration "
                                   "(tessera quantize) or use nvfp4-weight-only")
            return nx.nvfp4_qdq(x, self.input_global_scale, a.group_size or 16).to(x.dtype)
        if self.input_scale is None:
            raise TesseraError("static FP8 activations need a calibrated input scale; run calibration "
                               "(tessera quantize) or use fp8-dynamic")
        return nx.fp8_qdq(x, self.input_scale).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.quantize_input(x), self.weight, self.bias)
        if self.output_scale is not None:
            y = nx.fp8_qdq(y, self.output_scale).to(y.dtype)
        return y

    def stored_bytes(self) -> int:
        """Bytes of the stored weight and its scales (what the checkpoint holds for this layer)."""
        n = sum(t.numel() * t.element_size() for t in (getattr(self, k) for k in self.STORED) if t is not None)
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def extra_repr(self) -> str:
        act = "none" if self.aargs is None else f"{self.aargs.num_bits}-bit {self.aargs.strategy}"
        return (f"{super().extra_repr()}, weights={self.wargs.num_bits}-bit {self.wargs.strategy}, "
                f"activations={act}")


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def quantize_weights(model: nn.Module, scheme: Scheme | str, *, observer: str | None = None,
                     names: list[str] | None = None) -> dict[str, QuantLinear]:
    """Swap a QuantLinear (weights quantized, activation scheme attached) into `model` for every target of
    `scheme` (or only `names` among them), in place; returns them by name. Static activation scales are left
    for calibration."""
    scheme = get_scheme(scheme)
    targets = resolve_targets(model, scheme)
    out: dict[str, QuantLinear] = {}
    with torch.no_grad():
        for name, lin in targets.items():
            if names is not None and name not in names:
                continue
            if isinstance(lin, QuantLinear):
                raise TesseraError(f"{name} is already quantized; quantize the unquantized model")
            q = QuantLinear.from_linear(lin, scheme.weights, scheme.input_activations, observer or scheme.observer,
                                        what=f"{name}.weight")
            set_module(model, name, q)
            out[name] = q
    return out


PRECISION_SCHEMES = {"fp8": "fp8-dynamic", "nvfp4": "nvfp4-weight-only"}


def fake_quantize_weights(module: nn.Module, precision: str) -> nn.Module:
    """Quantize every Linear of `module` to a Puzzle precision without calibration data: `fp8` is FP8-dynamic
    (per-channel weights, per-token activations), `nvfp4` the NVFP4 weights (activations need calibration)."""
    if precision not in PRECISION_SCHEMES:
        raise TesseraError(f"precision {precision!r}: use one of native, {', '.join(PRECISION_SCHEMES)}")
    quantize_weights(module, PRECISION_SCHEMES[precision])
    return module


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
