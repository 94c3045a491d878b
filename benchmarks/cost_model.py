"""Validate the cost model: predicted vs measured CPU speed-ups of children of the default parent, and
predicted H100 speed-ups of Llama-3.1-Minitron-4B (width / depth) over Llama-3.1-8B vs the published ones.

CPU part: each child is built from the parent's ArchSpec with random weights (speed does not depend on weight
values). Runs alternate parent, child, parent, child... and each speed-up is the median of ratios of adjacent
runs, so machine noise hits both sides alike. The prediction uses the `cpu` profile calibrated on this machine.

    .venv/bin/python benchmarks/cost_model.py [--scenario 128/64] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.bench import run_once
from tessera.checkpoint import _finish, default_parent_dir
from tessera.cost import Scenario, predict
from tessera.formats import read_config
from tessera.hardware import GPUS, get_hardware
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


def gpu_predictions() -> None:
    hw = GPUS["h100"]
    base = read_config(CONFIGS / "llama-3.1-8b")
    print("\nH100 (bf16, best batch that fits, per GPU) predicted speed-up over Llama-3.1-8B")
    print(f"{'model':>30} " + " ".join(f"{s:>10}" for s in H100_SCENARIOS) + f" {'mean':>6} {'published':>9}")
    for name, published in PUBLISHED.items():
        arch = read_config(CONFIGS / name)
        ratios = []
        for s in H100_SCENARIOS:
            sc = Scenario.parse(s)
            ratios.append(predict(arch, hw, sc).output_tokens_per_s / predict(base, hw, sc).output_tokens_per_s)
        mean = statistics.mean(ratios)
        print(f"{name:>30} " + " ".join(f"{r:10.2f}" for r in ratios) + f" {mean:6.2f} {published:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="128/64")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not args.skip_cpu:
        cpu_validation(Scenario.parse(args.scenario), args.reps)
    gpu_predictions()


if __name__ == "__main__":
    main()
