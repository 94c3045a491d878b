"""Hardware profiles for the cost model: peak dense FLOP/s per dtype, memory bandwidth and capacity, interconnect.

GPU numbers are vendor datasheet figures for *dense* math (the "with sparsity" figures halved), each with its
source. Memory capacity is in bytes as the driver counts them: a datasheet's "80GB" H100 is 80 GiB
(85,899,345,920 bytes; `nvidia-smi` reports 81,559 MiB of it as usable, the rest is the driver's), so
`mem_bytes = datasheet GB figure x 2**30`. Interconnect is per GPU and per direction: NVLink on SXM parts (the
datasheet's bidirectional figure halved), PCIe for the L40S; `link_latency_s` is the latency of one hop of a
ring all-reduce (an estimate: NCCL's low-latency protocol on NVLink, ~2 us; PCIe through the host, ~10 us).

What an inference *engine* reaches on that hardware (fractions of peak by matrix shape, per-step overhead, batch
limit, usable memory) is not here but in `tessera.engine` (a fitted table per GPU). The `cpu` profile is measured
on this machine by `calibrate_cpu()` (a few seconds), cached under $TESSERA_HOME/hardware/cpu.json with when and
where it was measured, and refreshed by `tessera cost --gpu cpu --recalibrate`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields

from tessera.errors import TesseraError
from tessera.io import atomic_write_json

TFLOPS = 1e12
GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: dict[str, float]  # peak dense FLOP/s by compute dtype
    mem_bw: float  # bytes/s
    mem_bytes: float  # capacity in bytes (datasheet GB figure x 2**30 for GPUs; RAM for the CPU)
    # The fields below describe an eager engine on this hardware; GPUs take them from their engine profile
    # (`tessera.engine`) and keep these only as the fallback for a hand-made Hardware without one.
    compute_eff: float = 0.7
    bw_eff: float = 0.8
    op_overhead_s: float = 4e-6  # per kernel launch (GPU) or per framework op (CPU)
    usable_mem: float = 0.9  # fraction of memory for weights + KV cache (rest: activations, runtime)
    notes: str = field(default="", compare=False)
    link_bw: float = 0.0  # bytes/s per direction per GPU to its peers (0: no interconnect, TP impossible)
    link_latency_s: float = 0.0  # one hop of a ring all-reduce
    link: str = field(default="", compare=False)  # e.g. "NVLink 4"
    datasheet_gib: float = field(default=0.0, compare=False)  # the datasheet's memory figure ("80GB" -> 80)
    measured_at: str = field(default="", compare=False)  # CPU profile: UTC time of the measurement
    measured_on: str = field(default="", compare=False)  # CPU profile: host and CPU model

    def peak(self, dtype: str) -> float:
        """FLOP/s for a compute dtype; formats a chip lacks fall back to the best one it has (weights upcast)."""
        for d in _FALLBACK[dtype]:
            if d in self.flops:
                return self.flops[d]
        raise TesseraError(f"{self.name} has no FLOP/s figure for {dtype}")

    @staticmethod
    def from_dict(d: dict) -> Hardware:
        """From a cached JSON profile; keys this version does not know are ignored, missing ones take defaults."""
        known = {f.name for f in fields(Hardware)}
        return Hardware(**{k: v for k, v in d.items() if k in known})


_FALLBACK = {"nvfp4": ("nvfp4", "fp8", "bf16", "fp32"), "fp8": ("fp8", "bf16", "fp32"), "bf16": ("bf16", "fp32"),
             "fp16": ("fp16", "bf16", "fp32"), "fp32": ("fp32",)}

_NVLINK4 = {"link_bw": 450 * GB, "link_latency_s": 2e-6, "link": "NVLink 4 (900 GB/s bidirectional)"}
GPUS: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS
    # with sparsity -> 989 / 1,979 dense; HBM3 3.35 TB/s; 80 GB (= 80 GiB; nvidia-smi: 81,559 MiB); NVLink 900 GB/s.
    "h100": Hardware("h100", {"bf16": 989 * TFLOPS, "fp8": 1979 * TFLOPS, "fp32": 67 * TFLOPS}, 3.35e12, 80 * GiB,
                     datasheet_gib=80, **_NVLINK4),
    # NVIDIA H200 SXM datasheet (nvidia.com/en-us/data-center/h200): same Hopper compute as H100; HBM3e 4.8 TB/s;
    # 141 GB; NVLink 900 GB/s.
    "h200": Hardware("h200", {"bf16": 989 * TFLOPS, "fp8": 1979 * TFLOPS, "fp32": 67 * TFLOPS}, 4.8e12, 141 * GiB,
                     datasheet_gib=141, **_NVLINK4),
    # NVIDIA A100 80GB SXM datasheet (nvidia.com/en-us/data-center/a100): BF16 312 TFLOPS dense, no FP8/FP4 units;
    # HBM2e 2,039 GB/s; 80 GB; NVLink 3 600 GB/s.
    "a100": Hardware("a100", {"bf16": 312 * TFLOPS, "fp32": 19.5 * TFLOPS}, 2.039e12, 80 * GiB, datasheet_gib=80,
                     link_bw=300 * GB, link_latency_s=2e-6, link="NVLink 3 (600 GB/s bidirectional)"),
    # NVIDIA HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): per GPU FP4 18 PF, FP8 9 PF, BF16 4.5 PF with
    # sparsity -> 9 / 4.5 / 2.25 PF dense; HBM3e 8 TB/s; 180 GB per GPU in HGX B200; NVLink 5 1.8 TB/s.
    "b200": Hardware("b200", {"bf16": 2250 * TFLOPS, "fp8": 4500 * TFLOPS, "nvfp4": 9000 * TFLOPS,
                              "fp32": 75 * TFLOPS}, 8.0e12, 180 * GiB, datasheet_gib=180,
                     link_bw=900 * GB, link_latency_s=2e-6, link="NVLink 5 (1.8 TB/s bidirectional)"),
    # NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 362 TFLOPS and FP8 733 TFLOPS dense
    # (733 / 1,466 with sparsity); GDDR6 864 GB/s; 48 GB; no NVLink: PCIe Gen4 x16, 64 GB/s bidirectional.
    "l40s": Hardware("l40s", {"bf16": 362 * TFLOPS, "fp8": 733 * TFLOPS, "fp32": 91.6 * TFLOPS}, 864 * GB, 48 * GiB,
                     datasheet_gib=48, link_bw=32 * GB, link_latency_s=10e-6, link="PCIe Gen4 x16 (64 GB/s bidirectional)"),
}


def get_hardware(name: str, *, recalibrate: bool = False) -> Hardware:
    name = name.lower()
    if name == "cpu":
        return cpu_profile(recalibrate=recalibrate)
    if name not in GPUS:
        raise TesseraError(f"unknown hardware {name!r}; choose from {', '.join([*GPUS, 'cpu'])}")
    if recalibrate:
        raise TesseraError(f"--recalibrate measures this machine's cpu profile; {name} is a datasheet profile "
                           "(use --gpu cpu --recalibrate)")
    return GPUS[name]


def cpu_profile_path():
    from tessera.checkpoint import tessera_home

    return tessera_home() / "hardware" / "cpu.json"


def cpu_profile(recalibrate: bool = False) -> Hardware:
    path = cpu_profile_path()
    if path.is_file() and not recalibrate:
        try:
            return Hardware.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            pass  # a damaged cache is measured again
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


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate_cpu() -> Hardware:
    """Measure this CPU: streaming matrix-vector bandwidth (what decode does), fp32 matmul FLOP/s, op overhead.

    Bandwidth is measured with the operation decode actually runs (a GEMV over a large weight matrix), so the
    profile predicts decode directly; capacity is the machine's RAM. The profile records when (UTC) and where
    (host, CPU model, torch threads) it was measured.
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
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    where = f"{platform.node()}, {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
            f"{torch.get_num_threads()} threads"
    return Hardware(
        name="cpu",
        flops={"fp32": 2 * 1024**3 / mm_s},
        mem_bw=w.numel() * 4 / gemv_s,
        mem_bytes=float(mem),
        compute_eff=1.0,  # measured, not peak
        bw_eff=1.0,
        op_overhead_s=overhead_s,
        notes=f"calibrated {when} on {where}",
        measured_at=when,
        measured_on=where,
    )
