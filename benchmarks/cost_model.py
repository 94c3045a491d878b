"""Validate and calibrate the cost model: predicted vs measured CPU speed-ups of children of the default parent;
predicted H100 speed-ups of Llama-3.1-Minitron-4B (width / depth) over Llama-3.1-8B vs the published ones; and
predicted vs published H100 FP8 serving throughput of Llama-3.1-70B (TP1 and TP4, the Nemotron-51B blog's
Table 3) and, never fitted, of Nemotron-51B.

GPU part: `--fit` fits the H100 serving-engine profile (`tessera/engine_profiles.json`) by least squares to
the eleven Llama-3.1-70B numbers and the two Minitron speed-ups only, printing every parameter, every residual
and each point's leave-one-out error (refit without it, predict it); `--write` stores the fitted profile.

CPU part: each child is built from the parent's ArchSpec with random weights (speed does not depend on weight
values). Runs alternate parent, child, parent, child... and each speed-up is the median of ratios of adjacent
runs, so machine noise hits both sides alike. The prediction uses the `cpu` profile calibrated on this machine.

    .venv/bin/python benchmarks/cost_model.py [--scenario 128/64] [--reps 5] [--skip-cpu] [--fit [--write]]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.bench import run_once
from tessera.checkpoint import _finish, default_parent_dir
from tessera.cost import Scenario, max_batch, predict
from tessera.engine import PROFILES_PATH, EngineProfile, engine_profile
from tessera.errors import TesseraError
from tessera.formats import read_config
from tessera.hardware import GPUS, Hardware, get_hardware
from tessera.io import atomic_write_text
from tessera.model import Transformer

CONFIGS = Path(__file__).parent / "configs"
# NVIDIA's Minitron blog reports average throughput over input/output length combinations, BF16, TensorRT-LLM,
# one H100 80GB: depth-pruned 2.7x and width-pruned 1.8x Llama-3.1-8B.
PUBLISHED = {"llama-3.1-minitron-4b-width": 1.8, "llama-3.1-minitron-4b-depth": 2.7}
H100_SCENARIOS = ["128/128", "128/2048", "2048/128", "2048/2048"]


def children(parent: ArchSpec) -> dict[str, ArchSpec]:
    n, ffn, kv = parent.num_layers, parent.blocks[0].ffn.intermediate_size, parent.kv_heads(0)
    mixed = []
    for i in range(n):
        if i % 6 == 3:
            att = AttentionSpec("no_op")
        elif i % 6 == 5:
            att = AttentionSpec("linear")
        else:
            att = AttentionSpec("gqa", 1 if i % 2 else kv)
        width = (ffn, ffn // 2, ffn // 4)[i % 3]
        f = FFNSpec("no_op") if i % 10 == 9 else FFNSpec("swiglu", width)
        mixed.append(BlockSpec(att, f))
    return {
        "ffn-50%": parent.with_blocks([BlockSpec(b.attention, FFNSpec("swiglu", ffn // 2)) for b in parent.blocks]),
        "half-layers": parent.with_blocks(parent.blocks[::2]),
        "kv-heads-1": parent.with_blocks([BlockSpec(AttentionSpec("gqa", 1), b.ffn) for b in parent.blocks]),
        "mixed": parent.with_blocks(mixed),
        "no-attention-half": parent.with_blocks(
            [BlockSpec(AttentionSpec("no_op") if i % 2 else b.attention, b.ffn) for i, b in enumerate(parent.blocks)]),
    }


def build(arch: ArchSpec) -> Transformer:
    torch.manual_seed(0)
    return _finish(Transformer(arch)).eval()


def cpu_validation(scenario: Scenario, reps: int) -> list[tuple]:
    parent_arch = read_config(default_parent_dir())
    cpu = get_hardware("cpu", recalibrate=True)
    print(f"cpu profile: {cpu.mem_bw / 1e9:.1f} GB/s GEMV bandwidth, {cpu.flops['fp32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{cpu.op_overhead_s * 1e6:.1f} us per op")
    parent = build(parent_arch)
    pred_parent = predict(parent_arch, cpu, scenario, dtype="fp32", batch=1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, arch in children(parent_arch).items():
        child = build(arch)
        for m in (parent, child):  # warm-up
            run_once(m, 1, scenario, gen)
        dec, e2e = [], []
        for _ in range(reps):
            p = run_once(parent, 1, scenario, gen)
            c = run_once(child, 1, scenario, gen)
            dec.append(p[1] / c[1])
            e2e.append(sum(p) / sum(c))
        pred = predict(arch, cpu, scenario, dtype="fp32", batch=1)
        rows.append((name, arch.num_params() / parent_arch.num_params(), statistics.median(dec),
                     pred.decode_tokens_per_s / pred_parent.decode_tokens_per_s, statistics.median(e2e),
                     pred.output_tokens_per_s / pred_parent.output_tokens_per_s))
        del child
    print(f"\nCPU, fp32, batch 1, scenario {scenario}, {reps} alternating pairs (speed-up = child / parent)")
    print(f"{'child':>18} {'params':>7} {'decode meas':>11} {'pred':>6} {'err':>6} {'e2e meas':>9} {'pred':>6} {'err':>6}")
    for name, frac, dm, dp, em, ep in rows:
        print(f"{name:>18} {frac:7.2f} {dm:11.2f} {dp:6.2f} {dp / dm - 1:+6.0%} {em:9.2f} {ep:6.2f} {ep / em - 1:+6.0%}")
    return rows


def gpu_predictions(profile: EngineProfile | None = None) -> None:
    hw = GPUS["h100"]
    base = read_config(CONFIGS / "llama-3.1-8b")
    print("\nH100 (bf16, best batch that fits, per GPU) predicted speed-up over Llama-3.1-8B")
    print(f"{'model':>30} " + " ".join(f"{s:>10}" for s in H100_SCENARIOS) + f" {'mean':>6} {'published':>9}")
    for name, published in PUBLISHED.items():
        arch = read_config(CONFIGS / name)
        ratios = []
        for s in H100_SCENARIOS:
            sc = Scenario.parse(s)
            ratios.append(predict(arch, hw, sc, engine=profile).output_tokens_per_s
                          / predict(base, hw, sc, engine=profile).output_tokens_per_s)
        mean = statistics.mean(ratios)
        print(f"{name:>30} " + " ".join(f"{r:10.2f}" for r in ratios) + f" {mean:6.2f} {published:9.1f}")


# ---------------------------------------------------------------------------- published serving numbers
BLOG = "seeds/002: NVIDIA blog 'Llama-3.1-Nemotron-51B', Table 3 (tokens/s per H100, FP8, TensorRT-LLM)"
# Llama-3.1-70B: the "Llama-3.1-70B-Instruct" column (TP4, except 128/128 at TP1) and the "Llama (TP1)" column.
# 128/128 is TP1 in both columns: eleven distinct numbers.
LLAMA_70B = {("128/128", 1): 2645, ("128/1024", 4): 2975, ("128/2048", 4): 2786, ("128/4096", 4): 1828,
             ("2048/128", 4): 339, ("2048/2048", 4): 1336, ("128/1024", 1): 1274, ("128/2048", 1): 646,
             ("128/4096", 1): 313, ("2048/128", 1): 300, ("2048/2048", 1): 319}
# Checked, never fitted: Nemotron-51B's column (its TP per row) and the 40B's two numbers (Table 4).
NEMOTRON_51B = {("128/128", 1): 5478, ("128/1024", 1): 6472, ("128/2048", 2): 4910, ("128/4096", 2): 3855,
                ("2048/128", 1): 653, ("2048/2048", 2): 2622}
NEMOTRON_40B = {"128/1024": 9568, "2048/128": 862}
M_GRID = tuple(2**i for i in range(0, 17, 2))  # 1 .. 65,536 tokens in a GEMM
N_GRID = tuple(2**i for i in range(14, 33, 2))  # 16 KiB .. 4 GiB per matrix shard
BATCH_LIMITS = (128, 256, 512, 1024, 2048)  # engine batch limits tried (TensorRT-LLM's default is 256)
FIXED = {"op_overhead_s": 2e-6, "act_bytes": 2.0}  # not fitted
# TensorRT-LLM's default kv_cache_free_gpu_mem_fraction: the KV cache takes 90% of the memory left after the
# weights and activations (not fitted)
KV_FREE = 0.9


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class Params:
    """The fitted engine parameters (each printed); the profile's tables are tabulated from them."""

    flop_max: float  # best fraction of dense peak (large GEMMs)
    m_half: float  # tokens in a GEMM at which half of flop_max is reached
    bw_max: float  # best fraction of memory bandwidth (large matrices)
    matrix_latency_s: float  # fixed time per matrix read: bandwidth fraction = bw_max x n / (n + latency x bw)
    kv_bw: float  # fraction of memory bandwidth attention reaches reading the KV cache
    step_overhead_s: float
    reserved_gb: float  # activations + runtime; the KV cache gets KV_FREE of what weights and this leave
    max_batch: int

    def vector(self) -> np.ndarray:
        return np.array([_logit(self.flop_max), math.log(self.m_half), _logit(self.bw_max),
                         _logit(self.matrix_latency_s / 20e-6), _logit(self.kv_bw), math.log(self.step_overhead_s),
                         _logit(self.reserved_gb / 8)])

    @staticmethod
    def of(v: np.ndarray, max_batch: int) -> Params:
        return Params(_sig(v[0]), math.exp(v[1]), _sig(v[2]), 20e-6 * _sig(v[3]), _sig(v[4]), math.exp(v[5]),
                      8 * _sig(v[6]), max_batch)

    def profile(self, source: str = "") -> EngineProfile:
        return EngineProfile("h100-trtllm-fit", tuple((m, self.flop_max * m / (m + self.m_half)) for m in M_GRID),
                             tuple((n, self.bw_max * n / (n + self.bytes_half)) for n in N_GRID),
                             self.step_overhead_s, FIXED["op_overhead_s"], 0.9, self.max_batch,
                             FIXED["act_bytes"], "gpu", source, ((1, self.kv_bw),), KV_FREE, self.reserved_gb * 2**30)

    @property
    def bytes_half(self) -> float:
        return self.matrix_latency_s * self.bw_max * GPUS["h100"].mem_bw


