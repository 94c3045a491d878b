"""Puzzle on the default parent, against Minitron (uniform width) and ShortGPT (depth) children of the same speed.

One run: the block library, BLD, replace-1-block scores and per-variant decode costs measured on this CPU (batch 1)
are made once (`tessera.puzzle.run`'s stages, kept under --out so a killed run resumes); then for each decode
speed-up S the MIP picks the Puzzle child, and two baselines are cut to the same predicted decode time from the
same measured cost table:

* Minitron: every layer's FFN pruned to one width w (activation importance, `tessera.prune`), the widest w whose
  predicted decode time meets S (widths between the measured ones interpolated);
* ShortGPT: the layers with the lowest Block Importance dropped (`tessera.prune.shortgpt`), the most layers kept
  that meet S.

With --score-tasks (e.g. `arc_easy:1000-1060 lambada:1000-1024`), every variant is also scored on the gold answers
of those held-out task items (`tessera.evaluate.tasks.answer_split`: KL only at the positions predicting the
answer tokens), and the MIP minimises the sum of the two replace-1-block KLs; items the accuracy is reported on
(0 .. --limit-1 of the reported tasks) are refused.

With --refine-rounds N, each Puzzle child is refined after the MIP (`tessera.puzzle.refine`): the MIP's child is
measured on the scoring data (its KL, and the in-context cost of each layer it changes: the KL it gives back when
that layer alone gets the parent's block), each layer's scores are rescaled by in-context cost / summed score, and
the MIP is solved again, up to N rounds; the child with the lowest measured KL is built.

With --alternatives K, the MIP's K next best children of each target (each differing from every earlier one in
>= (1 - --alpha) x layers) are healed and measured beside its choice: how much children the summed score cannot
tell apart differ once healed. With --keep-attention, the MIP may remove (or linearise) a layer's attention only
where it drops the whole layer, so every Puzzle child keeps attention wherever it keeps a layer.

All children are healed by global distillation with the same token budget, lr and batch (by default Puzzle and
Minitron: KL + cosine on every layer's output; ShortGPT, which has fewer layers: KL + cosine on the final hidden
state; --gkd-loss kl or kl+cosine gives every child that one loss),
then measured: decode speed-up over the parent at batch 1 and 8 (`tessera.bench`), KLD to the parent on the
reporting split, accuracy on shared bench tasks (mean and standard error), and each Puzzle child minus each baseline
of its target paired on the same reporting chunks and task items (difference and its paired standard error, which
leaves out the variance the items share). Prints markdown tables and the wall time of each stage; writes
results.json (with each child's per-chunk KLD and per-item outcomes) and frontier plots to --out.

    flock /work/bench.lock .venv/bin/python benchmarks/puzzle.py --threads 2 --out /tmp/puzzle_bench
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

import tessera
from tessera.cost import Scenario
from tessera.puzzle.costs import CostTable, Target
from tessera.puzzle.mip import Constraint, solve
from tessera.puzzle.run import (
    STAGE_FILE,
    SearchConfig,
    bld_state,
    compute_costs,
    load_library,
    load_scores_stage,
    scores_data,
    stage_bld,
    stage_library,
    stage_score,
)

TASKS = ["arc_easy", "winogrande", "lambada"]
# question-answer text for `--search-data mix`: bench tasks this benchmark never reports, whole (gold answers)
MIX_TASKS = ["boolq", "openbookqa", "mmlu"]
assert not set(MIX_TASKS) & set(TASKS)
STAGE_SECONDS: dict[str, float] = {}


def timed(name: str, fn):
    t0 = time.perf_counter()
    value = fn()
    STAGE_SECONDS[name] = STAGE_SECONDS.get(name, 0.0) + time.perf_counter() - t0
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return value


def search_stages(parent, cfg: SearchConfig, out: Path):
    """Library, BLD, scores and measured costs, each reused when a complete one is under `out`. With
    `cfg.score_tasks`, a second score table on the answers of those task items (`tessera.evaluate.tasks.
    answer_split`) in `out/scores_answers`, and the MIP's quality term is the sum of the two KLs per candidate."""
    lib_dir, score_dir, cost_file = out / "library", out / "scores", out / "costs.json"
    text_cfg = replace(cfg, score_tasks=())
    if (lib_dir / STAGE_FILE).is_file():
        library = load_library(lib_dir, parent)
    else:
        library = timed("library", lambda: stage_library(parent, "default", cfg, lib_dir, force=True))
    if bld_state(library) != "complete":
        timed("bld", lambda: stage_bld(library, parent, cfg, progress=False))
    if not (score_dir / STAGE_FILE).is_file():
        timed("score", lambda: stage_score(library, parent, text_cfg, score_dir, progress=False))
    table, library = load_scores_stage(score_dir)
    if cfg.score_tasks:  # the answers of held-out task items, scored beside the text (scores_answers/)
        ans_dir = out / "scores_answers"
        if not (ans_dir / STAGE_FILE).is_file():
            timed("score (answers)", lambda: stage_score(library, parent, cfg, ans_dir, progress=False))
        answers, _ = load_scores_stage(ans_dir, library)
        table = replace(table, kl={k: v + answers.kl[k] for k, v in table.kl.items()}, data={
            "text": table.data, "answers": answers.data})
    if cost_file.is_file():
        costs = CostTable.from_json(cost_file.read_text())
    else:
        costs = timed("costs (measured)", lambda: compute_costs(library, cfg))
        cost_file.write_text(costs.to_json())
    return library, table, costs


