"""Post-training quantization: FP8 (static, dynamic) and NVFP4 schemes, exact numerics, QuantLinear.

Stages: `schemes` (what to quantize, as data) -> `numerics` (E4M3 / E2M1 rounding, scales) -> `observers`
(min-max / MSE scale search) -> `modules` (QuantLinear swapped into the existing model).
"""

from tessera.quantize.modules import QuantLinear, fake_quantize_weights, quant_layers, quantize_weights
from tessera.quantize.schemes import SCHEMES, QuantArgs, Scheme, get_scheme, resolve_targets

__all__ = ["SCHEMES", "QuantArgs", "QuantLinear", "Scheme", "fake_quantize_weights", "get_scheme", "quant_layers",
           "quantize_weights", "resolve_targets"]
