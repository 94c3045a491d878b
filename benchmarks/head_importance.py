"""Attention-head importance on the default parent: output norm (Minitron) vs drop-KL vs random vs magnitude.

Scores come from chunks of the shared corpus's calibration split; each pruned model is measured by
KL(parent || child) on chunks of its reporting split, which the scores never saw (`tessera.data`). Also prints,
per layer, the Spearman correlation between the output norm and the drop-KL of single heads, and where the heads
whose removal hurts most sit.

    .venv/bin/python benchmarks/head_importance.py [--calib 8] [--heldout 8] [--seq-len 128] [--seeds 3] [--drop-samples 4]
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

from tessera.checkpoint import load
from tessera.data import load_split
from tessera.evaluate import mean_kld, parent_logits_for
from tessera.importance import activation_importance, magnitude_importance, random_importance
from tessera.prune import PruneTarget, prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--drop-samples", type=int, default=4, help="calibration chunks for the per-head drop-KL")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    parent = load("default")
    seq = args.seq_len
    calib = load_split(parent.tokenizer, "calibration", seq_len=seq, max_tokens=args.calib * seq).take(args.calib)
    held = load_split(parent.tokenizer, "reporting", seq_len=seq, max_tokens=args.heldout * seq).chunks[: args.heldout]
    t0 = time.perf_counter()
    act = activation_importance(parent, calib, with_head_drop=True, drop_samples=args.drop_samples)
    print(f"importance (norm + per-head drop-KL, {parent.arch.num_layers * parent.arch.num_attention_heads} heads, "
          f"drop-KL on {args.drop_samples} of {args.calib} calibration chunks): {time.perf_counter() - t0:.0f} s")

    layers, heads = parent.arch.num_layers, parent.arch.num_attention_heads
    norm = torch.stack([act.heads[i] for i in range(layers)])
    drop = torch.stack([act.head_drop_kl[i] for i in range(layers)])
    rho = [spearmanr(norm[i], drop[i])[0] for i in range(layers)]
    print(f"Spearman(output norm, drop-KL) per layer: mean {sum(rho) / layers:+.2f}; layers 0-1 "
          f"{rho[0]:+.2f} {rho[1]:+.2f}; layers 2-{layers - 1} mean {sum(rho[2:]) / (layers - 2):+.2f}")
    group = heads // parent.arch.kv_heads(0)
    print("the 5 heads whose removal hurts most (layer, head, drop-KL, rank of its output norm in its KV group):")
    for flat in drop.flatten().argsort(descending=True)[:5].tolist():
        i, h = divmod(flat, heads)
        g = norm[i].view(-1, group)[h // group]
        print(f"  layer {i:2d} head {h}  {drop[i, h]:.4f}  norm rank {int((g > norm[i, h]).sum()) + 1} of {group}")

    ref = parent_logits_for(parent, held)
    methods = {"norm (Minitron)": (act, "norm"), "drop_kl": (act, "drop_kl"),
               "magnitude": (magnitude_importance(parent), "norm")}
    methods |= {f"random seed {s}": (random_importance(parent, seed=s), "norm") for s in range(args.seeds)}
    print(f"\nKL(parent || pruned) on {len(held)} held-out chunks of {args.seq_len} tokens")
    print(f"{'method':>18} " + " ".join(f"{f'heads {k}/{heads}':>12}" for k in (6, 3)))
    for name, (imp, metric) in methods.items():
        klds = [mean_kld(parent, prune(parent, imp, PruneTarget(heads=k, head_metric=metric)), held,
                         parent_logits=ref).kld for k in (6, 3)]
        print(f"{name:>18} " + " ".join(f"{x:12.3f}" for x in klds), flush=True)


if __name__ == "__main__":
    main()
