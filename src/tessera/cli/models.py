"""Model commands: inspect, generate, convert, demo."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tessera.cli.app import (
    DEVICE_HELP,
    DTYPE_HELP,
    app,
    console,
    echo_json,
    fmt_bytes,
    friendly,
    load_arch,
    load_model,
    warn_engines,
)
from tessera.errors import TesseraError


def inspect_rows(arch, kv_bytes: float = 2.0) -> list[dict]:
    return arch.layer_rows(kv_bytes)


def print_inspect(arch, title: str, as_json: bool = False, weights: dict | None = None) -> None:
    from tessera.formats.engines import compatibility

    rows = inspect_rows(arch)
    engines = {e: [str(p).removeprefix(f"{e}: ") for p in problems] for e, problems in compatibility(arch).items()}
    totals = {
        "layers": arch.num_layers, "params": arch.num_params(), "non_embedding_params": arch.non_embedding_params(),
        "kv_bytes_per_token_bf16": arch.kv_cache_bytes_per_token(2.0), "homogeneous": arch.is_homogeneous,
        "hidden_size": arch.hidden_size, "vocab_size": arch.vocab_size, "heads": arch.num_attention_heads,
        "head_dim": arch.head_dim,
    }
    quant = (weights or {}).get("quantization")
    if quant:  # a quantized checkpoint: the real bytes each layer stores (codes + scales)
        for r, nbytes in zip(rows, quant["layer_bytes"]):
            r["stored_bytes"] = nbytes
    if as_json:
        typer.echo(json.dumps({"layers": rows, "totals": totals, "weights": weights, "engines": engines}, indent=2))
        return
    table = Table(title=f"{title}: {arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} "
                        f"heads x {arch.head_dim}, vocab {arch.vocab_size}")
    cols = ["layer", "attention", "KV heads", "FFN", "FFN width", "params", "KV bytes/token (bf16)"]
    for col in cols + (["stored bytes"] if quant else []):
        table.add_column(col, justify="right" if col not in ("attention", "FFN") else "left")
    for r in rows:
        table.add_row(str(r["layer"]), r["attention"], str(r["kv_heads"] or "-"), r["ffn"],
                      str(r["ffn_width"] or "-"), f"{r['params']:,}", fmt_bytes(r["kv_bytes_per_token"]),
                      *([fmt_bytes(r["stored_bytes"])] if quant else []))
    table.add_section()
    table.add_row("total", "", "", "", "", f"{totals['params']:,}", fmt_bytes(totals["kv_bytes_per_token_bf16"]),
                  *([fmt_bytes(sum(quant["layer_bytes"]))] if quant else []))
    console.print(table)
    console.print(f"non-embedding parameters: {totals['non_embedding_params']:,}; "
                  f"config format: {'llama' if arch.is_homogeneous else 'nemotron-nas'}")
    if weights is None:
        console.print("weights: none here (config only)")
    elif not weights.get("verified"):
        console.print(f"weights: {', '.join(weights['files'])} (a pickle: not verified; convert it to safetensors)")
    else:
        console.print(f"weights: {len(weights['files'])} safetensors file(s), {weights['tensors']} tensors, "
                      f"{fmt_bytes(weights['bytes'])} ({', '.join(weights['dtypes'])}); headers, sizes and shapes "
                      "match config.json", highlight=False)
    if quant:
        console.print(f"quantization: {quant['scheme']} ({quant['format']}), {quant['quantized_layers']} Linear layers "
                      f"quantized{', FP8 KV cache' if quant['kv_cache'] else ''}; kept unquantized: "
                      f"{', '.join(quant['ignore']) or 'none'}", highlight=False)
    for engine, problems in engines.items():
        if not problems:
            console.print(f"{engine}: serves it as written", highlight=False)
            continue
        console.print(f"[yellow]{engine}: cannot serve {len(problems)} layer part(s):[/]", highlight=False)
        for p in problems:
            console.print(f"  {p}", highlight=False)


@app.command()
@friendly
def inspect(model: str = typer.Argument(..., help="'default', a model directory (config.json is enough) or .gguf"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Per-layer architecture: attention kind and KV heads, FFN width, parameters, KV-cache bytes per token; checks
    that the weights beside config.json are readable and match it (headers and sizes, without loading them)."""
    from tessera.checkpoint import DEFAULT_NAME, default_parent_dir, verify_weights

    arch = load_arch(model)
    path = default_parent_dir() if model == DEFAULT_NAME else Path(model).expanduser()
    weights = verify_weights(path, arch) if path.is_dir() else None
    print_inspect(arch, model, as_json, weights)


