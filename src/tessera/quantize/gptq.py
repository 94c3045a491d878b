"""GPTQ-style error compensation (Frantar et al., 2022) for FP8 and NVFP4 weights.

Columns of W are quantized left to right; each column's rounding error, weighted by the inverse Hessian of the
layer's inputs (H = sum of x x^T over the calibration rows), is pushed onto the columns not yet quantized, so the
layer's output on calibration-like inputs moves less than with round-to-nearest. Scales are fixed as the format
needs them, all from the original weight by the chosen observer (min-max or MSE): FP8 per-tensor / per-channel
scales, NVFP4's global scale and every group's E4M3 scale. The result is ordinary stored codes and scales,
exported like any other. With act-order (the default) the columns are visited in order of decreasing Hessian
diagonal, each still under its own group's scale ("static groups"), so act-order changes no stored layout.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.errors import TesseraError
from tessera.quantize import numerics as nx
from tessera.quantize.modules import QuantLinear, set_module
from tessera.quantize.observers import search_amax
from tessera.quantize.schemes import QuantArgs, Scheme, get_scheme, resolve_targets

BLOCK = 128


def _inverse_hessian_factor(h: torch.Tensor, w: torch.Tensor, dampening: float) -> torch.Tensor:
    h = h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = dampening * torch.mean(torch.diag(h))
    h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(5):
        try:
            chol = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:
            h += damp * torch.eye(h.shape[0], dtype=h.dtype)
    else:
        raise TesseraError("GPTQ: the input Hessian is not positive definite even after dampening; use more "
                           "calibration text or drop --gptq")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True).float()


def gptq_weight(w: torch.Tensor, h: torch.Tensor, args: QuantArgs, *, observer: str = "minmax",
                dampening: float = 0.01, scale_dtype: torch.dtype = torch.float32, act_order: bool = False):
    """GPTQ-quantized weight: (codes, scale) for FP8 or (codes, group scales, global scale) for NVFP4.

    `act_order` quantizes the input columns in order of decreasing Hessian diagonal (the inputs with the most
    energy first, so their error is spread over the most columns still free to absorb it); every column keeps
    the scale of its own group, fixed up front, so the stored layout is unchanged."""
    w = w.detach().float().clone()
    out_f, in_f = w.shape
    if args.fp4:
        gs = args.group_size or 16
        g = nx.nvfp4_global_scale(nx.amax(w, "tensor"))
        group_scales = nx.nvfp4_group_scales(search_amax(w, args, observer, global_scale=g), g)
        col_eff = nx.nvfp4_effective_scale(group_scales, g).repeat_interleave(gs, dim=1)  # [out, in]
    else:
        scale = nx.fp8_scale(search_amax(w, args, observer, scale_dtype=scale_dtype), scale_dtype)
        col_eff = scale.float().expand(out_f, 1).expand(out_f, in_f) if scale.numel() > 1 else \
            scale.float().reshape(1, 1).expand(out_f, in_f)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(in_f)
    w, h, col_eff = w[:, perm], h[perm][:, perm], col_eff[:, perm]
    u = _inverse_hessian_factor(h, w, dampening)
    q = torch.zeros_like(w)
    rnd = nx.round_e2m1 if args.fp4 else nx.round_e4m3
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            eff = col_eff[:, col]
            qc = rnd(w1[:, i] / eff) * eff
            q[:, col] = qc
            e = (w1[:, i] - qc) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    if args.fp4:
        codes = nx.nvfp4_quantize(q, group_scales, g)
        return codes, group_scales, g
    return nx.fp8_quantize(q, scale), scale


def gptq_quantize_weights(model: nn.Module, scheme: Scheme | str, stats: dict, *, observer: str = "minmax",
                          dampening: float = 0.01, act_order: bool = True) -> dict[str, QuantLinear]:
    """Like `quantize_weights`, with each target's weight GPTQ-quantized from its calibration Hessian."""
    scheme = get_scheme(scheme)
    out = {}
    for name, lin in resolve_targets(model, scheme).items():
        st = stats.get(name)
        q = gptq_linear(lin, scheme, None if st is None else st.hessian, observer=observer, dampening=dampening,
                        act_order=act_order, name=name)
        set_module(model, name, q)
        out[name] = q
    return out


@torch.no_grad()
def gptq_linear(lin: nn.Linear, scheme: Scheme, hessian: torch.Tensor | None, *, observer: str = "minmax",
                dampening: float = 0.01, act_order: bool = True, name: str = "Linear") -> QuantLinear:
    """A new QuantLinear holding `lin`'s weight GPTQ-quantized with the input Hessian `hessian` (`lin` unchanged):
    one layer's step of `gptq_quantize_weights`, also what a streamed quantization runs layer by layer."""
    if hessian is None:
        raise TesseraError(f"{name}: no calibration Hessian for GPTQ; calibrate with gptq=True first")
    w = lin.weight.detach()
    nx.check_finite(w, f"{name}.weight")
    q = QuantLinear(lin.in_features, lin.out_features, scheme.weights, scheme.input_activations,
                    bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    if lin.bias is not None:
        q.bias.data.copy_(lin.bias.detach())
    res = gptq_weight(w, hessian, scheme.weights, observer=observer, dampening=dampening, scale_dtype=w.dtype,
                      act_order=act_order)
    if scheme.weights.fp4:
        q.set_nvfp4(nx.pack_fp4(res[0]), res[1], res[2])
    else:
        q.set_fp8(*res)
    return q
