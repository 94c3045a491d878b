"""Hardware profiles for the cost model: peak dense FLOP/s per dtype, memory bandwidth and capacity.

GPU numbers are vendor datasheet peaks for *dense* math (the "with sparsity" figures halved), each with its
source. Achievable fractions (`compute_eff`, `bw_eff`) are what well-tuned inference engines reach on large
matrix products and streaming reads; `op_overhead_s` is the fixed cost of one kernel launch / framework op,
which dominates small models at small batch. The `cpu` profile is measured on this machine by
`calibrate_cpu()` (a few seconds) and cached under $TESSERA_HOME/hardware/cpu.json.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from tessera.errors import TesseraError
from tessera.io import atomic_write_json

TFLOPS = 1e12
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: dict[str, float]  # peak dense FLOP/s by compute dtype
    mem_bw: float  # bytes/s
    mem_bytes: float  # capacity
    compute_eff: float = 0.7
    bw_eff: float = 0.8
    op_overhead_s: float = 4e-6  # per kernel launch (GPU) or per framework op (CPU)
    usable_mem: float = 0.9  # fraction of memory for weights + KV cache (rest: activations, runtime)
    notes: str = field(default="", compare=False)

    def peak(self, dtype: str) -> float:
        """FLOP/s for a compute dtype; formats a chip lacks fall back to the best one it has (weights upcast)."""
        for d in _FALLBACK[dtype]:
            if d in self.flops:
                return self.flops[d]
        raise TesseraError(f"{self.name} has no FLOP/s figure for {dtype}")


_FALLBACK = {"nvfp4": ("nvfp4", "fp8", "bf16", "fp32"), "fp8": ("fp8", "bf16", "fp32"), "bf16": ("bf16", "fp32"),
             "fp32": ("fp32",)}

GPUS: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS
    # with sparsity -> 989 / 1,979 dense; HBM3 3.35 TB/s; 80 GB.
    "h100": Hardware("h100", {"bf16": 989 * TFLOPS, "fp8": 1979 * TFLOPS, "fp32": 67 * TFLOPS}, 3.35e12, 80 * GB),
    # NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): same Hopper compute as H100; HBM3e 4.8 TB/s;
    # 141 GB.
    "h200": Hardware("h200", {"bf16": 989 * TFLOPS, "fp8": 1979 * TFLOPS, "fp32": 67 * TFLOPS}, 4.8e12, 141 * GB),
    # NVIDIA A100 80GB SXM datasheet (nvidia.com/en-us/data-center/a100): BF16 312 TFLOPS dense, no FP8/FP4 units;
    # HBM2e 2,039 GB/s; 80 GB.
    "a100": Hardware("a100", {"bf16": 312 * TFLOPS, "fp32": 19.5 * TFLOPS}, 2.039e12, 80 * GB),
    # NVIDIA HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): per GPU FP4 18 PF, FP8 9 PF, BF16 4.5 PF with
    # sparsity -> 9 / 4.5 / 2.25 PF dense; HBM3e 8 TB/s; 180 GB usable per GPU in HGX B200.
    "b200": Hardware("b200", {"bf16": 2250 * TFLOPS, "fp8": 4500 * TFLOPS, "nvfp4": 9000 * TFLOPS,
                              "fp32": 75 * TFLOPS}, 8.0e12, 180 * GB),
    # NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 362 TFLOPS and FP8 733 TFLOPS dense
    # (733 / 1,466 with sparsity); GDDR6 864 GB/s; 48 GB.
    "l40s": Hardware("l40s", {"bf16": 362 * TFLOPS, "fp8": 733 * TFLOPS, "fp32": 91.6 * TFLOPS}, 864 * GB, 48 * GB),
}


def get_hardware(name: str, *, recalibrate: bool = False) -> Hardware:
    name = name.lower()
    if name == "cpu":
        return cpu_profile(recalibrate=recalibrate)
    if name not in GPUS:
        raise TesseraError(f"unknown hardware {name!r}; choose from {', '.join([*GPUS, 'cpu'])}")
    return GPUS[name]


def cpu_profile(recalibrate: bool = False) -> Hardware:
    from tessera.checkpoint import tessera_home

    path = tessera_home() / "hardware" / "cpu.json"
    if path.is_file() and not recalibrate:
        return Hardware(**json.loads(path.read_text()))
    hw = calibrate_cpu()
    atomic_write_json(path, asdict(hw))
    return hw


def _best_of(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate_cpu() -> Hardware:
    """Measure this CPU: streaming matrix-vector bandwidth (what decode does), fp32 matmul FLOP/s, op overhead.

    Bandwidth is measured with the operation decode actually runs (a GEMV over a large weight matrix), so the
    profile predicts decode directly; capacity is the machine's RAM.
    """
    import torch

    w = torch.randn(8192, 8192)  # 256 MiB, far larger than any cache
    x = torch.randn(8192)
    gemv_s = _best_of(lambda: torch.mv(w, x))
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm_s = _best_of(lambda: a @ b)
    small = torch.randn(1, 64)
    n_ops = 2000
    overhead_s = _best_of(lambda: [small + 1.0 for _ in range(n_ops)], reps=3) / n_ops
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(
        name="cpu",
        flops={"fp32": 2 * 1024**3 / mm_s},
        mem_bw=w.numel() * 4 / gemv_s,
        mem_bytes=float(mem),
        compute_eff=1.0,  # measured, not peak
        bw_eff=1.0,
        op_overhead_s=overhead_s,
        notes=f"calibrated {time.strftime('%Y-%m-%d %H:%M')}, torch threads {torch.get_num_threads()}",
    )
