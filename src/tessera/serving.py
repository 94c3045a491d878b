"""Serving vocabulary shared by the measured (`tessera.bench`) and predicted (`tessera.cost`) speed paths:
a scenario of IN/OUT token lengths, bytes per element of each weight / KV-cache dtype, and the KV-cache dtype
a serving stack picks for given weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.devices import format_name
from tessera.errors import TesseraError

# Bytes per element. NVFP4: 4 bits + one FP8 scale per 16 elements.
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}
KV_DTYPES = ("fp32", "bf16", "fp16", "fp8")


def default_kv_dtype(dtype: str) -> str:
    """The KV-cache dtype FP8 serving recipes use for these weights: fp8 for fp8 / nvfp4 weights (TensorRT-LLM
    and vLLM FP8 checkpoints quantize the KV cache too), fp32 for fp32, bf16 otherwise."""
    if dtype in ("fp8", "nvfp4"):
        return "fp8"
    return "fp32" if dtype == "fp32" else "bf16"


def check_dtype(dtype: str, what: str = "dtype", allowed: tuple[str, ...] = tuple(DTYPE_BYTES)) -> str:
    """The canonical name of `dtype` (the aliases of `tessera.devices`, e.g. `float16` -> `fp16`, are accepted,
    as every compute command accepts them), or one clear error naming what is allowed."""
    try:
        return format_name(dtype, allowed)
    except TesseraError:
        raise TesseraError(f"unknown {what} {dtype!r}; choose from {', '.join(allowed)}") from None


@dataclass(frozen=True)
class Scenario:
    """One serving scenario: every request has `input_len` prompt tokens and generates `output_len` tokens."""

    input_len: int
    output_len: int

    @staticmethod
    def parse(text: str) -> Scenario:
        try:
            a, b = (int(x) for x in text.split("/"))
        except ValueError:
            raise TesseraError(f"scenario {text!r} is not IN/OUT (e.g. 128/1024)") from None
        if a < 1 or b < 1:
            raise TesseraError(f"scenario {text!r}: input and output lengths must be >= 1")
        return Scenario(a, b)

    def __str__(self) -> str:
        return f"{self.input_len}/{self.output_len}"
