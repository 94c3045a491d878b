"""Where evaluation time goes on the default parent: prompt length per task, and the speed-up from reusing the K/V
of the prompt prefix shared with the previous item (MMLU's 5-shot header), measured with reuse on and off in
alternating runs of the same items.

    .venv/bin/python benchmarks/eval_speed.py [--items 24] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tessera
from tessera.evaluate import scoring
from tessera.evaluate.run import score_items
from tessera.evaluate.scoring import Scorer
from tessera.evaluate.tasks import get_task, load_items

LENGTH_TASKS = ["arc_easy", "arc_challenge", "boolq", "truthfulqa_mc2", "mmlu"]


def timed_run(model, items, reuse: bool) -> tuple[float, list]:
    saved = scoring.MIN_REUSE
    scoring.MIN_REUSE = saved if reuse else 10**9  # a prefix can never be that long: reuse off
    try:
        t0 = time.perf_counter()
        outcomes = score_items(Scorer(model), items)
        return time.perf_counter() - t0, outcomes
    finally:
        scoring.MIN_REUSE = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=24, help="MMLU items, all from the first subject")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--length-items", type=int, default=570, help="items per task for the prompt-length table")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tessera.load("default")
    tok = model.tokenizer

    print(f"prompt length (first {args.length_items} items per task; MMLU's loader interleaves subjects)")
    for name in LENGTH_TASKS:
        items = load_items(get_task(name), limit=args.length_items)
        tokens = statistics.mean(len(tok(it.contexts[0], add_special_tokens=False)["input_ids"]) for it in items)
        choices = statistics.mean(len(it.continuations) for it in items)
        print(f"  {name:>15}: {tokens:6.0f} context tokens, {choices:4.1f} choices")

    mmlu = load_items(get_task("mmlu"))
    subject = mmlu[0].group
    items = [it for it in mmlu if it.group == subject][: args.items]
    times = {True: [], False: []}
    for _ in range(args.reps):
        outcomes = {}
        for reuse in (False, True):
            seconds, outcomes[reuse] = timed_run(model, items, reuse)
            times[reuse].append(seconds)
        if outcomes[True] != outcomes[False]:
            raise SystemExit("error: prefix reuse changed an item's outcome; the reuse path is wrong")
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"\nMMLU, {len(items)} items of {subject}, {args.reps} alternating reps, medians")
    print(f"  prefix reuse off: {len(items) / off:5.2f} items/s")
    print(f"  prefix reuse on:  {len(items) / on:5.2f} items/s   ({off / on:.2f}x)")


if __name__ == "__main__":
    main()
