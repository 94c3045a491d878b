"""One vocabulary for devices and number formats, shared by every command and stage.

Devices: `auto` (the default) is CUDA when a GPU is visible, else the CPU; under `torchrun` each process takes the
GPU of its `LOCAL_RANK`. Number formats: `fp32`, `bf16`, `fp16` are the compute dtypes a model can be loaded in
(`float32`, `bfloat16`, `float16` are accepted as aliases); `fp8` and `nvfp4` are storage formats that the cost
model prices and `tessera.quantize` produces.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from tessera.errors import TesseraError

COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUMBER_FORMATS = ("fp32", "bf16", "fp16", "fp8", "nvfp4")
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def format_name(name: str | torch.dtype, allowed: tuple[str, ...] = NUMBER_FORMATS) -> str:
    """The canonical name (`fp32`, `bf16`, `fp16`, `fp8`, `nvfp4`) of a dtype or format name, or one clear error."""
    if isinstance(name, torch.dtype):
        for key, dt in COMPUTE_DTYPES.items():
            if dt == name:
                return key
        raise TesseraError(f"dtype {name} is not supported; use one of {', '.join(allowed)}")
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in allowed:
        raise TesseraError(f"unknown dtype {name!r}; use one of {', '.join(allowed)}")
    return key


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a compute format (fp32 / bf16 / fp16)."""
    return COMPUTE_DTYPES[format_name(name, tuple(COMPUTE_DTYPES))]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`auto`/None -> cuda:LOCAL_RANK if a GPU is visible else cpu; `cuda` -> cuda:LOCAL_RANK; `cpu`; `cuda:N`."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TesseraError(f"--device {name} but no CUDA device is visible; use --device cpu")
        index = int(name.split(":", 1)[1]) if ":" in name else local_rank()
        if index >= torch.cuda.device_count():
            raise TesseraError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
        return torch.device("cuda", index)
    raise TesseraError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def default_dtype(device: torch.device) -> str:
    """fp32 on the CPU (exact; bf16 is only faster on a CPU with native bf16 matmuls, so it is asked for), bf16 on a
    GPU."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, dtype: str | torch.dtype | None):
    """bf16/fp16 autocast on a GPU or the CPU for a model held in fp32 (e.g. distillation's master weights); nothing
    for fp32. (On a CPU with AVX512-BF16 a distillation step of the default parent runs ~2x faster in bf16:
    benchmarks/distill_dtype.py.)"""
    if device.type not in ("cuda", "cpu") or dtype is None or format_name(dtype) == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch_dtype(dtype))


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """(rank, world size). Under torchrun, initialise the process group once: NCCL when this process computes on
    a GPU (each rank on the GPU of its LOCAL_RANK), gloo when its tensors are on the CPU (NCCL cannot reduce CPU
    tensors, even on a machine that has GPUs)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        where = resolve_device(device)
        if where.type == "cuda":
            torch.cuda.set_device(where)
        dist.init_process_group(distributed_backend(where))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_backend(device: torch.device) -> str:
    """The collective backend for tensors on `device`: nccl on CUDA, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"
