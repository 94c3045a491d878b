"""Puzzle's search at scale, and how well measured per-block costs predict an assembled child's measured speed.

Part 1 (`--part mip`): the MIP at the paper's scale: Llama-3.1-70B (80 layers), 6 attention x 9 FFN variants per
layer (54 pairs), 5 constraints, costs predicted by the cost model for an H100 in FP8. Scores are synthetic (no
70B here): per-layer importance x how much of the sub-block a variant removes, with noise. Prints the wall time of
`tessera.puzzle.mip.solve` (median of --reps), one solution and five diverse ones.

Part 2 (`--part measured`): on this CPU, per-variant prefill/decode times of the default parent's (SmolLM2-135M)
block library are measured (`measured_costs`), the MIP picks children at 1.25x / 1.5x / 2x decode speed-up, and
each child is built (random weights: speed does not depend on them) and timed with `tessera.bench.run_once`
alternately with the parent. Prints predicted vs measured decode seconds and speed-up, and the error.

    .venv/bin/python benchmarks/puzzle_mip.py [--part mip|measured|all] [--scenario 128/64] [--batch 1 8]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

from tessera.arch import ArchSpec
from tessera.formats import read_config
from tessera.puzzle.costs import Target, measured_costs, predicted_costs
from tessera.puzzle.library import LibraryConfig, Variant, variant_lists
from tessera.puzzle.mip import Constraint, solve

CONFIGS = Path(__file__).parent / "configs"


def library(parent: ArchSpec, multiple: int) -> list[Variant]:
    """The default block library (`tessera.puzzle.library.variant_lists`): GQA with each KV-head count that merges
    whole KV groups, linear, no-op; the parent's FFN width and 87/75/50/25/20/10 % of it, linear, no-op."""
    layers, _, _ = variant_lists(parent, LibraryConfig(ffn_multiple=multiple))
    return list(dict.fromkeys(v for lv in layers for v in lv.all))


def synthetic_scores(parent: ArchSpec, variants: list[Variant], seed: int = 0) -> dict[tuple[int, str], float]:
    """Replace-1-block scores shaped like real ones: 0 for the parent's own sub-block, growing with the share of
    the sub-block removed, layers near the ends more sensitive, attention mostly cheaper to remove than FFN."""
    rng = random.Random(seed)
    L, full_ffn, full_kv = parent.num_layers, parent.blocks[0].ffn.intermediate_size, parent.kv_heads(0)
    scores = {}
    for layer in range(L):
        edge = 1.0 + 3.0 * math.exp(-min(layer, L - 1 - layer) / (0.08 * L))
        att_w, ffn_w = edge * rng.uniform(0.05, 0.6), edge * rng.uniform(0.3, 1.2)
        for v in variants:
            s = v.spec
            if v.part == "attention":
                removed = {"gqa": 1 - (s.num_kv_heads or full_kv) / full_kv * 0.9 - 0.1, "linear": 0.85,
                           "no_op": 1.0}[s.kind] if (s.kind != "gqa" or s.num_kv_heads != full_kv) else 0.0
                w = att_w
            else:
                removed = {"swiglu": 1 - (s.intermediate_size or full_ffn) / full_ffn, "linear": 0.8,
                           "no_op": 1.0}[s.kind]
                w = ffn_w
            scores[(layer, v.key)] = 0.0 if removed <= 0 else w * removed ** 1.5 * rng.uniform(0.8, 1.25)
    return scores


