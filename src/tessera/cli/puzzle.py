"""Puzzle commands: `tessera puzzle library|bld|score|mip|assemble` (one stage each, each reading the previous stage's
directory) and `tessera search` (every stage, resumable). The work is `tessera.puzzle.run`'s; this only parses and
prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tessera.cli.app import DEVICE_HELP, app, console, echo_json, friendly, int_list
from tessera.errors import TesseraError

puzzle_app = typer.Typer(no_args_is_help=True, help="Puzzle NAS, one stage at a time (tessera search runs them all).")
app.add_typer(puzzle_app, name="puzzle")

TASKS_HELP = ("score on the gold answers of these held-out task items instead, e.g. arc_easy:1000-1060,lambada:1000-1024 "
              "(TASK:START-STOP, comma-separated; keep them apart from the items you report accuracy on)")
DATA_HELP = "text/JSONL dealt into calibration / selection / reporting splits (default: the shared corpus)"
TARGET_HELP = ("one or more of --target-speedup, --max-memory-gb, --min-throughput; costs are measured on this "
               "machine unless --gpu names a cost-model profile")

# the target and cost options `mip` and `search` share
TargetSpeedup = Annotated[float, typer.Option("--target-speedup", help="speed-up over the parent >= S")]
MaxMemoryGB = Annotated[float, typer.Option("--max-memory-gb", help="weights + KV cache <= M GB")]
MinThroughput = Annotated[float, typer.Option("--min-throughput", help="tokens/s >= T")]
Phase = Annotated[str, typer.Option("--phase", help="e2e | decode | prefill (for speed-up / throughput)")]
Gpu = Annotated[str, typer.Option("--gpu", help="cost-model profile (h100, a100, ...); default: measure here")]
Device = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
Dtype = Annotated[str, typer.Option("--dtype", help="weights dtype (default: fp32 on cpu, bf16 otherwise)")]
ScenarioOpt = Annotated[str, typer.Option("--scenario", help="IN/OUT tokens, comma-separated for several")]
CostBatch = Annotated[int, typer.Option("--batch", min=1, help="concurrent sequences the costs are for")]
RefineRounds = Annotated[int, typer.Option("--refine-rounds", min=0, help="refine the MIP's choice for up to N "
                                           "rounds: measure the child's in-context block costs on the scoring data, "
                                           "rescale the scores, solve again; keep the closest child (0: the MIP's "
                                           "choice as it is)")]
GkdDtype = Annotated[str, typer.Option("--gkd-dtype", help="global distillation's compute dtype: fp32 | bf16 | fp16 "
                                       "(default: fp32 on cpu, bf16 on a GPU; bf16 is ~2x faster on a CPU with "
                                       "AVX512-BF16)")]


def _fractions(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TesseraError(f"--ffn-fractions {text!r}: give comma-separated fractions, e.g. 0.75,0.5,0.25") from None
    if not values:
        raise TesseraError("--ffn-fractions is empty; give e.g. 0.75,0.5,0.25")
    return values


def _library_config(kv_heads, ffn_fractions, ffn_widths, ffn_multiple, no_linear, no_noop, engine):
    from tessera.puzzle.library import DEFAULT_FFN_FRACTIONS, LibraryConfig

    return LibraryConfig(kv_heads=tuple(int_list(kv_heads, "--kv-heads")) if kv_heads else None,
                         ffn_fractions=_fractions(ffn_fractions) or DEFAULT_FFN_FRACTIONS,
                         ffn_widths=tuple(int_list(ffn_widths, "--ffn-widths")) if ffn_widths else (),
                         ffn_multiple=ffn_multiple, linear_attention=not no_linear, linear_ffn=not no_linear,
                         no_op_attention=not no_noop, no_op_ffn=not no_noop, engine=engine)


def _target(gpu: str | None, device: str, dtype: str | None, scenario: str, batch: int):
    """(Target, costs source): a cost-model profile with --gpu, else this machine's device, measured."""
    from tessera.devices import default_dtype, resolve_device
    from tessera.puzzle.costs import Target

    if gpu is not None:
        return Target.parse(gpu, dtype or "bf16", scenario, batch), "predicted"
    where = resolve_device(device)
    return Target.parse(where.type, dtype or default_dtype(where), scenario, batch), "measured"


