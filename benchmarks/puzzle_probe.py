"""Why does the searched child lose accuracy to ShortGPT? Probes on a finished `benchmarks/puzzle.py` run, all
before any global distillation, so they isolate the choice of blocks from the healing.

--part choice: children at one speed-up chosen different ways from the run's library, scores and measured costs,
each with its summed replace-1-block score, its closeness to the parent on the corpus's reporting split (8 x 256
tokens, or of `--report-data`: KLD, top-1 agreement, KLD where the parent is confident and where it is not) and
its accuracy on `--tasks` (arc_easy acc_norm and lambada acc by default, `--limit` items each):

* shortgpt:    the layers with the lowest Block Importance (on the corpus's calibration split) dropped, as many
               as the benchmark's ShortGPT child drops;
* kl:          the MIP on the replace-1-block KL (what `benchmarks/puzzle.py` builds);
* lm:          the MIP on the replace-1-block LM-loss increase instead;
* llamacpp:    the MIP on the KL, pairs llama.cpp cannot serve left out (no linear FFN);
* layers:      the MIP on the KL, each layer either the parent's or dropped whole (ShortGPT's space);
* kl+answers:  the MIP on the KL plus the KL on task answers (OUT/scores_answers of a `--score-tasks` run: what
               `benchmarks/puzzle.py --score-tasks` builds);
* answers:     the MIP on the KL on task answers alone.

--part healed: KLD to the parent of saved (healed) children on text no search or healing reads: LAMBADA items
2000-2149 (context + last word) and ARC-Challenge items 0-399 (question + gold answer), 16 x 256 tokens each, and
the corpus's reporting split (16 x 256).

--part answers: for the same children, the KL to the parent at the positions predicting the gold answers of
held-out task items (`tessera.evaluate.tasks.answer_split`; --answer-items, none of them reported), per task.

--part scoring: for the same children, the KL to the parent on the data the run's scores were measured on (the
selection text, plus the task answers of a `--score-tasks` run): what `--refine-rounds` measures, beside the summed
replace-1-block text score.

--part context: replace-1-block KL of some variants on the same selection text cut into 256- and 1024-token
chunks (does attention removal cost more with more context?).

    .venv/bin/python benchmarks/puzzle_probe.py --out runs/puzzle_mix --part choice --speedup 1.5
    .venv/bin/python benchmarks/puzzle_probe.py --out runs/puzzle_mix --part answers --choices shortgpt kl
    .venv/bin/python benchmarks/puzzle_probe.py --out runs/puzzle_mix --part context
    .venv/bin/python benchmarks/puzzle_probe.py --out runs/puzzle_ans --part scoring --choices shortgpt kl+answers
    .venv/bin/python benchmarks/puzzle_probe.py --out runs/puzzle --part healed --children puzzle-1.5x shortgpt-1.5x
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import tessera
from tessera.data import load_split
from tessera.evaluate import evaluate_tasks
from tessera.puzzle.assemble import assemble
from tessera.puzzle.bld import variant_state
from tessera.puzzle.costs import CostTable
from tessera.puzzle.library import parent_variants
from tessera.puzzle.mip import Constraint, solve
from tessera.puzzle.run import load_scores_stage

CHOICES = ("shortgpt", "kl", "lm", "llamacpp", "layers", "kl+answers", "answers")


def choose(how: str, parent, library, scores, costs, speedup: float, answers: dict | None = None):
    """(child, summed KL score, layers whose attention is removed, linear FFN count) of one way of choosing."""
    from puzzle import baseline_shapes  # benchmarks/puzzle.py: the ShortGPT shape of the same predicted time

    if how == "shortgpt":
        from tessera.importance import activation_importance
        from tessera.prune import PruneTarget, layers_to_drop, shortgpt

        cal = load_split(parent.tokenizer, "calibration", seq_len=256, max_tokens=64 * 256).take(64)
        imp = activation_importance(parent, cal, with_drop_loss=False)
        keep = baseline_shapes(costs, speedup, parent.arch)["shortgpt_layers"]
        dropped = layers_to_drop(parent, imp, PruneTarget(layers=keep, layer_metric="bi"))  # what shortgpt drops
        summed = sum(scores.kl[(i, "attn.no_op")] + scores.kl[(i, "ffn.no_op")] for i in dropped)
        return shortgpt(parent, imp, keep), summed, dropped, 0
    table = scores.kl if how != "lm" else {k: v - scores.parent_lm_loss for k, v in scores.lm_loss.items()}
    if how in ("kl+answers", "answers"):
        if answers is None:
            raise SystemExit(f"--choices {how}: no scores_answers/ beside the scores; give a --score-tasks run")
        table = answers if how == "answers" else {k: v + answers[k] for k, v in scores.kl.items()}
    exclude = list(library.pair_exclusion_keys())
    if how == "layers":
        attn0, ffn0 = (v.key for v in parent_variants(library.arch, 0))
        keys = {k for _, k in table}
        exclude += [(a, f) for a in keys if a.startswith("attn.") for f in keys if f.startswith("ffn.")
                    if (a, f) not in {(attn0, ffn0), ("attn.no_op", "ffn.no_op")}]
    sol = solve(table, costs, [Constraint("speedup", speedup, phase="decode")], exclude=exclude,
                engine="llamacpp" if how == "llamacpp" else None)[0]
    child = assemble(parent, library, sol.layers, weights=lambda i, v: variant_state(library, parent, i, v))
    summed = scores.total([(a.key, f.key) for a, f in sol.layers])
    no_attn = [i for i, (a, _) in enumerate(sol.layers) if a.key == "attn.no_op"]
    return child, summed, no_attn, sum(f.key == "ffn.linear" for _, f in sol.layers)


def answers_of(args) -> dict | None:
    """The replace-1-block KL on task answers of a `--score-tasks` run (OUT/scores_answers), or None."""
    path = args.out / "scores_answers"
    return load_scores_stage(path)[0].kl if (path / "stage.json").is_file() else None


def child_batches(parent_logits, child, chunks: torch.Tensor):
    """(parent logits, child logits) per batch of `chunks`, the parent's from `parent_logits_for` (one tensor per
    batch, in order)."""
    start = 0
    for p in parent_logits:
        yield p, child(chunks[start:start + len(p)])
        start += len(p)


@torch.inference_mode()
def closeness(parent_logits, child, chunks: torch.Tensor) -> dict[str, float]:
    """KL(parent || child) over every position, top-1 agreement, and the KL over the positions where the parent is
    confident (top probability > 0.5: where a task's answer is usually decided) and where it is not."""
    from tessera.evaluate.kld import kl_per_token

    kl, agree, confident = [], [], []
    for p, q in child_batches(parent_logits, child, chunks):
        kl.append(kl_per_token(p, q).flatten())
        agree.append((p.argmax(-1) == q.argmax(-1)).flatten())
        confident.append((torch.softmax(p.float(), -1).amax(-1) > 0.5).flatten())
    kl, agree, confident = torch.cat(kl), torch.cat(agree).float(), torch.cat(confident)
    return {"kld": kl.mean().item(), "top1": agree.mean().item(), "kld_confident": kl[confident].mean().item(),
            "kld_unsure": kl[~confident].mean().item(), "confident": confident.float().mean().item()}


def part_choice(args, parent, library, scores, costs, answers) -> None:
    from tessera.evaluate import parent_logits_for

    report = load_split(parent.tokenizer, "reporting", args.report_data, seq_len=256, max_tokens=8 * 256).take(8)
    ref = parent_logits_for(parent, report.chunks)
    print(f"\n{args.speedup:g}x, before GKD ({args.out}; closeness on the reporting split of {report.source}):\n")
    print("| choice | summed KL score | KLD (reporting) | top-1 agreement | KLD where the parent is confident / not | "
          + "".join(f"{t} | " for t in args.tasks) + "attention removed in layers | linear FFN |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(args.tasks) + "---|---:|")
    for how in args.choices:
        t0 = time.perf_counter()
        child, summed, no_attn, linear = choose(how, parent, library, scores, costs, args.speedup, answers)
        c = closeness(ref, child, report.chunks)
        res = evaluate_tasks(child, args.tasks, limit=args.limit, progress=False, use_cache=False) if args.tasks \
            else {}
        acc = "".join(f"{100 * res[t]['acc_norm' if 'acc_norm' in res[t] else 'acc']:.1f} | " for t in args.tasks)
        print(f"| {how} | {summed:.3f} | {c['kld']:.3f} | {100 * c['top1']:.1f} % | {c['kld_confident']:.3f} / "
              f"{c['kld_unsure']:.3f} | {acc}{len(no_attn)}: {no_attn} | {linear} |  "
              f"<!-- {time.perf_counter() - t0:.0f} s; parent confident at {100 * c['confident']:.0f} % -->",
              flush=True)


def part_answers(args, parent, library, scores, costs, answers) -> None:
    from tessera.evaluate.tasks import answer_split, parse_item_spans
    from tessera.puzzle.scoring import in_context_costs

    spans = parse_item_spans(args.answer_items)
    data = {t: answer_split(parent.tokenizer, {t: span}, 256) for t, span in spans.items()}
    print(f"\n{args.speedup:g}x, before GKD: KL to the parent on the answer tokens of "
          + ", ".join(f"{d.source} ({int(d.mask.sum())} positions)" for d in data.values()) + "\n")
    print("| choice | " + " | ".join(data) + " |\n|---|" + "---:|" * len(data))
    for how in args.choices:
        child = choose(how, parent, library, scores, costs, args.speedup, answers)[0]
        kl = [in_context_costs(parent, child, d, [])[0] for d in data.values()]  # the masked positions' mean KL
        print(f"| {how} | " + " | ".join(f"{x:.3f}" for x in kl) + " |", flush=True)


def part_scoring(args, parent, library, scores, costs, answers) -> None:
    from tessera.puzzle.run import scores_data
    from tessera.puzzle.scoring import in_context_costs

    dirs = [args.out / "scores"] + ([args.out / "scores_answers"] if answers is not None else [])
    data = [scores_data(d, parent) for d in dirs]
    print(f"\n{args.speedup:g}x, before GKD: summed replace-1-block text score against the KL measured on the "
          "scoring data (" + ", ".join(f"{d.source}" for d in data) + ")\n")
    print("| choice | summed text score | measured KL | " + " | ".join(d.name for d in data) + " |\n|---|---:|---:|"
          + "---:|" * len(data))
    for how in args.choices:
        child, summed, *_ = choose(how, parent, library, scores, costs, args.speedup, answers)
        kl = [in_context_costs(parent, child, d, [])[0] for d in data]
        print(f"| {how} | {summed:.3f} | {sum(kl):.3f} | " + " | ".join(f"{x:.3f}" for x in kl) + " |", flush=True)


def part_healed(args, parent) -> None:
    from tessera.data import chunk, tokenize
    from tessera.evaluate import mean_kld
    from tessera.evaluate.tasks import get_task, items_text, load_items

    def task_text(task: str, start: int, stop: int) -> torch.Tensor:
        text = "\n\n".join(items_text(load_items(get_task(task), limit=stop)[start:]))
        return chunk(tokenize(parent.tokenizer, text), 256)[:16]

    texts = {"LAMBADA 2000-2149": task_text("lambada", 2000, 2150),
             "ARC-Challenge 0-399": task_text("arc_challenge", 0, 400),
             "books (reporting)": load_split(parent.tokenizer, "reporting", seq_len=256,
                                             max_tokens=16 * 256).take(16).chunks}
    print(f"\nKLD to the parent of healed children ({args.out}/children):\n")
    print("| child | " + " | ".join(texts) + " |\n|---|" + "---:|" * len(texts))
    for name in args.children:
        child = tessera.load(args.out / "children" / name)
        print(f"| {name} | " + " | ".join(f"{mean_kld(parent, child, t).kld:.3f}" for t in texts.values()) + " |",
              flush=True)


def part_context(args, parent, library, scores) -> None:
    d = scores.data
    sel = load_split(parent.tokenizer, "selection", d["source"], seq_len=1024, max_tokens=4096)
    if len(sel) < 4:
        raise SystemExit("the selection split has fewer than 4 x 1024 tokens")
    got = {}
    for seq in (256, 1024):
        chunks = sel.chunks[:4].reshape(-1, seq)  # the same 4,096 tokens either way
        with tempfile.TemporaryDirectory() as tmp:
            got[seq] = tessera.puzzle.scoring.score_library(library, parent, chunks, tmp, layers=args.layers,
                                                            keys=args.keys, progress=False).kl
    print("\nreplace-1-block KL, 256-token -> 1024-token chunks of the same 4,096 selection tokens:\n")
    print("| variant | " + " | ".join(f"layer {i}" for i in args.layers) + " |\n|---|" + "---:|" * len(args.layers))
    for k in args.keys:
        print(f"| {k} | " + " | ".join(f"{got[256][(i, k)]:.3f} → {got[1024][(i, k)]:.3f}" for i in args.layers)
              + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="a finished benchmarks/puzzle.py --out directory")
    ap.add_argument("--part", choices=("choice", "answers", "scoring", "healed", "context"), required=True)
    ap.add_argument("--answer-items", nargs="+", default=["lambada:1000-1300", "arc_easy:1000-1300",
                                                          "winogrande:1000-1150"], help="--part answers")
    ap.add_argument("--children", nargs="+", default=["puzzle-1.5x", "shortgpt-1.5x"], help="--part healed")
    ap.add_argument("--speedup", type=float, default=1.5)
    ap.add_argument("--choices", nargs="+", choices=CHOICES, default=list(CHOICES))
    ap.add_argument("--report-data", default=None, help="text for the closeness columns (default: the corpus; "
                    "its reporting split is used, which no search or healing reads)")
    ap.add_argument("--tasks", nargs="*", default=["arc_easy", "lambada"], help="none: closeness only")
    ap.add_argument("--limit", type=int, default=500, help="items per task")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6, 10, 14, 18, 22, 26])
    ap.add_argument("--keys", nargs="+", default=["attn.no_op", "attn.gqa-kv1", "ffn.linear", "ffn.swiglu-768"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tessera.puzzle.scoring  # noqa: F401  (part_context)

    parent = tessera.load("default")
    scores, library = load_scores_stage(args.out / "scores")
    if args.part in ("choice", "answers", "scoring"):
        costs = CostTable.from_json((args.out / "costs.json").read_text())
        part = {"choice": part_choice, "answers": part_answers, "scoring": part_scoring}[args.part]
        part(args, parent, library, scores, costs, answers_of(args))
    elif args.part == "healed":
        part_healed(args, parent)
    else:
        part_context(args, parent, library, scores)


if __name__ == "__main__":
    main()