def search_mix(out: Path) -> Path:
    """`out/search_mix.txt`: the shared corpus's calibration split (books) interleaved block by block with the
    gold question-answer text of MIX_TASKS (0-shot prompts, items shuffled with seed 0), equal shares. The search
    (library statistics, BLD, scores) reads its calibration and selection splits; the books' selection and
    reporting splits (GKD validation, reported KLD) never enter it. Written once."""
    import random

    from tessera.data import default_corpus, interleave, split_text
    from tessera.evaluate.tasks import TASKS as REGISTRY
    from tessera.evaluate.tasks import bench_dir, items_text, load_items, load_mmlu
    from tessera.io import atomic_write_text

    path = out / "search_mix.txt"
    if path.is_file():
        return path
    qa = []
    for name in MIX_TASKS:  # MMLU without its 5 dev shots, which would repeat in every item
        items = list(load_mmlu(bench_dir(), k_shot=0)) if name == "mmlu" else load_items(REGISTRY[name])
        qa += items_text(items)
    random.Random(0).shuffle(qa)
    atomic_write_text(path, interleave([split_text(default_corpus(), "calibration"), "\n\n".join(qa)]))
    return path


def seed_baselines(args) -> None:
    """Start `--out` with the parent's accuracy, the Minitron and ShortGPT rows (their saved children), the
    measured cost table and their timings from an earlier run with the same healing, evaluation and timing
    settings, so that only the Puzzle children are built and measured here."""
    from tessera.io import atomic_write_text

    src = args.baselines_from
    try:
        old = json.loads((src / "results.json").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"--baselines-from {src}: no readable results.json; give an earlier --out of this "
                         "benchmark") from None
    same = ("gkd_tokens", "gkd_dtype", "lr", "batch", "limit", "seq_len", "report_samples", "scenario", "batches",
            "reps", "calib_samples", "gkd_data")
    before = {"gkd_data": "corpus", **old.get("args", {})}  # runs made before --gkd-data healed on the corpus
    differ = [k for k in same if before.get(k) != str(getattr(args, k))]
    if differ:
        raise SystemExit(f"--baselines-from {src}: its {', '.join(differ)} differ from this run's; rerun with the "
                         "same settings or drop --baselines-from")
    wrong = sorted({f"{r['method']} ({r['gkd']['loss']})" for r in old["rows"] if method_of(r["method"]) != "puzzle"
                    and r["target"] in args.speedups and r["gkd"]["loss"] != gkd_loss(args, r["method"])})
    if wrong:
        raise SystemExit(f"--baselines-from {src}: its {', '.join(wrong)} children were healed with another loss than "
                         "this run's --gkd-loss gives them; rerun with the same --gkd-loss or drop --baselines-from")
    results = _results(args)
    if results["rows"]:
        return
    results["parent"] = old["parent"]
    results["rows"] = [{**r, "reused_from": str(src)} for r in old["rows"]
                       if method_of(r["method"]) != "puzzle" and r["target"] in args.speedups]
    results["baselines_from"] = str(src)
    if not (args.out / "costs.json").is_file():  # the same cost table: the baselines' shapes depend on it
        atomic_write_text(args.out / "costs.json", (src / "costs.json").read_text())
    measured = json.loads((src / "measure.json").read_text()) if (src / "measure.json").is_file() else {}
    keep = {r["path"]: measured[r["path"]] for r in results["rows"] if r["path"] in measured}
    atomic_write_text(args.out / "measure.json", json.dumps(keep, indent=1))
    _write(args, results)  # last: a run killed before this seeds again


