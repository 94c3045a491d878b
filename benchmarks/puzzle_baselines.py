"""The Minitron / ShortGPT baselines of benchmarks/puzzle.py without distillation: at each speed-up, the uniform-width
and the depth child cut to the same predicted decode time (the same measured cost table, `baseline_shapes`), their
KLD to the parent on the same reporting chunks, each saved so `benchmarks/puzzle.py --phase measure` can time it.

    .venv/bin/python benchmarks/puzzle_baselines.py --costs /tmp/puzzle_bench/costs.json --out /tmp/puzzle_bench_d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import tessera  # noqa: E402
from puzzle import baseline_shapes  # noqa: E402
from tessera.data import load_split  # noqa: E402
from tessera.evaluate import mean_kld, parent_logits_for  # noqa: E402
from tessera.importance import activation_importance  # noqa: E402
from tessera.prune import PruneTarget, prune, shortgpt  # noqa: E402
from tessera.puzzle.costs import CostTable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--costs", type=Path, required=True, help="costs.json written by benchmarks/puzzle.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--gkd-tokens", type=int, default=4096, help="as in puzzle.py: the importance chunks follow it")
    ap.add_argument("--report-samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    parent = tessera.load("default")
    costs = CostTable.from_json(args.costs.read_text())
    seq = args.seq_len
    calibration = load_split(parent.tokenizer, "calibration", seq_len=seq,
                             max_tokens=args.gkd_tokens + 2 * args.calib_samples * seq)
    report = load_split(parent.tokenizer, "reporting", seq_len=seq,
                        max_tokens=args.report_samples * seq).take(args.report_samples)
    ref = parent_logits_for(parent, report.chunks)
    imp = activation_importance(parent, calibration.take(args.calib_samples), with_drop_loss=False)
    rows = []
    for s in args.speedups:
        shapes = baseline_shapes(costs, s, parent.arch)
        for name, make, pred, shape in (
                ("minitron", lambda shapes=shapes: prune(parent, imp, PruneTarget(ffn=shapes["minitron_ffn"])),
                 shapes["minitron_predicted"], f"FFN {shapes['minitron_ffn']}"),
                ("shortgpt", lambda shapes=shapes: shortgpt(parent, imp, shapes["shortgpt_layers"]),
                 shapes["shortgpt_predicted"],
                 f"{shapes['shortgpt_layers']} layers")):
            t0 = time.perf_counter()
            child = make()
            kld = mean_kld(parent, child, report.chunks, parent_logits=ref)
            path = args.out / f"{name}-{s:g}x"
            tessera.save(child, path, force=True)
            rows.append({"target": s, "method": name, "shape": shape, "params": child.arch.num_params(),
                         "predicted_speedup": pred, "kld_before": kld.kld, "top1_before": kld.top1, "path": str(path),
                         "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
