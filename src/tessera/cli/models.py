"""Model commands: inspect, generate, convert, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tessera.cli.app import app, console, fmt_bytes, friendly, load_arch
from tessera.errors import TesseraError


def inspect_rows(arch, kv_bytes: float = 2.0) -> list[dict]:
    rows = []
    for i, block in enumerate(arch.blocks):
        rows.append({
            "layer": i,
            "attention": block.attention.kind,
            "kv_heads": arch.kv_heads(i),
            "ffn": block.ffn.kind,
            "ffn_width": block.ffn.intermediate_size or 0,
            "params": arch.block_params(i),
            "kv_bytes_per_token": arch.kv_cache_bytes_per_token(kv_bytes, layer=i),
        })
    return rows


def print_inspect(arch, title: str, as_json: bool = False) -> None:
    rows = inspect_rows(arch)
    totals = {
        "layers": arch.num_layers, "params": arch.num_params(), "non_embedding_params": arch.non_embedding_params(),
        "kv_bytes_per_token_bf16": arch.kv_cache_bytes_per_token(2.0), "homogeneous": arch.is_homogeneous,
        "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size, "heads": arch.num_attention_heads,
        "head_dim": arch.head_dim,
    }
    if as_json:
        typer.echo(json.dumps({"layers": rows, "totals": totals}, indent=2))
        return
    table = Table(title=f"{title}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} "
                        f"heads x {arch.head_dim}, vocab {arch.vocab_size}")
    for col in ("layer", "attention", "KV heads", "FFN", "FFN width", "params", "KV bytes/token (bf16)"):
        table.add_column(col, justify="right" if col not in ("attention", "FFN") else "left")
    for r in rows:
        table.add_row(str(r["layer"]), r["attention"], str(r["kv_heads"] or "-"), r["ffn"],
                      str(r["ffn_width"] or "-"), f"{r['params']:,}", fmt_bytes(r["kv_bytes_per_token"]))
    table.add_section()
    table.add_row("total", "", "", "", "", f"{totals['params']:,}", fmt_bytes(totals["kv_bytes_per_token_bf16"]))
    console.print(table)
    console.print(f"non-embedding parameters: {totals['non_embedding_params']:,}; "
                  f"config format: {'llama' if arch.is_homogeneous else 'nemotron-nas'}")


@app.command()
@friendly
def inspect(model: str = typer.Argument(..., help="'default', a model directory (config.json is enough) or .gguf"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Per-layer architecture: attention kind and KV heads, FFN width, parameters, KV-cache bytes per token."""
    print_inspect(load_arch(model), model, as_json)


@app.command()
@friendly
def generate(model: str = typer.Argument(..., help="'default', a model directory or .gguf"),
             prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt text (repeat for a batch)"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_k: int = typer.Option(None, "--top-k"), top_p: float = typer.Option(None, "--top-p"),
             seed: int = typer.Option(None), chat: bool = typer.Option(False, help="wrap in the chat template")):
    """Continue one or more prompts (batched, KV cache)."""
    from tessera.checkpoint import load
    from tessera.generate import generate_text

    m = load(model)
    if m.tokenizer is None:
        raise TesseraError(f"{model}: no tokenizer files beside the weights; copy tokenizer.json into the directory")
    outs = generate_text(m, list(prompt), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, chat=chat)
    for p, out in zip(prompt, outs):
        if chat:
            typer.echo(out)
        else:
            typer.echo(p + out)


@app.command()
@friendly
def convert(src: str = typer.Argument(..., help="'default', a model directory or .gguf"),
            dst: Path = typer.Argument(..., help="output directory"),
            dtype: str = typer.Option(None, help="float32 | bfloat16 | float16"),
            force: bool = typer.Option(False, "--force", help="overwrite DST")):
    """Convert a model to a tessera / transformers safetensors directory (llama or nemotron-nas config)."""
    from tessera.checkpoint import load, save

    if dst.exists() and not force:
        raise TesseraError(f"{dst}: already exists; choose another output directory or pass --force to overwrite")
    m = load(src, dtype=dtype)
    save(m, dst, force=force)
    console.print(f"saved {m.arch.num_params():,} parameters to {dst}")


@app.command()
@friendly
def demo(model: str = typer.Argument("default"),
         prompt: str = typer.Option("The capital of France is", "--prompt", "-p"),
         eval_limit: int = typer.Option(50, "--eval-limit", help="items per quick task (0 skips the evaluation)"),
         gpu: str = typer.Option("h100", "--gpu", help="hardware for the throughput prediction")):
    """The main job until the pipeline lands: architecture, a completion, a quick evaluation, predicted speed."""
    from tessera.checkpoint import load
    from tessera.cost import Scenario, predict
    from tessera.generate import generate_text
    from tessera.hardware import get_hardware

    m = load(model)
    print_inspect(m.arch, model)
    console.print(f"[bold]prompt:[/] {prompt}")
    console.print(f"[bold]completion:[/] {prompt}{generate_text(m, prompt, 24)}")
    if eval_limit:
        from tessera.evaluate import evaluate_tasks
        from tessera.evaluate.table import rich_results_table

        results = evaluate_tasks(m, ["arc_easy", "winogrande"], limit=eval_limit)
        console.print(rich_results_table(results, title=f"quick evaluation (first {eval_limit} items)"))
    for scenario in ("128/1024", "2048/128"):
        p = predict(m.arch, get_hardware(gpu), Scenario.parse(scenario))
        console.print(f"predicted on one {gpu}, bf16, {scenario}: {p.output_tokens_per_s:,.0f} output tok/s "
                      f"at batch {p.batch}")