def ffn_decode_time(costs: CostTable, width: int) -> float:
    """Per-layer decode seconds of a SwiGLU of `width`, interpolated (linearly in width) between measured widths."""
    pts = sorted((costs.variant(k).spec.intermediate_size, c.decode_s[0]) for k, c in costs.sub.items()
                 if k.startswith("ffn.swiglu-") and "@" not in k)
    for (w0, t0), (w1, t1) in zip(pts, pts[1:]):
        if w0 <= width <= w1:
            return t0 + (t1 - t0) * (width - w0) / (w1 - w0)
    (w0, t0), (w1, t1) = (pts[0], pts[1]) if width < pts[0][0] else (pts[-2], pts[-1])
    return max(0.0, t0 + (t1 - t0) * (width - w0) / (w1 - w0))


def context_free_pairs(scores) -> list[tuple[str, str]]:
    """--keep-attention: every (attention, FFN) pair whose attention sees only the current token (no-op or linear)
    except the whole layer dropped (no-op beside no-op), for the MIP's `exclude`."""
    keys = {k for _, k in scores}
    return [(a, f) for a in keys if a in ("attn.no_op", "attn.linear") for f in keys if f.startswith("ffn.")
            and (a, f) != ("attn.no_op", "ffn.no_op")]


def baseline_shapes(costs: CostTable, speedup: float, parent_arch) -> dict:
    """Minitron's uniform FFN width and ShortGPT's layer count whose predicted decode time meets `speedup`."""
    attn0, ffn0 = (v.key for v in tessera.puzzle.library.parent_variants(parent_arch, 0))
    L = parent_arch.num_layers
    fixed, parent_total = costs.fixed.decode_s[0], costs.parent.decode_s[0]
    budget = parent_total / speedup
    layer = costs.pair(attn0, ffn0).decode_s[0]
    keep = max(1, min(L, math.floor((budget - fixed) / layer)))
    attn = costs.sub[attn0].decode_s[0]
    width_full = parent_arch.blocks[0].ffn.intermediate_size
    width, reachable = 64, False
    for w in range(width_full, 63, -64):
        if fixed + L * (attn + ffn_decode_time(costs, w)) <= budget:
            width, reachable = w, True
            break
    return {"minitron_ffn": width, "minitron_reachable": reachable,
            "minitron_predicted": parent_total / (fixed + L * (attn + ffn_decode_time(costs, width))),
            "shortgpt_layers": keep, "shortgpt_predicted": parent_total / (fixed + keep * layer)}


def method_of(name: str) -> str:
    """The method of a row: puzzle, minitron or shortgpt (`--alternatives` rows are puzzle-alt1, puzzle-alt2, ...)."""
    return name.split("-alt")[0]


def gkd_loss(args, method: str) -> str:
    """The healing loss of a method's children: --gkd-loss, or with auto KL + cosine on every layer's output where
    the child keeps the parent's depth and on the final hidden state where it has fewer layers (ShortGPT)."""
    from tessera.puzzle.assemble import GKD_LOSS  # Puzzle's own healing loss (KL + every layer's cosine)

    if args.gkd_loss != "auto":
        return args.gkd_loss
    return "kl+cosine" if method == "shortgpt" else GKD_LOSS


def heal(parent, child, train, held, args, loss: str):
    from tessera.distill import DistillConfig, distill

    cfg = DistillConfig(tokens=args.gkd_tokens, seq_len=args.seq_len, batch=args.batch, lr=args.lr, warmup_steps=2,
                        loss=loss, eval_every=10**9, ckpt_every=10**9, seed=0)
    child, log = distill(parent, child, train, cfg, heldout=held, progress=False, compute_dtype=args.gkd_dtype)
    return child, {"tokens": cfg.steps * cfg.tokens_per_step, "steps": cfg.steps, "loss": loss, "dtype": args.gkd_dtype,
                   "final_loss": log[-1]["loss"] if log else None}