START = Params(0.5, 170, 0.86, 5e-6, 0.6, 3e-4, 2.0, 512)


@dataclass(frozen=True)
class Point:
    label: str
    published: float
    predict: Callable[[EngineProfile], float]


def fit_points() -> list[Point]:
    """The thirteen published numbers the profile is fitted to: eleven Llama-3.1-70B throughputs and the two
    Minitron-4B mean speed-ups over Llama-3.1-8B."""
    hw = GPUS["h100"]
    llama = read_config(CONFIGS / "llama-3.1-70b")
    pts = [Point(f"70B {s} TP{tp}", v, lambda e, s=s, tp=tp: at_limit(llama, hw, Scenario.parse(s), e, dtype="fp8",
                                                                         tp=tp))
           for (s, tp), v in LLAMA_70B.items()]
    base = read_config(CONFIGS / "llama-3.1-8b")
    for name, published in PUBLISHED.items():
        arch = read_config(CONFIGS / name)
        pts.append(Point(f"{name.removeprefix('llama-3.1-')} speed-up", published,
                         lambda e, arch=arch: minitron_speedup(arch, base, hw, e)))
    return pts


def at_limit(arch: ArchSpec, hw: Hardware, sc: Scenario, engine: EngineProfile, **kw) -> float:
    """Output tok/s per GPU at the largest batch that fits (what batch='auto' picks whenever throughput grows
    with the batch, as it does at every point here: the table check below runs the auto search), 10x faster."""
    return predict(arch, hw, sc, batch=max_batch(arch, hw, sc, engine=engine, **kw), engine=engine,
                   **kw).output_tokens_per_s


