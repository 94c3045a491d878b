"""Exact FP8 (E4M3) and FP4 (E2M1) numerics: rounding, scales, quantize-dequantize.

E4M3 ("fn": no infinities): 1 sign, 4 exponent (bias 7), 3 mantissa bits; largest 448, smallest subnormal 2^-9.
E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Both round to nearest with ties to even (the even code) and saturate at their largest magnitude, as
compressed-tensors, modelopt and the hardware do. All arithmetic is in float32, and every scale is rounded to
the dtype it is stored in before use, so a fake-quantized weight equals, bit for bit, what a reader of the
exported checkpoint computes (value * scale, for NVFP4 value * (weight_scale / global_scale)).

Scales (symmetric, per tensor / channel / group / token):
* FP8:   scale = amax / 448;                      q = e4m3(x / scale);  x' = q * scale
* NVFP4: global = 448 * 6 / amax_tensor (float32); s = e4m3(global * amax_group / 6);
         q = e2m1(x / (s / global));               x' = q * (s / global)
A scale that would be 0 is replaced as compressed-tensors does (the dtype's eps for FP8 scales, 0.125 for E4M3 group
scales), never a division by zero.
"""

from __future__ import annotations

import torch

from tessera.errors import TesseraError

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_MIDPOINTS = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2


def check_finite(t: torch.Tensor, what: str) -> None:
    """One clear error when `t` has NaN or inf (quantizing them gives silent garbage)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise TesseraError(f"{what} contains {bad} NaN/inf value(s); quantization needs finite numbers — fix the "
                           "checkpoint or the calibration text (e.g. load in fp32)")


# ---------------------------------------------------------------------------- rounding
def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (any float dtype) rounded to the nearest E4M3 value (ties to even), saturating at +-448; float32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Like `round_e4m3`, as a float8_e4m3fn tensor (the storage dtype)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes (uint8 0..15: bit 3 sign, bits 0-2 index into E2M1_VALUES) of x rounded to nearest, ties
    to the even index, saturating at +-6. A value that rounds to zero gets code 0 (no negative zero), as the
    compressed-tensors packer writes it."""
    a = x.float().abs().clamp(max=E2M1_MAX)
    mids = _E2M1_MIDPOINTS.to(a.device)
    idx = torch.bucketize(a, mids)  # number of midpoints strictly below a: ties go to the lower index...
    tie = (idx < len(mids)) & (a == mids[idx.clamp(max=len(mids) - 1)])
    idx = idx + (tie & (idx % 2 == 1)).long()  # ...and then to the even one
    sign = x < 0
    return (idx | (sign.long() << 3)).to(torch.uint8)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes."""
    c = codes.long()
    mag = E2M1_VALUES.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest E2M1 value (ties to even, saturating at +-6); float32."""
    return e2m1_decode(e2m1_codes(x))


# ---------------------------------------------------------------------------- packing
def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 codes -> [..., n/2] bytes: low nibble = even column, high nibble = odd column."""
    if codes.shape[-1] % 2:
        raise TesseraError(f"NVFP4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: [..., n/2] bytes -> [..., n] codes."""
    p = packed.to(torch.uint8)
    return torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ---------------------------------------------------------------------------- amax / scales
def amax(x: torch.Tensor, strategy: str, group_size: int | None = None) -> torch.Tensor:
    """Largest magnitude of x (float32) per tensor ([1]), per channel / token (row: [..., 1]) or per group of the
    last dimension ([..., n/g])."""
    a = x.float().abs()
    if strategy == "tensor":
        return a.amax().reshape(1)
    if strategy in ("channel", "token"):
        return a.amax(dim=-1, keepdim=True)
    if strategy in ("group", "tensor_group"):
        return grouped(a, group_size).amax(dim=-1)
    raise TesseraError(f"quantization strategy {strategy!r}: use tensor, channel, token, group or tensor_group")


def grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[..., n] -> [..., n/g, g] (one clear error when g does not divide n)."""
    n = x.shape[-1]
    if not group_size or n % group_size:
        raise TesseraError(f"width {n} is not a multiple of the group size {group_size}; ignore this layer or use "
                           "a width divisible by it")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def fp8_scale(amax_: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 scale amax / 448 rounded to its storage dtype; the dtype's eps where that is 0 (compressed-tensors'
    guard against dividing by zero)."""
    s = (amax_.float() / E4M3_MAX).to(dtype)
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(dtype).eps))


def nvfp4_global_scale(amax_: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' (inverted) NVFP4 global scale 448 * 6 / amax (float32 [1]); 1 where amax is 0."""
    a = amax_.float().reshape(-1)[:1]
    return torch.where(a > 0, (E4M3_MAX * E2M1_MAX) / a, torch.ones_like(a))


def nvfp4_group_scales(group_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 group scales e4m3(global * amax_group / 6) as float8_e4m3fn; 0.125 where that rounds to 0
    (compressed-tensors' guard: such a group's values quantize with the smallest-but-safe scale)."""
    s = to_e4m3(global_scale.float() * (group_amax.float() / E2M1_MAX))
    return torch.where(s.float() > 0, s, torch.full_like(s, 0.125))


def nvfp4_effective_scale(group_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The float32 scale each group's codes are multiplied by: weight_scale / weight_global_scale."""
    return group_scales.float() / global_scale.float()


# ---------------------------------------------------------------------------- quantize / dequantize
def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of x / scale (scale broadcastable to x); float8_e4m3fn."""
    return to_e4m3(x.float() / scale.float())


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x fake-quantized to FP8 with `scale` (float32)."""
    return fp8_dequantize(fp8_quantize(x, scale), scale)


def nvfp4_quantize(x: torch.Tensor, group_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [..., n] of x under E4M3 group scales [..., n/16] and the (inverted) global scale."""
    eff = nvfp4_effective_scale(group_scales, global_scale)
    g = grouped(x.float(), x.shape[-1] // eff.shape[-1])
    safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    codes = e2m1_codes(g / safe[..., None])
    codes = torch.where((eff > 0)[..., None], codes, torch.zeros_like(codes))  # a zero scale holds only zeros
    return codes.reshape(x.shape)


def nvfp4_dequantize(codes: torch.Tensor, group_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    eff = nvfp4_effective_scale(group_scales, global_scale)
    vals = grouped(e2m1_decode(codes), codes.shape[-1] // eff.shape[-1])
    return (vals * eff[..., None]).reshape(codes.shape)


def nvfp4_qdq(x: torch.Tensor, global_scale: torch.Tensor, group_size: int = 16) -> torch.Tensor:
    """x fake-quantized to NVFP4 with group scales computed from x itself (weights, or dynamic "local"
    activations) under a given global scale; float32."""
    scales = nvfp4_group_scales(amax(x, "tensor_group", group_size), global_scale)
    return nvfp4_dequantize(nvfp4_quantize(x, scales, global_scale), scales, global_scale)


def dynamic_token_fp8_qdq(x: torch.Tensor) -> torch.Tensor:
    """Per-token dynamic FP8: each row (token) scaled by its own amax / 448 (in x's dtype) at run time; float32."""
    return fp8_qdq(x, fp8_scale(amax(x, "token"), x.dtype))