def kld_stats(parent, child, chunks: torch.Tensor, ref: list[torch.Tensor], batch_size: int = 8) -> dict:
    """Mean KL(parent || child) over the reporting chunks and its standard error across chunks."""
    from tessera.evaluate import mean_kld
    from tessera.evaluate.metrics import mean_stderr

    per = []
    for j in range(len(chunks)):
        logits = ref[j // batch_size][j % batch_size:j % batch_size + 1]
        per.append(mean_kld(parent, child, chunks[j:j + 1], parent_logits=[logits]).kld)
    mean, se = mean_stderr(per)
    return {"kld": mean, "stderr": se, "chunks": len(per), "per_chunk": per}


def paired(row: dict, other: dict) -> dict:
    """`row` minus `other` measured on the same items: KLD per reporting chunk, accuracy per task item and its average
    over tasks (`tessera.evaluate.metrics`). Empty where either row was measured before per-item outcomes were kept."""
    from tessera.evaluate.metrics import paired_difference, paired_tasks

    out = {}
    if "kld_per_chunk" in row and "kld_per_chunk" in other:
        out["kld"] = paired_difference(row["kld_per_chunk"], other["kld_per_chunk"])
    a, b = row["accuracy"]["tasks"], other["accuracy"]["tasks"]
    if all("samples" in a[t] and "samples" in b.get(t, {}) for t in a):
        out |= paired_tasks({t: (a[t]["samples"], b[t]["samples"]) for t in a})
    return out


def accuracy(model, limit: int) -> dict:
    from tessera.evaluate import evaluate_tasks
    from tessera.evaluate.table import primary_metric

    res = evaluate_tasks(model, TASKS, limit=limit, progress=False, use_cache=False, log_samples=True)
    per = {}
    for t in TASKS:
        m = primary_metric(t, res[t])
        per[t] = {"metric": m, "acc": res[t][m], "stderr": res[t].get(f"{m}_stderr", float("nan")), "n": res[t]["n"],
                  "samples": [o[m] for o in res[t]["samples"]]}
    mean = sum(p["acc"] for p in per.values()) / len(per)
    se = math.sqrt(sum(p["stderr"] ** 2 for p in per.values())) / len(per)
    return {"tasks": per, "average": mean, "average_stderr": se}


def speed(model, scenario: Scenario, batches: list[int], reps: int) -> dict[int, float]:
    from tessera.bench import bench

    return {r.batch: r.decode_tok_s for r in bench(model, [scenario], batches, reps=reps, warmup=1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.25, 1.5, 2.0])
    ap.add_argument("--methods", nargs="+", choices=("puzzle", "minitron", "shortgpt"),
                    default=["puzzle", "minitron", "shortgpt"], help="which children to build")
    ap.add_argument("--scenario", default="32/32", help="IN/OUT tokens of the decode-speed measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes the children are timed at")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--bld-tokens", type=int, default=32768)
    ap.add_argument("--score-samples", type=int, default=4)
    ap.add_argument("--search-data", choices=("corpus", "mix"), default="corpus",
                    help="text of the search (library statistics, BLD, scores): the shared corpus (books), or "
                         "mix: its calibration split interleaved with question-answer text of bench tasks this "
                         "benchmark does not report (" + ", ".join(MIX_TASKS) + "); GKD: see --gkd-data")
    ap.add_argument("--score-tasks", nargs="*", default=[], metavar="TASK:START-STOP",
                    help="also score every variant on the gold answers of these held-out task items (e.g. "
                         "arc_easy:1000-1060 lambada:1000-1024; never the reported items 0..--limit-1) and give "
                         "the MIP the sum of both KLs")
    ap.add_argument("--refine-rounds", type=int, default=0,
                    help="refine each Puzzle child with its measured in-context block costs for up to N MIP rounds "
                         "(tessera.puzzle.refine; 0: the MIP's first choice, as in the paper)")
    ap.add_argument("--alternatives", type=int, default=0, metavar="K",
                    help="also build, heal and measure the MIP's K next best Puzzle children of each target (not "
                         "with --refine-rounds), each differing from every earlier one in >= (1 - --alpha) x layers: "
                         "how far children the summed score cannot tell apart differ once healed")
    ap.add_argument("--keep-attention", action="store_true",
                    help="Puzzle removes (no-op) or linearises attention only where it drops the whole layer")
    ap.add_argument("--alpha", type=float, default=0.5, help="diversity of --alternatives (0.5: half the layers differ)")
    ap.add_argument("--gkd-data", choices=("corpus", "mix"), default="corpus",
                    help="text of the global distillation of every child and of the baselines' importance: the "
                         "shared corpus's calibration split, or the mix of --search-data mix (the KLD is always "
                         "reported on the corpus's reporting split, which the mix never holds)")
    ap.add_argument("--baselines-from", type=Path, default=None,
                    help="reuse the parent accuracy, Minitron / ShortGPT children and their timings of an earlier "
                         "--out with the same healing, evaluation and timing settings")
    ap.add_argument("--gkd-tokens", type=int, default=16384, help="global distillation tokens per child (all alike)")
    ap.add_argument("--gkd-loss", choices=("auto", "kl", "kl+cosine"), default="auto",
                    help="auto: KL + cosine on every layer's output where the child has the parent's depth, on the "
                         "final hidden state where it has fewer layers; kl / kl+cosine: that loss for every child")
    ap.add_argument("--gkd-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="distillation compute dtype (bf16: autocast, fp32 master weights; ~2x faster on a CPU "
                         "with AVX512-BF16)")
    ap.add_argument("--batch", type=int, default=8, help="distillation batch (sequences)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--report-samples", type=int, default=8, help="reporting chunks for the KLD")
    ap.add_argument("--limit", type=int, default=200, help="items per accuracy task")
    ap.add_argument("--reps", type=int, default=3, help="timing repetitions")
    ap.add_argument("--llamacpp-decode", type=int, default=128, help="decode steps of the llama.cpp timing")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--phase", choices=("build", "measure", "all"), default="all",
                    help="build: search, children, distillation, quality; measure: the children's decode speed "
                         "(run it alone on the machine, e.g. under flock); all: both")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.alternatives and args.refine_rounds:
        raise SystemExit("--alternatives and --refine-rounds: refinement builds one child per target; drop one of them")
    check_score_tasks(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("build", "all"):
        build(args)
    if args.phase in ("measure", "all"):
        measure(args)


def check_score_tasks(args) -> None:
    """--score-tasks must name items none of the reported tasks' first --limit items (those are the accuracy)."""
    from tessera.errors import TesseraError
    from tessera.evaluate.tasks import parse_item_spans

    if not args.score_tasks:
        return
    try:
        spans = parse_item_spans(args.score_tasks)
    except TesseraError as e:
        raise SystemExit(f"--score-tasks: {e}") from None
    overlap = [f"{t}:{a}-{b}" for t, (a, b) in spans.items() if t in TASKS and a < args.limit]
    if overlap:
        raise SystemExit(f"--score-tasks {' '.join(overlap)}: overlaps the reported items 0-{args.limit - 1}; start "
                         f"at item {args.limit} or later")


def _results(args) -> dict:
    file = args.out / "results.json"
    return json.loads(file.read_text()) if file.is_file() else {"rows": [], "stage_seconds": {}}


def _write(args, results: dict) -> None:
    results["stage_seconds"] = {**results.get("stage_seconds", {}), **STAGE_SECONDS}
    results["args"] = {k: str(v) for k, v in vars(args).items()}
    tmp = args.out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(args.out / "results.json")


def build(args) -> None:
    from tessera.data import check_disjoint, load_split
    from tessera.evaluate import mean_kld, parent_logits_for
    from tessera.importance import activation_importance
    from tessera.prune import PruneTarget, prune, shortgpt
    from tessera.puzzle.assemble import assemble
    from tessera.puzzle.bld import variant_state

    t_start = time.perf_counter()
    if args.baselines_from:
        seed_baselines(args)
    results = _results(args)
    STAGE_SECONDS.update(results.get("stage_seconds", {}))
    parent = tessera.load("default")
    scenario = Scenario.parse(args.scenario)
    data = str(search_mix(args.out)) if args.search_data == "mix" else None
    cfg = SearchConfig(target=Target("cpu", "fp32", (args.scenario,), 1), costs="measured", data=data,
                       seq_len=args.seq_len, calib_samples=args.calib_samples, bld_tokens=args.bld_tokens,
                       score_samples=args.score_samples, score_tasks=tuple(args.score_tasks), measure_reps=args.reps)
    library, scores, costs = search_stages(parent, cfg, args.out)
    print(f"library: {sum(len(lv.attention) for lv in library.layers)} attention and "
          f"{sum(len(lv.ffn) for lv in library.layers)} FFN variants over {library.arch.num_layers} layers; "
          f"costs: {costs.source}", flush=True)

    heal_data = search_mix(args.out) if args.gkd_data == "mix" else None
    calibration = load_split(parent.tokenizer, "calibration", heal_data, seq_len=args.seq_len,
                             max_tokens=args.gkd_tokens + 2 * args.calib_samples * args.seq_len)
    held = load_split(parent.tokenizer, "selection", heal_data, seq_len=args.seq_len,
                      max_tokens=4 * args.seq_len).take(4)
    report = load_split(parent.tokenizer, "reporting", seq_len=args.seq_len,
                        max_tokens=args.report_samples * args.seq_len).take(args.report_samples)
    sel = scores.data if not args.score_tasks else scores.data["text"]
    records = {"calibration": calibration.record(), "selection (scores)": sel, "reporting": report.record()}
    check_disjoint(records)
    if args.score_tasks:
        records["answers (scores)"] = scores.data["answers"]
    results["data"] = records
    ref = parent_logits_for(parent, report.chunks)
    imp = timed("importance (Minitron / ShortGPT)",
                lambda: activation_importance(parent, calibration.take(args.calib_samples), with_drop_loss=False))
    if "parent" not in results:
        results["parent"] = {"accuracy": timed("evaluate parent", lambda: accuracy(parent, args.limit))}
        _write(args, results)
    parent_acc = results["parent"]["accuracy"]
    done = {(r["target"], r["method"]) for r in results["rows"]}
    measure = None
    if args.refine_rounds:  # the child's in-context costs on the data the scores were measured on
        from tessera.puzzle.refine import child_measure

        dirs = ["scores"] + (["scores_answers"] if args.score_tasks else [])
        measure = child_measure(parent, library, [scores_data(args.out / d, parent) for d in dirs])
    exclude = list(library.pair_exclusion_keys()) + (context_free_pairs(scores.kl) if args.keep_attention else [])
    for s in args.speedups:
        def mip(table, pairs=None, s=s, n=1):
            return solve(table, costs, [Constraint("speedup", s, phase="decode")], num_solutions=n,
                         alpha=args.alpha, exclude=exclude, pair_scores=pairs)[:n]

        refined = None
        if measure is not None and (s, "puzzle") not in done and "puzzle" in args.methods:
            from tessera.puzzle.refine import refine

            sol, history = timed("refine", lambda mip=mip: refine(scores.kl, lambda t, p: mip(t, p)[0], measure,
                                                                  rounds=args.refine_rounds))
            refined = [r.as_dict() for r in history]
            print(f"refine {s:g}x: measured " + " -> ".join(f"{r['measured']:.3f} (summed {r['summed']:.3f})"
                                                            for r in refined), flush=True)
        else:
            sol = timed("mip", lambda mip=mip: mip(scores.kl))[0]
        # the next best children, each differing from every earlier one in >= (1 - alpha) x layers
        sols = {"puzzle": sol} | {f"puzzle-alt{k}": alt for k, alt in enumerate(
            mip(scores.kl, n=1 + args.alternatives)[1:] if args.alternatives else [], 1)}
        shapes = baseline_shapes(costs, s, parent.arch)
        makers = {
            name: (lambda x=x: assemble(parent, library, x.layers,
                                        weights=lambda i, v: variant_state(library, parent, i, v)),
                   x.totals[f"speedup[{scenario},decode]"]) for name, x in sols.items()} | {
            "minitron": (lambda w=shapes["minitron_ffn"]: prune(parent, imp, PruneTarget(ffn=w)),
                         shapes["minitron_predicted"]),
            "shortgpt": (lambda n=shapes["shortgpt_layers"]: shortgpt(parent, imp, n), shapes["shortgpt_predicted"]),
        }
        for name, (make, predicted) in makers.items():
            if (s, name) in done or method_of(name) not in args.methods:
                continue
            loss = gkd_loss(args, name)
            child = timed("assemble / prune", make)
            kld_before = mean_kld(parent, child, report.chunks, parent_logits=ref).kld
            child, gkd = timed("gkd", lambda c=child, lo=loss: heal(parent, c, calibration.chunks, held.chunks, args,
                                                                    lo))
            kld = timed("evaluate", lambda c=child: kld_stats(parent, c, report.chunks, ref))
            acc = timed("evaluate", lambda c=child: accuracy(c, args.limit))
            shape = (f"FFN {shapes['minitron_ffn']}" + ("" if shapes["minitron_reachable"] else " (narrowest tried)")
                     if name == "minitron" else f"{shapes['shortgpt_layers']} layers" if name == "shortgpt"
                     else "; ".join(f"{k} x{n}" for k, n in _counts(sols[name])))
            path = args.out / "children" / f"{name}-{s:g}x"
            tessera.save(child, path, force=True)
            row = {"target": s, "method": name, "shape": shape, "params": child.arch.num_params(), "path": str(path),
                   "predicted_speedup": predicted, "kld_before": kld_before, "kld": kld["kld"],
                   "kld_stderr": kld["stderr"], "kld_per_chunk": kld["per_chunk"], "accuracy": acc,
                   "preserved": acc["average"] / parent_acc["average"],
                   "gkd": gkd, **({"summed_score": sols[name].objective} if name in sols else {}),
                   **({"refine": refined} if name == "puzzle" and refined else {})}
            results["rows"].append(row)
            _write(args, results)
            print(json.dumps({k: row[k] for k in ("target", "method", "shape", "predicted_speedup", "kld_before",
                                                  "kld", "kld_stderr", "preserved")}, default=str), flush=True)
            del child
    print(f"build: {time.perf_counter() - t_start:.0f} s", flush=True)


def measure(args) -> None:
    """Decode tokens/s of each saved child and of the parent right before and after it, at every batch size;
    speed-up = child / mean of the two parent runs. The same in llama.cpp (f32 GGUF, batch 1, in .venv-llamacpp;
    children it cannot serve say why) and the cost model's prediction (`tessera.cost.predict`, CPU profile, fp32).
    Kept in measure.json (children already measured are skipped, so this can run while `build` is still adding
    children); prints the tables and plots for the measured ones."""
    from tessera.formats.engines import incompatibilities

    results = _results(args)
    file = args.out / "measure.json"
    measured = json.loads(file.read_text()) if file.is_file() else {}
    scenario = Scenario.parse(args.scenario)
    todo = [r for r in results["rows"] if r["path"] not in measured]
    if todo:
        parent = tessera.load("default")
        parent_gguf = _gguf(parent, args.out / "children" / "parent.f32.gguf")
        parent_speed = timed("speed", lambda: speed(parent, scenario, args.batches, args.reps))
        parent_cpp = llamacpp_speed(parent_gguf, scenario, args)
        parent_pred = predicted(parent.arch, scenario, args.batches)
        for r in todo:
            child = tessera.load(r["path"])
            spd = timed("speed", lambda c=child: speed(c, scenario, args.batches, args.reps))
            again = speed(parent, scenario, args.batches, args.reps)  # load drifts on a shared machine
            base = {b: (parent_speed[b] + again[b]) / 2 for b in args.batches}
            entry = {"decode_tok_s": {str(b): spd[b] for b in args.batches},
                     "parent_decode_tok_s": {str(b): base[b] for b in args.batches},
                     "measured_speedup": {str(b): spd[b] / base[b] for b in args.batches},
                     "cost_model_speedup": {str(b): v / parent_pred[b]
                                            for b, v in predicted(child.arch, scenario, args.batches).items()}}
            why = incompatibilities(child.arch, "llamacpp")
            if why:
                entry["llamacpp"] = {"not_servable": str(why[0])}
            else:
                cpp = llamacpp_speed(_gguf(child, Path(r["path"] + ".f32.gguf")), scenario, args)
                cpp_again = llamacpp_speed(parent_gguf, scenario, args)
                if cpp and parent_cpp and cpp_again:
                    cpp_base = (parent_cpp + cpp_again) / 2
                    entry["llamacpp"] = {"decode_tok_s": cpp, "parent_decode_tok_s": cpp_base,
                                         "speedup": cpp / cpp_base}
                    parent_cpp = cpp_again
                else:
                    entry["llamacpp"] = {"failed": "llama.cpp did not run (.venv-llamacpp missing or failed)"}
            measured[r["path"]] = entry
            parent_speed = again
            tmp = args.out / ".measure.json.tmp"
            tmp.write_text(json.dumps(measured, indent=1))
            tmp.replace(file)
            print(json.dumps({"child": r["path"], **measured[r["path"]]}), flush=True)
            del child
    rows = [{**r, **measured[r["path"]]} for r in results["rows"] if r["path"] in measured]
    if not rows:
        return
    last = measured[rows[-1]["path"]]["parent_decode_tok_s"]
    _print(rows, results["parent"]["accuracy"], {b: last[str(b)] for b in args.batches}, args)
    _plots(rows, results["parent"]["accuracy"], args)
    print("\nwall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["stage_seconds"].items()))


def _gguf(model, path: Path) -> Path:
    from tessera.formats.gguf_export import export_gguf

    if not path.is_file():
        export_gguf(model, path, "f32")
    return path


def llamacpp_speed(gguf: Path, scenario: Scenario, args) -> float | None:
    """llama.cpp's decode tok/s (batch 1, prompt of the scenario's length, `--llamacpp-decode` steps)."""
    from engine_speed import PROMPT_IDS, engine_run

    request = {"prompts": [PROMPT_IDS], "max_tokens": 1,
               "bench": {"prompt_len": scenario.input_len, "decode_tokens": args.llamacpp_decode}}
    got = engine_run("llamacpp", gguf, request, torch.get_num_threads())
    return got["decode_tok_s"] if got else None


def predicted(arch, scenario: Scenario, batches: list[int]) -> dict[int, float]:
    from tessera.cost import predict
    from tessera.hardware import get_hardware

    hw = get_hardware("cpu")
    return {b: predict(arch, hw, scenario, dtype="fp32", batch=b).decode_tokens_per_s for b in batches}


def _counts(sol) -> list[tuple[str, int]]:
    from collections import Counter

    c = Counter(f"{a.key}+{f.key}" for a, f in sol.layers)
    return c.most_common()


def _print(rows, parent_acc, parent_speed, args) -> None:
    b = args.batches
    tasks = ", ".join(f"{t} {100 * v['acc']:.1f}" for t, v in parent_acc["tasks"].items())
    print(f"\nparent: average accuracy {100 * parent_acc['average']:.1f} ± {100 * parent_acc['average_stderr']:.1f} "
          f"({tasks}); decode " + ", ".join(f"{parent_speed[x]:.1f} tok/s at batch {x}" for x in b))
    head = " | ".join(f"measured x (b={x})" for x in b)
    print(f"\n| target | method | shape | params | KLD before | KLD after ± se | avg acc ± se | preserved | "
          f"predicted x (block costs) | {head} | cost model x (b={b[0]}) | llama.cpp x (b=1) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(b) + "---:|---:|")
    for r in rows:
        ms = " | ".join(f"{r['measured_speedup'][str(x)]:.2f}" for x in b)
        a, cpp = r["accuracy"], r.get("llamacpp", {})
        cpp_cell = (f"{cpp['speedup']:.2f}" if "speedup" in cpp
                    else f"- ({cpp.get('not_servable') or cpp.get('failed', 'not run')})")
        print(f"| {r['target']:.2f}x | {r['method']} | {r['shape']} | {r['params'] / 1e6:.1f} M | "
              f"{r['kld_before']:.3f} | {r['kld']:.3f} ± {r['kld_stderr']:.3f} | "
              f"{100 * a['average']:.1f} ± {100 * a['average_stderr']:.1f} | {100 * r['preserved']:.1f}% | "
              f"{r['predicted_speedup']:.2f} | {ms} | {r['cost_model_speedup'][str(b[0])]:.2f} | {cpp_cell} |")
    print("\nper task (accuracy ± se):")
    for r in rows:
        print(f"- {r['method']} {r['target']:g}x: " + ", ".join(
            f"{t} {100 * v['acc']:.1f} ± {100 * v['stderr']:.1f}" for t, v in r["accuracy"]["tasks"].items()))
    print("\nPuzzle minus each baseline of the same target, paired on the same reporting chunks and task items "
          "(difference ± paired se; z = difference / se):")
    for r in rows:
        for o in rows:
            if method_of(r["method"]) != "puzzle" or method_of(o["method"]) == "puzzle" or o["target"] != r["target"]:
                continue
            d = paired(r, o)
            cells = []
            if "kld" in d:
                cells.append(f"KLD {d['kld'][0]:+.3f} ± {d['kld'][1]:.3f} (z {d['kld'][0] / d['kld'][1]:+.1f})")
            if "average" in d:
                m, se = d["average"]
                cells.append(f"avg acc {100 * m:+.1f} ± {100 * se:.1f} (z {m / se:+.1f}; " + ", ".join(
                    f"{t} {100 * x:+.1f} ± {100 * e:.1f}" for t, (x, e) in d["tasks"].items()) + ")")
            print(f"- {r['target']:g}x {r['method']} - {o['method']}: " + ("; ".join(cells) or "not paired (rows from "
                                                                      "before per-item outcomes were kept)"))


def _plots(rows, parent_acc, args) -> None:
    from tessera.plots import plot_frontier

    kind = {"minitron": "baseline", "shortgpt": "baseline"}  # puzzle and its alternatives: "child"
    b = str(args.batches[0])
    pts = [{"name": "parent", "throughput": 1.0, "quality": 100.0, "kind": "parent"}]
    pts += [{"name": f"{r['method']} {r['target']}x", "throughput": r["measured_speedup"][b],
             "quality": 100 * r["preserved"], "kind": kind.get(r["method"], "child")} for r in rows]
    plot_frontier(pts, args.out / "frontier_accuracy.png", throughput_label=f"measured CPU decode speed-up (batch {b})",
                  title="Puzzle vs Minitron vs ShortGPT (default parent)")
    pts = [{"name": "parent", "throughput": 1.0, "quality": 0.0, "kind": "parent"}]
    pts += [{"name": f"{r['method']} {r['target']}x", "throughput": r["measured_speedup"][b], "quality": -r["kld"],
             "kind": kind.get(r["method"], "child")} for r in rows]
    plot_frontier(pts, args.out / "frontier_kld.png", quality_label="- KLD to the parent (nats/token)",
                  throughput_label=f"measured CPU decode speed-up (batch {b})",
                  title="Puzzle vs Minitron vs ShortGPT (default parent)")


if __name__ == "__main__":
    main()