def minitron_speedup(arch: ArchSpec, base: ArchSpec, hw: Hardware, engine: EngineProfile | None = None) -> float:
    """Mean over H100_SCENARIOS of the child's bf16 throughput over Llama-3.1-8B's, each at its largest batch."""
    engine = engine or engine_profile(hw)
    return statistics.mean(at_limit(arch, hw, Scenario.parse(s), engine) / at_limit(base, hw, Scenario.parse(s), engine)
                           for s in H100_SCENARIOS)


def _residuals(v: np.ndarray, max_batch: int, points: list[Point]) -> np.ndarray:
    e = Params.of(v, max_batch).profile()
    out = []
    for p in points:
        try:
            out.append(math.log(p.predict(e) / p.published))
        except TesseraError:  # parameters under which the model does not fit: far off, so the fit moves away
            out.append(math.log(0.01))
    return np.array(out)


def fit(points: list[Point], start: Params = START, limits: tuple[int, ...] = BATCH_LIMITS) -> tuple[Params, np.ndarray]:
    """Least squares on log(predicted / published), continuous parameters by scipy (finite differences with a
    step large enough to see the integer batch move), the engine batch limit by trying each of `limits`."""
    from scipy.optimize import least_squares

    best = None
    for mb in limits:
        r = least_squares(_residuals, start.vector(), args=(mb, points), diff_step=0.05, max_nfev=300)
        if best is None or r.cost < best[1].cost:
            best = (mb, r)
    mb, r = best
    return Params.of(r.x, mb), r.fun


