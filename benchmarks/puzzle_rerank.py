"""Does the MIP's additive estimate hold? For each speed-up, several diverse MIP solutions from a finished
`benchmarks/puzzle.py` run: the summed replace-1-block score beside the assembled child's real KLD to the parent
(before any GKD) on the same selection chunks the scores used.

    .venv/bin/python benchmarks/puzzle_rerank.py --out runs/puzzle --speedups 1.5 2.0 --solutions 6 --alpha 0.8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import tessera
from tessera.data import load_split, sha256_ids
from tessera.evaluate import mean_kld, parent_logits_for
from tessera.puzzle.assemble import assemble
from tessera.puzzle.bld import variant_state
from tessera.puzzle.costs import CostTable
from tessera.puzzle.mip import Constraint, solve
from tessera.puzzle.run import load_scores_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a finished benchmarks/puzzle.py --out directory")
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--solutions", type=int, default=6)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parent = tessera.load("default")
    scores, library = load_scores_stage(args.out / "scores")  # and the library the scores were made from
    library.check_parent(parent)
    costs = CostTable.from_json((args.out / "costs.json").read_text())
    d = scores.data
    sel = load_split(parent.tokenizer, "selection", d.get("source"), seq_len=d["seq_len"],
                     max_tokens=d["tokens"]).take(d["chunks"])
    if d.get("sha256") and sha256_ids(sel.chunks) != d["sha256"]:
        raise SystemExit(f"{args.out}: the selection tokens differ from those the scores were measured on")
    ref = parent_logits_for(parent, sel.chunks)
    print("| target | solution | summed score | real KLD | no-op attention | linear FFN |\n|---:|---:|---:|---:|---:|---:|")
    for s in args.speedups:
        t0 = time.perf_counter()
        sols = solve(scores.kl, costs, [Constraint("speedup", s, phase="decode")], num_solutions=args.solutions,
                     alpha=args.alpha, exclude=library.pair_exclusion_keys())
        for i, sol in enumerate(sols):
            child = assemble(parent, library, sol.layers, weights=lambda li, v: variant_state(library, parent, li, v))
            kld = mean_kld(parent, child, sel.chunks, parent_logits=ref).kld
            no_op = sum(a.key == "attn.no_op" for a, _ in sol.layers)
            linear = sum(f.key == "ffn.linear" for _, f in sol.layers)
            print(f"| {s:g}x | {i} | {sol.objective:.3f} | {kld:.3f} | {no_op} | {linear} |", flush=True)
        print(f"({s:g}x: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