def _say(msg: str) -> None:
    console.print(msg, highlight=False)


def _parent_for(library, parent: str | None):
    """The library's parent (from its recorded source, or `--parent`), checked against its fingerprint."""
    from tessera.checkpoint import load

    return library.load_parent(load(parent) if parent else None)


# ---------------------------------------------------------------------------- stages
@puzzle_app.command("library")
@friendly
def library_cmd(parent: str = typer.Argument(..., help="'default', a model directory or .gguf"),
                out: Path = typer.Option(..., "--out", help="library directory to create"),
                kv_heads: str = typer.Option(None, "--kv-heads", help="KV-head counts to offer (default: all that fit)"),
                ffn_fractions: str = typer.Option(None, "--ffn-fractions",
                                                  help="FFN widths as fractions of the parent's (default "
                                                       "0.87,0.75,0.5,0.25,0.2,0.1)"),
                ffn_widths: str = typer.Option(None, "--ffn-widths", help="extra explicit FFN widths"),
                ffn_multiple: int = typer.Option(64, "--ffn-multiple", min=1, help="round widths to this multiple"),
                no_linear: bool = typer.Option(False, "--no-linear", help="offer no linear replacements"),
                no_noop: bool = typer.Option(False, "--no-noop", help="offer no no-op replacements"),
                engine: str = typer.Option(None, "--engine", help="vllm | llamacpp: leave out what it cannot serve"),
                data: Path = typer.Option(None, "--data", help=DATA_HELP),
                samples: int = typer.Option(64, "--samples", min=1, help="calibration chunks for the statistics"),
                seq_len: int = typer.Option(256, "--seq-len", min=2),
                force: bool = typer.Option(False, "--force"), as_json: bool = typer.Option(False, "--json")):
    """Stage 1: offer per-layer attention / FFN variants and calibrate their initialisation from the parent."""
    from tessera.checkpoint import load
    from tessera.io import refuse_overwrite
    from tessera.puzzle.library import count, variant_lists
    from tessera.puzzle.run import SearchConfig, stage_library

    refuse_overwrite(out, force, "library directory")
    lcfg = _library_config(kv_heads, ffn_fractions, ffn_widths, ffn_multiple, no_linear, no_noop, engine)
    m = load(parent)
    variant_lists(m.arch, lcfg)  # a variant list that does not fit the parent is refused before any work
    cfg = SearchConfig(library=lcfg, data=str(data) if data else None, seq_len=seq_len, calib_samples=samples)
    lib = stage_library(m, parent, cfg, out, force=force)
    n_att, n_ffn = count(lib.layers)
    summary = {"out": str(out), "layers": lib.arch.num_layers, "attention_variants": n_att, "ffn_variants": n_ffn,
               "excluded": len(lib.excluded), "pair_exclusions": len(lib.pair_exclusions)}
    if as_json:
        echo_json(summary)
        return
    _say(f"library of {lib.arch.num_layers} layers: {n_att} attention and {n_ffn} FFN variants in all "
         f"({len(lib.excluded)} left out for the engine); wrote {out}")


