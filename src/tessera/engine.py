"""Serving-engine profiles: what a real inference engine reaches on a GPU, as data.

The roofline in `tessera.cost` needs the few numbers a datasheet cannot give:

* `flop_fraction`: achievable fraction of the dense peak as a function of the GEMM's M (tokens in the step):
  a decode step of batch 8 runs its matrices far below peak, a 16k-token prefill close to the engine's best;
* `bw_fraction`: achievable fraction of memory bandwidth as a function of the bytes one matrix occupies on
  one GPU (small matrices, as tensor parallelism makes them, stream less efficiently);
* `kv_bw_fraction`: the same for attention's KV-cache reads, as a function of the bytes one decode step reads
  on one GPU (paged, per-sequence reads: empty means `bw_fraction`);
* `step_overhead_s`: fixed cost of one engine iteration (scheduling, sampling, host work);
* `op_overhead_s` and `ops`: per-kernel launch cost and kernels per sub-block (eager CPU engines run many ops);
* memory: either `usable_mem`, the fraction of the GPU's memory the engine gives to weights + KV cache, or
  (`kv_free_fraction` > 0) TensorRT-LLM's rule: the KV cache gets `kv_free_fraction` of what is left after
  the weights and `reserved_bytes` of activations and runtime;
* `max_batch`: the engine's batch limit (requests in flight);
* `act_bytes`: bytes per activation element in tensor-parallel all-reduces.

The tables are piecewise linear in x, clamped at both ends. GPU profiles live in `engine_profiles.json`
beside this module: written by `benchmarks/cost_model.py --write`, which fits them to published serving
numbers and records the fit's inputs, parameters and residuals there. A GPU without published numbers to fit
borrows another's fractions (`"like"`), and says so. The `cpu` profile is the measured eager-PyTorch one,
built from the calibrated `cpu` hardware profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tessera.errors import TesseraError
from tessera.hardware import Hardware

PROFILES_PATH = Path(__file__).with_name("engine_profiles.json")
# Kernels (GPU) or framework ops (eager CPU) per sub-block per forward. Eager PyTorch on CPU runs many small
# ops (views, rope, norms): measured from tessera's profile (~2,000 ops per SmolLM2 step); fused GPU engines
# launch a handful of kernels.
OPS = {
    "cpu": {"gqa": 40, "linear": 6, "swiglu": 14, "ffn_linear": 6, "no_op": 0, "model": 20},
    "gpu": {"gqa": 6, "linear": 2, "swiglu": 3, "ffn_linear": 2, "no_op": 0, "model": 4},
}


@dataclass(frozen=True)
class EngineProfile:
    name: str
    flop_fraction: tuple[tuple[float, float], ...]  # (M tokens in the GEMM, fraction of dense peak)
    bw_fraction: tuple[tuple[float, float], ...]  # (bytes of one matrix on one GPU, fraction of bandwidth)
    step_overhead_s: float = 0.0
    op_overhead_s: float = 4e-6
    usable_mem: float = 0.9
    max_batch: int = 4096
    act_bytes: float = 2.0
    ops: str = "gpu"  # key into OPS
    source: str = field(default="", compare=False)
    kv_bw_fraction: tuple[tuple[float, float], ...] = ()  # (KV bytes one decode step reads on one GPU, fraction)
    kv_free_fraction: float = 0.0  # > 0: KV cache = this x (capacity - weights - reserved_bytes)
    reserved_bytes: float = 0.0

    def __post_init__(self):
        for what, table in (("flop_fraction", self.flop_fraction), ("bw_fraction", self.bw_fraction),
                            ("kv_bw_fraction", self.kv_bw_fraction)):
            table = tuple(sorted((float(x), float(y)) for x, y in table))
            if (not table and what != "kv_bw_fraction") or any(x <= 0 or not 0 < y <= 1 for x, y in table):
                raise TesseraError(f"engine profile {self.name}: {what} needs (x > 0, 0 < fraction <= 1) points")
            object.__setattr__(self, what, table)
        if (not 0 < self.usable_mem <= 1 or not 0 <= self.kv_free_fraction <= 1 or self.reserved_bytes < 0
                or self.max_batch < 1 or self.ops not in OPS):
            raise TesseraError(f"engine profile {self.name}: usable_mem and kv_free_fraction must be fractions, "
                               f"reserved_bytes >= 0, max_batch >= 1, ops one of {', '.join(OPS)}")

    def flops_at(self, m: float) -> float:
        """Achievable fraction of peak FLOP/s for a GEMM over `m` tokens."""
        return _interp(self.flop_fraction, m)

    def bw_at(self, matrix_bytes: float) -> float:
        """Achievable fraction of memory bandwidth when streaming a matrix of `matrix_bytes` (one GPU's shard)."""
        return _interp(self.bw_fraction, matrix_bytes)

    def kv_bw_at(self, step_bytes):
        """Achievable fraction of memory bandwidth for attention reading `step_bytes` of KV cache in one step."""
        return _interp(self.kv_bw_fraction or self.bw_fraction, step_bytes)

    def memory_budget(self, capacity: float, weights: float) -> float:
        """Bytes one GPU of `capacity` gives to weights + KV cache when it holds `weights` of weights; below
        `weights` when they do not fit."""
        if self.kv_free_fraction <= 0:
            return capacity * self.usable_mem
        free = capacity - self.reserved_bytes - weights
        return weights + self.kv_free_fraction * free if free > 0 else capacity - self.reserved_bytes

    def op_count(self, kind: str) -> int:
        return OPS[self.ops][kind]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "flop_fraction": [list(p) for p in self.flop_fraction],
                "bw_fraction": [list(p) for p in self.bw_fraction], "step_overhead_s": self.step_overhead_s,
                "op_overhead_s": self.op_overhead_s, "usable_mem": self.usable_mem, "max_batch": self.max_batch,
                "act_bytes": self.act_bytes, "ops": self.ops, "source": self.source,
                "kv_bw_fraction": [list(p) for p in self.kv_bw_fraction], "kv_free_fraction": self.kv_free_fraction,
                "reserved_bytes": self.reserved_bytes}

    @staticmethod
    def from_dict(d: dict[str, Any], name: str = "") -> EngineProfile:
        keys = ("flop_fraction", "bw_fraction", "step_overhead_s", "op_overhead_s", "usable_mem", "max_batch",
                "act_bytes", "ops", "source", "kv_bw_fraction", "kv_free_fraction", "reserved_bytes")
        try:
            return EngineProfile(d.get("name", name), **{k: d[k] for k in keys if k in d})
        except TypeError as exc:
            raise TesseraError(f"engine profile {name or d.get('name')!r} is malformed ({exc})") from None


