"""Evaluation commands: eval, perplexity, kld."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tessera.cli.app import DEVICE_HELP, DTYPE_HELP, STREAM_HELP, app, console, echo_json, friendly, load_model
from tessera.io import atomic_write_text, refuse_overwrite

SPLIT_HELP = "part of the text to score: reporting (default) | selection | calibration | all (the whole file)"


@app.command("eval")
@friendly
def eval_cmd(model: str = typer.Argument(..., help="'default', a model directory or .gguf"),
             tasks: str = typer.Option(None, "--tasks", "-t",
                                       help="comma-separated task names or custom .jsonl files (default: all but gsm8k)"),
             limit: int = typer.Option(None, "--limit", min=1, help="first N items of each task"),
             batch_size: int = typer.Option(16, "--batch-size", min=1),
             baseline: str = typer.Option(None, "--baseline", help="parent model: adds the accuracy-preserved table"),
             data_dir: Path = typer.Option(None, "--data-dir", envvar="TESSERA_BENCH_DIR", help="benchmark data root"),
             out: Path = typer.Option(None, "--out", help="write results JSON here (+ .md table with --baseline)"),
             no_cache: bool = typer.Option(False, "--no-cache", help="ignore and do not write the results cache"),
             device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
             force: bool = typer.Option(False, "--force", help="overwrite --out"),
             as_json: bool = typer.Option(False, "--json", help="print the results as JSON instead of tables")):
    """Accuracy on multiple-choice benchmarks (lm-eval-harness prompts), with standard errors. With --baseline, the
    accuracy-preserved table, and child - baseline per task with its paired standard error (both models on the same
    items)."""
    from tessera.evaluate import DEFAULT_TASKS, accuracy_preserved, evaluate_tasks, get_task, render_preserved_markdown
    from tessera.evaluate.table import rich_preserved_table, rich_results_table

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(DEFAULT_TASKS)
    if out:
        refuse_overwrite(out, force)
        if baseline:
            refuse_overwrite(out.with_suffix(".md"), force)
    for name in names:
        get_task(name)
    kwargs = dict(limit=limit, batch_size=batch_size, data_dir=data_dir, use_cache=not no_cache, progress=not as_json,
                  log_samples=bool(baseline))  # each item's outcome: the child - parent difference, paired
    results = evaluate_tasks(load_model(model, device, dtype), names, **kwargs)
    if not as_json:
        console.print(rich_results_table(results, title=f"{model}" + (f" (limit {limit})" if limit else "")))
    payload = {"model": model, "limit": limit, "results": results}
    if baseline:
        parent = evaluate_tasks(load_model(baseline, device, dtype), names, **kwargs)
        table = accuracy_preserved(results, parent)
        if not as_json:
            console.print(rich_preserved_table(table, title=f"accuracy preserved: {model} vs {baseline}"))
        for r in (*results.values(), *parent.values()):  # the table holds what they were kept for
            r.pop("samples", None)
        payload |= {"baseline": baseline, "baseline_results": parent, "preserved": table}
        if out:
            atomic_write_text(out.with_suffix(".md"), render_preserved_markdown(table))
    if out:
        atomic_write_text(out, json.dumps(payload, indent=2, sort_keys=True))
    if as_json:
        echo_json(payload)
    elif out:
        console.print(f"wrote {out}", highlight=False)


@app.command()
@friendly
def perplexity(model: str = typer.Argument(...),
               file: Path = typer.Argument(None, help="text or JSONL file (default: the shared corpus)"),
               split: str = typer.Option("reporting", help=SPLIT_HELP),
               max_len: int = typer.Option(None, "--max-len", help="window (default: min(max positions, 2048))"),
               stride: int = typer.Option(None, "--stride", help="window step (default: the window)"),
               max_tokens: int = typer.Option(None, "--max-tokens", help="score only the first N tokens"),
               device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
               as_json: bool = typer.Option(False, "--json")):
    """Perplexity of a text with a sliding window; each token is scored once."""
    from tessera.data import load_split
    from tessera.evaluate.perplexity import perplexity_of_ids

    m = load_model(model, device, dtype)
    data = load_split(m.tokenizer, split, file, seq_len=None, max_tokens=max_tokens)
    r = perplexity_of_ids(m, data.chunks.flatten().tolist(), max_len, stride)
    payload = r.as_dict() | {"model": model, "data": data.record()}
    if as_json:
        echo_json(payload)
        return
    console.print(f"perplexity {r.perplexity:.3f} over {r.tokens:,} tokens of the {split} split of {data.source} "
                  f"(sha256 {payload['data']['sha256']})", highlight=False)


@app.command()
@friendly
def kld(parent: str = typer.Argument(...), child: str = typer.Argument(...),
        file: Path = typer.Argument(None, help="text or JSONL file (default: the shared corpus)"),
        split: str = typer.Option("reporting", help=SPLIT_HELP),
        seq_len: int = typer.Option(256, "--seq-len", min=2), max_tokens: int = typer.Option(32768, "--max-tokens"),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        stream: str = typer.Option("auto", "--stream", help=STREAM_HELP),
        device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
        as_json: bool = typer.Option(False, "--json")):
    """Mean per-token KL(parent || child) and top-1 agreement on a text (Puzzle's block-scoring metric)."""
    from tessera.data import load_split
    from tessera.evaluate import mean_kld

    p = load_model(parent, device, dtype, stream=stream)
    c = load_model(child, device, dtype, stream=stream)
    data = load_split(p.tokenizer, split, file, seq_len=seq_len, max_tokens=max_tokens)
    r = mean_kld(p, c, data.chunks, batch_size)
    payload = r.as_dict() | {"parent": parent, "child": child, "data": data.record()}
    if as_json:
        echo_json(payload)
        return
    console.print(f"KL(parent || child) = {r.kld:.5f} nats/token, top-1 agreement {100 * r.top1:.2f}% "
                  f"over {r.tokens:,} tokens of the {split} split of {data.source} (sha256 {payload['data']['sha256']})",
                  highlight=False)
