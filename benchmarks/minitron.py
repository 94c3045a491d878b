"""Minitron on the default parent: prune to ~60% of non-embedding parameters with activation importance,
magnitude and random scores (same target shape) and ShortGPT depth pruning (same parameter budget), then
distil each with the same token budget; report KLD to the parent and accuracy preserved, before and after
distillation.

Data: the three disjoint splits of the shared corpus (`tessera.data`): importance scores and distillation on the
calibration split, the width/depth choice on the selection split, the reported KLD on the reporting split.

    .venv/bin/python benchmarks/minitron.py [--fraction 0.6] [--tokens 32768] [--limit 100] [--out DIR]

`--limit 0` skips the accuracy tasks (KLD only) and `--tokens 0` the distillation, for a quick run on a busy
machine; every method's before-distillation row is printed before any distillation starts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tessera
from tessera.data import check_disjoint, load_split
from tessera.distill import DistillConfig, distill
from tessera.evaluate import accuracy_preserved, evaluate_tasks, mean_kld, parent_logits_for
from tessera.importance import activation_importance, magnitude_importance, random_importance
from tessera.prune import prune, search_target, shortgpt

TASKS = ["arc_easy", "winogrande", "lambada"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=0.6, help="of the parent's non-embedding parameters")
    ap.add_argument("--tokens", type=int, default=32768, help="distillation budget per student (0: none)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences for importance")
    ap.add_argument("--select", type=int, default=8, help="selection sequences for the width/depth search")
    ap.add_argument("--report", type=int, default=16, help="reporting sequences for the KLD")
    ap.add_argument("--limit", type=int, default=100, help="items per accuracy task (0: no accuracy)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="save students and results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    parent = tessera.load("default")
    seq = args.seq_len
    calibration = load_split(parent.tokenizer, "calibration", seq_len=seq, max_tokens=600_000)
    calib, train = calibration.take(args.calib), calibration.chunks[args.calib:]
    selection = load_split(parent.tokenizer, "selection", seq_len=seq, max_tokens=args.select * seq).take(args.select)
    held = load_split(parent.tokenizer, "reporting", seq_len=seq, max_tokens=args.report * seq).take(args.report)
    records = {"calibration": calibration.record(), "selection": selection.record(), "reporting": held.record()}
    check_disjoint(records)
    for role, r in records.items():
        print(f"{role:>11}: {r['chunks']} chunks x {r['seq_len']} = {r['tokens']:,} tokens of the {r['split']} split "
              f"(sha256 {r['sha256']})")
    print(f"importance on the first {args.calib} calibration chunks, distillation ({args.tokens:,} tokens per "
          f"student) on the rest; width/depth chosen on selection; KLD reported on reporting")
    parent_ref = parent_logits_for(parent, held.chunks)
    accuracy = bool(args.limit)
    parent_acc = evaluate_tasks(parent, TASKS, limit=args.limit, progress=False) if accuracy else {}

    act = activation_importance(parent, calib, with_drop_loss=False)
    search = search_target(parent, act, args.fraction, selection)
    target = search.target
    print(f"width/depth search: KLD before distillation on {selection.tokens:,} selection tokens, "
          f"{len(search.candidates)} of {search.considered} candidates (max_candidates {search.max_candidates})")
    print("| hidden | FFN | layers | non-emb params | KLD (selection) |")
    print("|---:|---:|---:|---:|---:|")
    for r in search.candidates:
        t = r["target"]
        mark = "**" if t == target.describe() else ""
        print(f"| {mark}{t.get('hidden')}{mark} | {mark}{t.get('ffn')}{mark} | {mark}{t.get('layers')}{mark} | "
              f"{mark}{r['fraction']:.1%}{mark} | {mark}{r['kld']:.3f}{mark} |")
    n_layers = round(parent.arch.num_layers * args.fraction)
    students = {
        "activation": prune(parent, act, target),
        "magnitude": prune(parent, magnitude_importance(parent), target),
        "random": prune(parent, random_importance(parent, seed=0), target),
        f"shortgpt ({n_layers} layers)": shortgpt(parent, act, n_layers),
    }
    dropped = students["activation"].provenance[-1]["dropped_layers"]
    cfg = DistillConfig(tokens=args.tokens, seq_len=args.seq_len, batch=args.batch, lr=args.lr, warmup_steps=2,
                        eval_every=10**9, ckpt_every=10**9)
    rows = []
    for name, student in students.items():  # before distillation, every method first (printed as measured)
        frac = student.arch.non_embedding_params() / parent.arch.non_embedding_params()
        before_kld = mean_kld(parent, student, held.chunks, parent_logits=parent_ref).kld
        before = accuracy_preserved(evaluate_tasks(student, TASKS, limit=args.limit, progress=False, use_cache=False),
                                    parent_acc)["average"]["preserved"] if accuracy else float("nan")
        rows.append({"method": name, "non_embedding_fraction": frac, "kld_before": before_kld, "kld_after": float("nan"),
                     "preserved_before": before, "preserved_after": float("nan"), "distill_seconds": 0.0,
                     "per_task_after": []})
        print(f"{name:>22}: {frac:.1%} params, before distillation KLD {before_kld:.3f}, accuracy preserved "
              f"{before:.1%}", flush=True)
    for row, (name, student) in zip(rows, students.items()):
        if not args.tokens:
            break
        t0 = time.perf_counter()
        student, log = distill(parent, student, train, cfg, progress=False)
        secs = time.perf_counter() - t0
        after_kld = mean_kld(parent, student, held.chunks, parent_logits=parent_ref).kld
        table = {"average": {"preserved": float("nan")}, "rows": []}
        if accuracy:
            after_acc = evaluate_tasks(student, TASKS, limit=args.limit, progress=False, use_cache=False)
            table = accuracy_preserved(after_acc, parent_acc)
        row |= {"kld_after": after_kld, "preserved_after": table["average"]["preserved"], "distill_seconds": secs,
                "per_task_after": table["rows"]}
        print(f"{name:>22}: KLD {row['kld_before']:.3f} -> {after_kld:.3f}, accuracy preserved "
              f"{row['preserved_before']:.1%} -> {table['average']['preserved']:.1%} ({secs:.0f} s distillation)",
              flush=True)
        if args.out:
            tessera.save(student, args.out / name.split()[0], force=True)
    shown = (("arc_easy", "acc_norm"), ("winogrande", "acc"), ("lambada", "acc"))
    if accuracy:
        print(f"\nparent accuracy (limit {args.limit}): "
              + ", ".join(f"{t} {100 * parent_acc[t][m]:.1f}" for t, m in shown))
    print("\n| method | non-emb params | KLD before | KLD after | acc. preserved before | after |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['non_embedding_fraction']:.1%} | {r['kld_before']:.3f} | {r['kld_after']:.3f} | "
              f"{r['preserved_before']:.1%} | {r['preserved_after']:.1%} |")
    print(f"\ntarget {target.describe()}; dropped layers {dropped}; "
          f"distillation {cfg.steps} steps x {cfg.tokens_per_step} tokens, lr {cfg.lr}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    if args.out:
        (args.out / "results.json").write_text(json.dumps({"rows": rows, "parent": parent_acc, "data": records,
                                                           "search": search.as_dict()}, indent=2, default=str))


if __name__ == "__main__":
    main()