def gpu_fit(write: bool, loo: bool) -> EngineProfile:
    points = fit_points()
    t0 = time.process_time()
    params, res = fit(points)
    print(f"\nEngine profile fit (H100, least squares on log(predicted / published), {len(points)} points: "
          f"{len(LLAMA_70B)} Llama-3.1-70B throughputs from {BLOG}, 2 Minitron-4B speed-ups)")
    for f in fields(Params):
        print(f"  {f.name:>16} = {getattr(params, f.name):.6g}")
    print(f"  fixed (not fitted): {FIXED}, KV cache {KV_FREE} of the free memory (TensorRT-LLM's default); "
          f"batch limit chosen from {BATCH_LIMITS}")
    print(f"  rms log residual {math.sqrt(float(np.mean(res**2))):.3f}  ({time.process_time() - t0:.1f} s CPU)")
    loo_err = {}
    if loo:
        for i, p in enumerate(points):
            rest = points[:i] + points[i + 1:]
            q, _ = fit(rest, params, (params.max_batch,))
            loo_err[p.label] = p.predict(q.profile()) / p.published - 1
    profile = params.profile(
        f"fitted {time.strftime('%Y-%m-%d', time.gmtime())} by benchmarks/cost_model.py to {len(LLAMA_70B)} "
        f"Llama-3.1-70B FP8 throughputs (NVIDIA Nemotron-51B blog, TensorRT-LLM) and 2 Minitron-4B speed-ups")
    print(f"\n{'point':>28} {'published':>10} {'fitted':>10} {'resid':>7} {'leave-one-out':>14}")
    for p, r in zip(points, res):
        fmt = "{:10.0f}" if p.published > 100 else "{:10.2f}"
        print(f"{p.label:>28} " + fmt.format(p.published) + " " + fmt.format(p.predict(profile))
              + f" {math.exp(r) - 1:+7.1%} " + (f"{loo_err[p.label]:+14.1%}" if loo else f"{'-':>14}"))
    if loo:
        print(f"  leave-one-out: mean |error| {statistics.mean(abs(x) for x in loo_err.values()):.1%}, "
              f"max {max(abs(x) for x in loo_err.values()):.1%}")
    if write:
        write_profile(params, res, loo_err, profile)
    return profile


def write_profile(params: Params, res: np.ndarray, loo_err: dict[str, float], profile: EngineProfile) -> None:
    data = json.loads(PROFILES_PATH.read_text())
    entry = profile.as_dict()
    entry["engine"] = "TensorRT-LLM-class serving engine (in-flight batching, CUDA graphs, FP8 GEMMs), fitted"
    entry["fit"] = {"params": asdict(params), "fixed": FIXED, "rms_log_residual": math.sqrt(float(np.mean(res**2))),
                    "residuals": [round(math.exp(r) - 1, 4) for r in res],
                    "leave_one_out": {k: round(v, 4) for k, v in loo_err.items()},
                    "data": [BLOG, "seeds/001 + Minitron blog: Minitron-4B width 1.8x, depth 2.7x over Llama-3.1-8B"]}
    data["h100"] = entry
    atomic_write_text(PROFILES_PATH, dump_profiles(data))
    print(f"wrote {PROFILES_PATH}")


