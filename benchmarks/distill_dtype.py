"""One distillation step of the default parent (teacher and student both the parent, loss kl+cosine-layers) in fp32
and under bf16 autocast on this CPU, alternated, side by side: seconds per step and the ratio.

    .venv/bin/python benchmarks/distill_dtype.py --threads 2 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import tessera
from tessera.distill import DistillConfig, start_run, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parent = tessera.load("default")
    ids = torch.randint(0, parent.arch.vocab_size, (args.batch * (args.reps + 1), args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(tokens=ids.numel(), seq_len=args.seq_len, batch=args.batch, lr=1e-5, warmup_steps=1,
                        loss="kl+cosine-layers")
    runs = {d: start_run(parent, copy.deepcopy(parent), ids, cfg, heldout=None, ckpt_dir=None, compute_dtype=d)
            for d in ("fp32", "bf16")}
    seconds: dict[str, list[float]] = {d: [] for d in runs}
    for rep in range(args.reps + 1):  # the first step of each is a warm-up
        for d, run in runs.items():
            s = cfg.tokens_per_step / train_step(run)["tokens_per_s"]
            if rep:
                seconds[d].append(s)
    med = {d: statistics.median(v) for d, v in seconds.items()}
    for d, v in seconds.items():
        print(f"{d}: {med[d]:.1f} s per step of {cfg.tokens_per_step} tokens (median of {len(v)}: "
              f"{', '.join(f'{x:.1f}' for x in v)})")
    print(f"bf16 / fp32 speed: {med['fp32'] / med['bf16']:.2f}x ({args.threads} threads)")


if __name__ == "__main__":
    main()