@puzzle_app.command("bld")
@friendly
def bld_cmd(library: Path = typer.Argument(..., help="a library directory (tessera puzzle library)"),
            tokens: int = typer.Option(65_536, "--tokens", min=1, help="calibration tokens each variant trains on"),
            batch: int = typer.Option(8, "--batch", min=1), lr: float = typer.Option(1e-4, "--lr"),
            data: Path = typer.Option(None, "--data", help=DATA_HELP),
            seq_len: int = typer.Option(256, "--seq-len", min=2),
            parent: str = typer.Option(None, "--parent", help="the parent, if not at the library's recorded source"),
            force: bool = typer.Option(False, "--force", help="restart instead of resuming"),
            as_json: bool = typer.Option(False, "--json")):
    """Stage 2: blockwise local distillation of every variant (into LIBRARY/bld; a killed run resumes)."""
    from tessera.puzzle.bld import bld_dir
    from tessera.puzzle.run import STAGE_FILE, SearchConfig, bld_state, load_library, stage_bld

    lib = load_library(library)
    if bld_state(lib) == "complete" and not force:
        raise TesseraError(f"{bld_dir(lib)}: BLD is already complete; pass --force to train again")
    (bld_dir(lib) / STAGE_FILE).unlink(missing_ok=True)
    m = _parent_for(lib, parent)
    cfg = SearchConfig(data=str(data) if data else None, seq_len=seq_len, bld_tokens=tokens, bld_batch=batch,
                       bld_lr=lr)
    report = stage_bld(lib, m, cfg, force=force, progress=not as_json)
    summary = {"library": str(library), "variants": len(report.variants), "seconds": round(report.seconds, 1),
               "tokens_per_s": round(report.tokens_per_s, 1),
               "mean_nmse_init": _mean(report.nmse("init")), "mean_nmse_final": _mean(report.nmse("final"))}
    if as_json:
        echo_json(summary)
        return
    _say(f"BLD trained {summary['variants']} variants in {summary['seconds']:.0f} s ({summary['tokens_per_s']:.0f} "
         f"tokens/s); mean normalised MSE {summary['mean_nmse_init']:.4f} -> {summary['mean_nmse_final']:.4f}")


