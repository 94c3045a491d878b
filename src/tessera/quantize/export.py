"""Writing a quantized model: `export(model, out, fmt)` (compressed-tensors or modelopt NVFP4).

A quantized model (one holding QuantLinears, from `quantize_model` or loaded from a quantized checkpoint) is
written in its stored form by `tessera.checkpoint.save`, which calls `tessera.quantize.storage.encode`; this is
that save with the format named, and checks that the format can hold the scheme before any work. Loading back is
`tessera.load(out)`: a nemotron-nas child stays nemotron-nas, its quantized layers come back as QuantLinears.
"""

from __future__ import annotations

import os
from pathlib import Path

from tessera.checkpoint import save
from tessera.errors import TesseraError
from tessera.model import Transformer
from tessera.quantize.modules import quant_layers
from tessera.quantize.storage import FORMATS


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