# ---------------------------------------------------------------------------- part 1: the MIP at scale
def mip_at_scale(reps: int) -> None:
    parent = read_config(CONFIGS / "llama-3.1-70b")
    variants = library(parent, 256)
    n_att = sum(v.part == "attention" for v in variants)
    target = Target("h100", "fp8", ("128/1024", "2048/128"), 64)
    t0 = time.perf_counter()
    costs = predicted_costs(parent, variants, target)
    cost_s = time.perf_counter() - t0
    scores = synthetic_scores(parent, variants)
    par = costs.metrics(costs.parent)
    constraints = [
        Constraint("memory", 72e9, scenario="2048/128"),  # one H100's usable memory at batch 64
        Constraint("params", 0.75 * par["params"]),
        Constraint("speedup", 1.8, scenario="128/1024"),
        Constraint("throughput", 1.6 * par["tokens_per_s[2048/128,e2e]"], scenario="2048/128"),
        Constraint("latency", 0.7 * par["seconds[128/1024,decode]"] / 1024, scenario="128/1024", phase="decode"),
    ]
    print(f"parent llama-3.1-70b: {parent.num_layers} layers, {n_att} attention x {len(variants) - n_att} FFN variants "
          f"({n_att * (len(variants) - n_att)} pairs per layer); target {target}")
    print(f"costs of {len(costs.pairs)} pairs predicted in {cost_s:.3f} s")
    print("constraints: " + "; ".join(f"{c.kind}{'[' + c.scenario + ']' if c.scenario else ''} {c.sense} {c.bound:.4g}"
                                      for c in constraints))
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        (sol,) = solve(scores, costs, constraints)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"one solution: {statistics.median(times):.3f} s wall median of {reps} (min {min(times):.3f}, max "
          f"{max(times):.3f}; CPU time median {statistics.median(cpu):.3f} s), optimal={sol.optimal}, "
          f"objective {sol.objective:.4f}")
    for label, value in sol.constraints:
        print(f"  {label:45s} -> {value:,.4g}")
    t0 = time.perf_counter()
    (whole,) = solve(scores, costs, constraints, reduce=False)
    same = abs(whole.objective - sol.objective) <= 1e-6 * sol.objective
    print(f"  check: HiGHS on the whole program (no reduced-cost fixing): {time.perf_counter() - t0:.3f} s, objective "
          f"{whole.objective:.6f} ({'same' if same else 'DIFFERENT'})")
    kinds = {}
    for a, f in sol.layers:
        kinds[a.spec.describe()] = kinds.get(a.spec.describe(), 0) + 1
        kinds[f.spec.describe()] = kinds.get(f.spec.describe(), 0) + 1
    print("  chosen: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])))
    t0 = time.perf_counter()
    sols = solve(scores, costs, constraints, num_solutions=5, alpha=0.9)
    t = time.perf_counter() - t0
    diffs = [sum(x != y for x, y in zip(a.keys, b.keys)) for i, a in enumerate(sols) for b in sols[:i]]
    print(f"five diverse solutions (alpha 0.9: >= 8 of 80 layers differ): {len(sols)} found in {t:.3f} s, "
          f"objectives {', '.join(f'{s.objective:.4f}' for s in sols)}, fewest layers differing {min(diffs)}")


# ---------------------------------------------------------------------------- part 2: measured costs vs measured speed
def measured_validation(scenario: str, batches: list[int], reps: int, targets: list[float]) -> None:
    import torch

    from tessera.bench import run_once
    from tessera.checkpoint import _finish, default_parent_dir
    from tessera.cost import Scenario
    from tessera.model import Transformer

    torch.set_num_threads(2)
    parent = read_config(default_parent_dir())
    variants = library(parent, 64)
    scores = synthetic_scores(parent, variants)
    sc = Scenario.parse(scenario)

    def build(arch: ArchSpec):
        torch.manual_seed(0)
        return _finish(Transformer(arch)).eval()

    gen = torch.Generator().manual_seed(1)
    for batch in batches:
        target = Target("cpu", "fp32", scenario, batch)
        t0 = time.perf_counter()
        costs = measured_costs(parent, variants, target, reps=reps)
        print(f"\nbatch {batch}, scenario {scenario}: {len(costs.sub)} variants measured in "
              f"{time.perf_counter() - t0:.0f} s ({costs.source})")
        print(f"  fixed (embedding, head, loop): decode {costs.fixed.decode_s[0]:.3f} s; parent predicted "
              f"{costs.parent.decode_s[0]:.3f} s")
        children = {"parent": parent}
        for s in targets:
            (sol,) = solve(scores, costs, [Constraint("speedup", s, phase="decode")])
            children[f"{s:g}x"] = sol.arch(parent)
        parent_model = build(parent)
        for m in (parent_model,):
            run_once(m, batch, sc, gen)
        print(f"  {'child':>8} {'params':>7} {'pred dec s':>10} {'meas dec s':>10} {'err':>6} "
              f"{'pred x':>7} {'meas x':>7} {'err':>6}")
        for name, arch in children.items():
            model = build(arch) if name != "parent" else parent_model
            run_once(model, batch, sc, gen)
            ratios, child_s = [], []
            for _ in range(reps):  # alternate parent and child; the speed-up is the median of adjacent ratios
                p = run_once(parent_model, batch, sc, gen)
                c = run_once(model, batch, sc, gen)
                ratios.append(p[1] / c[1])
                child_s.append(c[1])
            total = costs.total((Variant("attention", b.attention).key, Variant("ffn", b.ffn).key) for b in arch.blocks)
            pred_s, meas_s = total.decode_s[0], statistics.median(child_s)
            pred_x, meas_x = costs.parent.decode_s[0] / pred_s, statistics.median(ratios)
            print(f"  {name:>8} {arch.num_params() / 1e6:6.1f}M {pred_s:10.3f} {meas_s:10.3f} {pred_s / meas_s - 1:+6.1%} "
                  f"{pred_x:7.3f} {meas_x:7.3f} {pred_x / meas_x - 1:+6.1%}")
            del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("mip", "measured", "all"), default="all")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scenario", default="128/64", help="measured part: IN/OUT")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="measured part: batch sizes")
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    args = ap.parse_args()
    if args.part in ("mip", "all"):
        mip_at_scale(args.reps)
    if args.part in ("measured", "all"):
        measured_validation(args.scenario, args.batch, args.reps, args.speedups)


if __name__ == "__main__":
    main()