def _mean(values: dict) -> float:
    vals = [v for v in values.values() if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


@puzzle_app.command("score")
@friendly
def score_cmd(library: Path = typer.Argument(..., help="a library directory (after tessera puzzle bld)"),
              out: Path = typer.Option(..., "--out", help="scores directory"),
              samples: int = typer.Option(16, "--samples", min=1, help="held-out chunks the scores are measured on"),
              data: Path = typer.Option(None, "--data", help=DATA_HELP),
              split: str = typer.Option("selection", "--split",
                                        help="the split scored on (selection; it must not overlap calibration)"),
              seq_len: int = typer.Option(256, "--seq-len", min=2),
              tasks: str = typer.Option(None, "--tasks", help=TASKS_HELP),
              parent: str = typer.Option(None, "--parent", help="the parent, if not at the library's recorded source"),
              heatmap: Path = typer.Option(None, "--heatmap", help="also plot layers x variants to this PNG"),
              force: bool = typer.Option(False, "--force"), as_json: bool = typer.Option(False, "--json")):
    """Stage 3: replace-1-block KL of every variant (cached; a killed run resumes)."""
    from tessera.puzzle.run import SearchConfig, load_library, stage_score
    from tessera.puzzle.scoring import rich_score_table, score_rows

    lib = load_library(library)
    m = _parent_for(lib, parent)
    cfg = SearchConfig(data=str(data) if data else None, seq_len=seq_len, score_samples=samples,
                       score_tasks=_spans(tasks))
    table = stage_score(lib, m, cfg, out, force=force, progress=not as_json, split=split)
    if heatmap is not None:
        from tessera.plots import plot_score_heatmap

        keys, rows = score_rows(table, lib)
        plot_score_heatmap(rows, keys, heatmap)
    if as_json:
        echo_json({"out": str(out), "tokens": table.tokens, "parent_lm_loss": table.parent_lm_loss,
                   "scores": [{"layer": i, "key": k, "kl": v} for (i, k), v in sorted(table.kl.items())]})
        return
    console.print(rich_score_table(table, lib))
    where = f"answer positions of {table.data['source']}" if tasks else f"tokens of the {split} split"
    _say(f"scored {len(table.kl)} candidates on {table.tokens:,} {where}; wrote {out}")


def _spans(tasks: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in tasks.split(",") if x.strip()) if tasks else ()


def _targets(target_speedup, max_memory_gb, min_throughput, phase):
    from tessera.puzzle.run import constraints_from

    return constraints_from(target_speedup, max_memory_gb, min_throughput, phase=phase)


def _print_choice(record: dict) -> None:
    from rich.table import Table

    t = Table(title=f"chosen child (summed score {record['objective']:.4g})")
    for col in ("layer", "attention", "FFN"):
        t.add_column(col, justify="right" if col == "layer" else "left")
    for row in record["chosen"]:
        t.add_row(str(row["layer"]), row["attention"], row["ffn"])
    console.print(t)
    for label, value in record.get("constraint_values", {}).items():
        _say(f"  {label}: predicted {value:.4g}")


@puzzle_app.command("mip")
@friendly
def mip_cmd(scores: Path = typer.Argument(..., help="a scores directory (tessera puzzle score)"),
            out: Path = typer.Option(..., "--out", help="MIP directory"),
            target_speedup: TargetSpeedup = None, max_memory_gb: MaxMemoryGB = None,
            min_throughput: MinThroughput = None, phase: Phase = "e2e", gpu: Gpu = None, device: Device = "auto",
            dtype: Dtype = None, scenario: ScenarioOpt = "128/128", batch: CostBatch = 1,
            reps: int = typer.Option(3, "--reps", min=1, help="timing repetitions when measuring"),
            num_solutions: int = typer.Option(1, "--num-solutions", min=1),
            refine_rounds: RefineRounds = 0,
            parent: str = typer.Option(None, "--parent", help="the parent (--refine-rounds), if not at the "
                                                              "library's recorded source"),
            force: bool = typer.Option(False, "--force"), as_json: bool = typer.Option(False, "--json")):
    """Stage 4: cost every variant and choose one attention and one FFN variant per layer. """ + TARGET_HELP
    from tessera.checkpoint import load
    from tessera.io import refuse_overwrite
    from tessera.puzzle.run import SearchConfig, stage_mip

    constraints = _targets(target_speedup, max_memory_gb, min_throughput, phase)
    target, source = _target(gpu, device, dtype, scenario, batch)
    cfg = SearchConfig(constraints=constraints, target=target, costs=source, measure_reps=reps,
                       num_solutions=num_solutions, refine_rounds=refine_rounds)
    m = None
    if refine_rounds and parent:
        refuse_overwrite(out, force, "MIP directory")  # before loading the parent
        m = load(parent)
    record = stage_mip(scores, cfg, out, force=force, progress=None if as_json else _say, parent=m)
    if as_json:
        echo_json({"out": str(out), **{k: record[k] for k in ("chosen", "objective", "predicted", "constraint_values",
                                                                "alternatives")}})
        return
    _print_choice(record)
    _say(f"wrote {out}")


@puzzle_app.command("assemble")
@friendly
def assemble_cmd(mip: Path = typer.Argument(..., help="a MIP directory (tessera puzzle mip)"),
                 out: Path = typer.Option(..., "--out", help="child checkpoint directory"),
                 gkd_tokens: int = typer.Option(131_072, "--gkd-tokens", min=0, help="global distillation tokens (0: none)"),
                 batch: int = typer.Option(8, "--batch", min=1), lr: float = typer.Option(1e-4, "--lr"),
                 gkd_dtype: GkdDtype = None,
                 data: Path = typer.Option(None, "--data", help=DATA_HELP),
                 seq_len: int = typer.Option(256, "--seq-len", min=2),
                 report_samples: int = typer.Option(16, "--report-samples", min=1,
                                                    help="reporting chunks for the child's KLD to the parent"),
                 parent: str = typer.Option(None, "--parent", help="the parent, if not at the library's recorded source"),
                 force: bool = typer.Option(False, "--force"), as_json: bool = typer.Option(False, "--json")):
    """Stage 5: build the chosen child from the trained variants, heal it by global distillation, save it (nemotron-nas
    with search.json)."""
    from tessera.io import refuse_overwrite
    from tessera.puzzle.run import SearchConfig, load_mip, stage_assemble

    refuse_overwrite(out, force, "child directory")
    _record, lib = load_mip(mip)
    m = _parent_for(lib, parent)
    cfg = SearchConfig(data=str(data) if data else None, seq_len=seq_len, gkd_tokens=gkd_tokens, gkd_batch=batch,
                       gkd_lr=lr, gkd_dtype=gkd_dtype, report_samples=report_samples)
    full = stage_assemble(mip, m, cfg, out, force=force, fresh=force, progress=not as_json)
    _report(full, out, as_json)


def _report(full: dict, out: Path, as_json: bool, seconds: dict | None = None) -> None:
    rep, gkd = full["report"], full.get("gkd")
    summary = {"out": str(out), "kld_assembled": rep["kld_assembled"], "kld": rep["kld"],
               "gkd_tokens": gkd["tokens"] if gkd else 0, "predicted": full["predicted"],
               "constraint_values": full["constraint_values"], "seconds": seconds}
    if as_json:
        echo_json(summary)
        return
    _print_choice(full)
    heal = f", {rep['kld']:.4f} after {gkd['tokens']:,} tokens of global distillation" if gkd else ""
    _say(f"KLD to the parent on {rep['data']['tokens']:,} reporting tokens: {rep['kld_assembled']:.4f} assembled{heal}")
    if seconds:
        _say("wall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    _say(f"wrote {out} (search.json beside the weights)")


# ---------------------------------------------------------------------------- everything
@app.command("search")
@friendly
def search_cmd(parent: str = typer.Argument(..., help="'default', a model directory or .gguf"),
               out: Path = typer.Option(..., "--out", help="search directory (its stages; the child in OUT/child)"),
               target_speedup: TargetSpeedup = None, max_memory_gb: MaxMemoryGB = None,
               min_throughput: MinThroughput = None, phase: Phase = "e2e", gpu: Gpu = None, device: Device = "auto",
               dtype: Dtype = None, scenario: ScenarioOpt = "128/128", batch: CostBatch = 1,
               engine: str = typer.Option(None, "--engine", help="vllm | llamacpp: only variants it can serve"),
               gkd_tokens: int = typer.Option(131_072, "--gkd-tokens", min=0, help="global distillation tokens (0: none)"),
               gkd_dtype: GkdDtype = None, refine_rounds: RefineRounds = 0,
               bld_tokens: int = typer.Option(65_536, "--bld-tokens", min=0, help="BLD tokens per variant (0: none)"),
               ffn_fractions: str = typer.Option(None, "--ffn-fractions", help="FFN widths offered, as fractions"),
               calib_samples: int = typer.Option(64, "--calib-samples", min=1),
               score_samples: int = typer.Option(16, "--score-samples", min=1),
               score_tasks: str = typer.Option(None, "--score-tasks", help=TASKS_HELP),
               data: Path = typer.Option(None, "--data", help=DATA_HELP),
               seq_len: int = typer.Option(256, "--seq-len", min=2),
               force: bool = typer.Option(False, "--force", help="redo every stage"),
               as_json: bool = typer.Option(False, "--json")):
    """Puzzle NAS end to end: library, BLD, scores, MIP, assembled and distilled child. A killed run resumes; a
    stage made with other settings is refused unless --force. """ + TARGET_HELP
    from tessera.puzzle.run import SearchConfig, run_search

    constraints = _targets(target_speedup, max_memory_gb, min_throughput, phase)
    target, source = _target(gpu, device, dtype, scenario, batch)
    lcfg = _library_config(None, ffn_fractions, None, 64, False, False, engine)
    cfg = SearchConfig(constraints=constraints, target=target, costs=source, library=lcfg,
                       data=str(data) if data else None, seq_len=seq_len, calib_samples=calib_samples,
                       bld_tokens=bld_tokens, score_samples=score_samples, score_tasks=_spans(score_tasks),
                       gkd_tokens=gkd_tokens, gkd_dtype=gkd_dtype, refine_rounds=refine_rounds)
    result = run_search(parent, cfg, out, force=force, progress=not as_json, log=None if as_json else _say)
    if result.reused and not as_json:
        _say(f"reused complete stages: {', '.join(result.reused)}")
    _report(result.record, result.child, as_json, result.seconds)