@app.command()
@friendly
def generate(model: str = typer.Argument(..., help="'default', a model directory or .gguf"),
             prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt text (repeat for a batch)"),
             max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", min=1),
             temperature: float = typer.Option(0.0, help="0 = greedy"),
             top_k: int = typer.Option(None, "--top-k"), top_p: float = typer.Option(None, "--top-p"),
             seed: int = typer.Option(None), chat: bool = typer.Option(False, help="wrap in the chat template"),
             device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP)):
    """Continue one or more prompts (batched, KV cache)."""
    from tessera.generate import generate_text

    m = load_model(model, device, dtype)
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
            dtype: str = typer.Option(None, help="fp32 | bf16 | fp16 (default: the source's)"),
            force: bool = typer.Option(False, "--force", help="overwrite DST"),
            as_json: bool = typer.Option(False, "--json")):
    """Convert a model to a tessera / transformers safetensors directory (llama or nemotron-nas config)."""
    from tessera.checkpoint import load, save
    from tessera.io import refuse_overwrite

    refuse_overwrite(dst, force, "output directory")
    m = load(src, dtype=dtype)
    save(m, dst, force=force)
    warn_engines(m.arch, str(dst))
    if as_json:
        echo_json({"out": str(dst), "params": m.arch.num_params(), "dtype": str(m.dtype).removeprefix("torch.")})
        return
    console.print(f"saved {m.arch.num_params():,} parameters to {dst}", highlight=False)


@app.command()
@friendly
def demo(model: str = typer.Argument("default"),
         prompt: str = typer.Option("The capital of France is", "--prompt", "-p"),
         eval_limit: int = typer.Option(50, "--eval-limit", help="items per quick task (0 skips the evaluation)"),
         gpu: str = typer.Option("h100", "--gpu", help="hardware for the throughput prediction"),
         device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
         as_json: bool = typer.Option(False, "--json")):
    """A quick look at a model: architecture, a completion, a quick evaluation, predicted speed."""
    from tessera.cost import Scenario, predict
    from tessera.generate import generate_text
    from tessera.hardware import get_hardware

    m = load_model(model, device, dtype)
    completion = generate_text(m, prompt, 24)
    results = {}
    if eval_limit:
        from tessera.evaluate import evaluate_tasks

        results = evaluate_tasks(m, ["arc_easy", "winogrande"], limit=eval_limit, progress=not as_json)
    predictions = {s: predict(m.arch, get_hardware(gpu), Scenario.parse(s)) for s in ("128/1024", "2048/128")}
    if as_json:
        echo_json({"model": model, "layers": inspect_rows(m.arch), "params": m.arch.num_params(), "prompt": prompt,
                   "completion": completion, "eval_limit": eval_limit, "results": results, "gpu": gpu,
                   "predicted": {s: p.as_dict() for s, p in predictions.items()}})
        return
    print_inspect(m.arch, model)
    console.print(f"[bold]prompt:[/] {prompt}")
    console.print(f"[bold]completion:[/] {prompt}{completion}")
    if results:
        from tessera.evaluate.table import rich_results_table

        console.print(rich_results_table(results, title=f"quick evaluation (first {eval_limit} items)"))
    for scenario, p in predictions.items():
        console.print(f"predicted on one {gpu}, bf16, {scenario}: {p.output_tokens_per_s:,.0f} output tok/s "
                      f"at batch {p.batch}")
