"""Puzzle stages 2-3 on the default parent (SmolLM2-135M): blockwise local distillation and replace-1-block scores.

For a few layers of the default block library: BLD on --bld-tokens calibration tokens, each variant's normalised
MSE on held-out (reporting-split) tokens at initialisation and after BLD, and replace-1-block KL / LM loss on the
selection split. Prints the per-variant table and the wall time and throughput of each stage. The three data
roles use the three disjoint splits of the shared corpus.

    flock /work/bench.lock .venv/bin/python benchmarks/puzzle_bld.py [--layers 0,15,29] [--bld-tokens 16384]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import tessera
from tessera.data import check_disjoint, load_split
from tessera.puzzle.bld import BLDConfig, normalised_mse, run_bld, trainable
from tessera.puzzle.library import LibraryConfig, build_library
from tessera.puzzle.scoring import score_library


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--library-chunks", type=int, default=32)
    ap.add_argument("--bld-tokens", type=int, default=16384)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=8, help="BLD sequences per step")
    ap.add_argument("--heldout-chunks", type=int, default=8)
    ap.add_argument("--score-chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="keep the library here (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    parent = tessera.load("default")
    tok, seq = parent.tokenizer, args.seq
    calib = load_split(tok, "calibration", seq_len=seq, max_tokens=args.library_chunks * seq + args.bld_tokens + seq)
    selection = load_split(tok, "selection", seq_len=seq, max_tokens=args.score_chunks * seq).take(args.score_chunks)
    reporting = load_split(tok, "reporting", seq_len=seq, max_tokens=args.heldout_chunks * seq).take(
        args.heldout_chunks)
    check_disjoint({"calibration": calib.record(), "selection": selection.record(), "reporting": reporting.record()})
    out = Path(args.out or tempfile.mkdtemp(prefix="puzzle-bld-")) / "library"
    times = {}

    t = time.perf_counter()
    lib_data = calib.take(args.library_chunks)
    lib = build_library(parent, LibraryConfig(), lib_data.chunks, out, parent_source="default",
                        data_record=lib_data.record(), force=True)
    times["library"] = time.perf_counter() - t
    n_att = sum(len(trainable(lib, i, ("attention",))) for i in layers)
    n_ffn = sum(len(trainable(lib, i, ("ffn",))) for i in layers)
    print(f"library: {out} ({times['library']:.1f} s); layers {layers}: {n_att} attention + {n_ffn} FFN variants "
          "to train")

    before = normalised_mse(lib, parent, reporting.chunks, trained=False, layers=layers)
    cfg = BLDConfig(tokens=args.bld_tokens, batch=args.batch, lr=args.lr, warmup_steps=2)
    t = time.perf_counter()
    report = run_bld(lib, parent, calib, cfg, layers=layers, progress=False)
    times["bld"] = time.perf_counter() - t
    after = normalised_mse(lib, parent, reporting.chunks, layers=layers)
    print(f"BLD: {report.data['used_tokens']:,} calibration tokens x {len(layers)} layers in {times['bld']:.1f} s: "
          f"{report.tokens_per_s:,.0f} tokens/s, {report.variant_tokens_per_s:,.0f} variant-tokens/s")

    t = time.perf_counter()
    table = score_library(lib, parent, selection, out.parent / "scores", layers=layers, progress=False,
                          max_branches=16)
    times["score"] = time.perf_counter() - t
    n = len(table.kl)
    print(f"scores: {n} candidates on {selection.tokens:,} selection tokens in {times['score']:.1f} s "
          f"({times['score'] / max(1, n):.1f} s each); parent LM loss {table.parent_lm_loss:.4f}")
    print()
    print(f"{'layer':>5} {'variant':<18} {'nMSE init':>10} {'nMSE BLD':>10} {'ratio':>6} {'KL':>9} {'LM loss':>8}")
    lowered = total = 0
    for (i, key) in sorted(table.kl, key=lambda k: (k[0], k[1])):
        b, a = before.get((i, key)), after.get((i, key))
        ratio = f"{a / b:6.3f}" if b else "     -"
        if (i, key) in report.variants:
            total += 1
            lowered += a < b
        nb = f"{b:10.4f}" if b is not None else " " * 10
        na = f"{a:10.4f}" if a is not None else " " * 10
        print(f"{i:>5} {key:<18} {nb} {na} {ratio} {table.kl[(i, key)]:9.5f} {table.lm_loss[(i, key)]:8.4f}")
    print()
    print(f"BLD lowered held-out nMSE for {lowered} of {total} trained variants")
    print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