def dump_profiles(data: dict) -> str:
    """JSON with each table point on one line and numbers to 5 significant digits (the file is read by people)."""

    def tidy(x):
        if isinstance(x, float):
            return int(x) if x.is_integer() and abs(x) >= 1 else float(f"{x:.5g}")
        if isinstance(x, dict):
            return {k: tidy(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [tidy(v) for v in x]
        return x

    text = json.dumps(tidy(data), indent=1)
    return re.sub(r"\[\s+([-\d.e+]+),\s+([-\d.e+]+)\s+\]", r"[\1, \2]", text) + "\n"


def table_check(profile: EngineProfile | None = None) -> list[tuple[str, float, float]]:
    """Predicted vs published, side by side: the eleven Llama-3.1-70B numbers (fitted) and the Nemotron rows
    (never fitted)."""
    hw = GPUS["h100"]
    rows = []
    print(f"\nH100, FP8 weights + FP8 KV cache, engine profile {(profile or engine_profile(hw)).name}: "
          "output tok/s per GPU, predicted vs published")
    print(f"{'model':>14} {'scenario':>10} {'TP':>3} {'batch':>6} {'bound':>7} {'predicted':>10} {'published':>10} "
          f"{'err':>7}")
    for name, table, fitted in (("llama-3.1-70b", LLAMA_70B, True), ("llama-3.1-nemotron-51b", NEMOTRON_51B, False)):
        arch = read_config(CONFIGS / name)
        for (s, tp), pub in table.items():
            p = predict(arch, hw, Scenario.parse(s), dtype="fp8", tp=tp, engine=profile)
            err = p.output_tokens_per_s / pub - 1
            rows.append((f"{name} {s} TP{tp}", p.output_tokens_per_s, pub))
            print(f"{name.removeprefix('llama-3.1-'):>14} {s:>10} {tp:3d} {p.batch:6d} {p.batch_bound:>7} "
                  f"{p.output_tokens_per_s:10.0f} {pub:10d} {err:+7.1%}" + ("" if fitted else "  (not fitted)"))
    print(f"{'nemotron-40b':>14}: published {NEMOTRON_40B} - no architecture in our sources, not checked")
    llama = read_config(CONFIGS / "llama-3.1-70b")
    nem = read_config(CONFIGS / "llama-3.1-nemotron-51b")
    print("\nNemotron-51B / Llama-3.1-70B ratio (Table 3's 'Ratio' column, each at its published TP)")
    for (s, tp), pub in NEMOTRON_51B.items():
        ltp = 1 if s == "128/128" else 4
        pl = predict(llama, hw, Scenario.parse(s), dtype="fp8", tp=ltp, engine=profile).output_tokens_per_s
        pn = predict(nem, hw, Scenario.parse(s), dtype="fp8", tp=tp, engine=profile).output_tokens_per_s
        print(f"  {s:>10}: predicted {pn / pl:5.2f}  published {pub / LLAMA_70B[(s, ltp)]:5.2f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="128/64")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--fit", action="store_true", help="fit the H100 engine profile (with leave-one-out)")
    ap.add_argument("--no-loo", action="store_true", help="with --fit: skip the leave-one-out refits")
    ap.add_argument("--write", action="store_true", help="with --fit: store the fitted profile in the package")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not args.skip_cpu:
        cpu_validation(Scenario.parse(args.scenario), args.reps)
    profile = gpu_fit(args.write, not args.no_loo) if args.fit else None
    gpu_predictions(profile)
    rows = table_check(profile)
    within = sum(abs(pred / pub - 1) <= 0.25 for _, pred, pub in rows[:len(LLAMA_70B)])
    print(f"\nLlama-3.1-70B: {within} of {len(LLAMA_70B)} within +-25% of the published numbers")


if __name__ == "__main__":
    main()