def _interp(table: tuple[tuple[float, float], ...], x):
    """Linear interpolation, clamped at both ends. Linear in x (not log x) keeps time = x / fraction(x)
    increasing in x between points, so a bigger matrix or cache never costs less."""
    xs, ys = zip(*table)
    out = np.interp(x, xs, ys)
    return float(out) if np.ndim(out) == 0 else out


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TesseraError(f"cannot read the engine profiles {path} ({exc}); reinstall tessera") from None


def gpu_profiles(path: Path = PROFILES_PATH) -> dict[str, EngineProfile]:
    """Every GPU's engine profile from the data file (entries with `"like"` borrow another GPU's numbers)."""
    raw = {k: v for k, v in _load(str(path)).items() if not k.startswith("_")}
    out = {}
    for gpu, d in raw.items():
        if "like" in d:
            base = raw.get(d["like"])
            if base is None or "like" in base:
                raise TesseraError(f"engine profile {gpu}: 'like' must name a GPU with its own numbers")
            d = {**base, **{k: v for k, v in d.items() if k != "like"},
                 "source": f"{d.get('note', '')} (numbers of {d['like']}: {base.get('source', '')})".strip()}
        out[gpu] = EngineProfile.from_dict(d, gpu)
    return out


def engine_profile(hw: Hardware) -> EngineProfile:
    """The engine profile for a hardware profile: the fitted table for a known GPU; for the measured `cpu`, the
    eager-PyTorch engine (fractions 1, measured per-op overhead); for a hand-made Hardware, its own fields."""
    if hw.name == "cpu":
        return EngineProfile("eager-pytorch-cpu", ((1, hw.compute_eff),), ((1, hw.bw_eff),), 0.0, hw.op_overhead_s,
                             hw.usable_mem, 4096, 4.0, "cpu", source=f"measured: {hw.notes}")
    profiles = gpu_profiles()
    if hw.name in profiles:
        from tessera.hardware import GPUS

        if GPUS.get(hw.name) == hw:  # a modified copy of a datasheet profile keeps its own fields below
            return profiles[hw.name]
    return EngineProfile(f"roofline-{hw.name}", ((1, hw.compute_eff),), ((1, hw.bw_eff),), 0.0, hw.op_overhead_s,
                         hw.usable_mem, 4096, 2.0, "gpu", source="the Hardware's own efficiency fields")


def with_params(profile: EngineProfile, **changes: Any) -> EngineProfile:
    """A copy with some fields changed (what the fit in benchmarks/cost_model.py varies)."""
    return replace(profile, **changes)
