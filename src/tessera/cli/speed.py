"""Speed commands: bench (measured), cost (predicted), plot."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tessera.cli.app import DEVICE_HELP, DTYPE_HELP, app, console, err_console, friendly, int_list, load_arch, load_model
from tessera.errors import TesseraError
from tessera.io import refuse_overwrite


@app.command()
@friendly
def bench(model: str = typer.Argument(..., help="'default', a model directory or .gguf"),
          scenarios: str = typer.Option("128/128,128/1024,2048/128", help="comma-separated IN/OUT token lengths"),
          batch_sizes: str = typer.Option("1", "--batch-sizes", help="comma-separated batch sizes"),
          device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
          reps: int = typer.Option(3, min=1), compile: bool = typer.Option(False, help="torch.compile the decode step"),
          cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="replay the decode step as a CUDA graph"),
          as_json: bool = typer.Option(False, "--json")):
    """Measured prefill / decode / end-to-end tokens/s over the KV cache, per serving scenario and batch."""
    from tessera.bench import bench as run_bench
    from tessera.cost import Scenario

    scen = [Scenario.parse(x.strip()) for x in scenarios.split(",") if x.strip()]
    sizes = int_list(batch_sizes, "--batch-sizes")
    m = load_model(model, device, dtype, with_tokenizer=False)  # the one --device / --dtype vocabulary
    if cuda_graphs and m.device.type != "cuda":
        raise TesseraError("--cuda-graphs needs --device cuda")
    results = run_bench(m, scen, sizes, reps=reps, compile=compile, cuda_graphs=cuda_graphs,
                        progress=None if as_json else lambda r: err_console.print(f"  {r.scenario} batch {r.batch} done"))
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    table = Table(title=f"{model} on {m.device} ({m.dtype}), median of {reps}")
    for col in ("scenario", "batch", "prefill tok/s", "decode tok/s", "decode min..max", "end-to-end tok/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r.scenario, str(r.batch), f"{r.prefill_tok_s:,.1f}", f"{r.decode_tok_s:,.1f}",
                      f"{r.decode_spread[0]:,.1f}..{r.decode_spread[1]:,.1f}", f"{r.e2e_tok_s:,.1f}")
    console.print(table)


@app.command()
@friendly
def cost(model: str = typer.Argument(..., help="model directory (config.json alone is enough), 'default' or .gguf"),
         gpu: str = typer.Option("h100", "--gpu", help="h100 | h200 | a100 | b200 | l40s | cpu"),
         dtype: str = typer.Option("bf16", help="fp32 | bf16 | fp8 | nvfp4 (weights and compute)"),
         kv_dtype: str = typer.Option(None, "--kv-dtype",
                                      help="KV-cache dtype: bf16 | fp8 (default: fp8 for fp8/nvfp4 weights, else bf16)"),
         scenario: str = typer.Option("128/1024", help="IN/OUT token lengths"),
         tp: int = typer.Option(1, "--tp", help="tensor-parallel GPUs (must divide the heads and FFN widths)"),
         batch: str = typer.Option("auto", help="batch size, or auto (best throughput that fits)"),
         batch_cap: int = typer.Option(4096, "--batch-cap", help="largest batch the auto search tries"),
         explain: bool = typer.Option(False, "--explain", help="where the time goes, per phase"),
         recalibrate: bool = typer.Option(False, "--recalibrate",
                                          help="measure this machine's cpu profile again (with --gpu cpu)"),
         as_json: bool = typer.Option(False, "--json")):
    """Predicted throughput from the cost model (no weights needed): roofline + tensor-parallel communication +
    the GPU's serving-engine profile."""
    from tessera.cost import Scenario, predict
    from tessera.engine import engine_profile
    from tessera.hardware import get_hardware

    if batch != "auto" and not (batch.isdigit() and int(batch) >= 1):
        raise TesseraError(f"--batch must be a positive integer or 'auto', got {batch!r}")
    if batch_cap < 1:
        raise TesseraError(f"--batch-cap must be >= 1, got {batch_cap}")
    arch = load_arch(model)
    hw = get_hardware(gpu, recalibrate=recalibrate)
    p = predict(arch, hw, Scenario.parse(scenario), dtype=dtype, batch=batch, tp=tp, kv_dtype=kv_dtype,
                batch_cap=batch_cap)
    eng = engine_profile(hw)
    if as_json:
        out = p.as_dict()
        out.update(batch_cap=batch_cap, engine_source=eng.source)
        if hw.name == "cpu":
            out.update(measured_at=hw.measured_at, measured_on=hw.measured_on)
        typer.echo(json.dumps(out, indent=2))
        return
    console.print(f"[bold]{model}[/] on {tp} x {hw.name}, {dtype} weights, {p.kv_dtype} KV cache, scenario {scenario}: "
                  f"batch {p.batch}")
    if hw.name == "cpu":
        console.print(f"  cpu profile measured {hw.measured_at or 'at an unrecorded time (run --recalibrate)'}"
                      f"{' on ' + hw.measured_on if hw.measured_on else ''}")
    lim = p.batch_limits
    console.print(f"  batch limits: memory {lim['memory']:,}, engine {lim['engine']:,}, search cap {lim['cap']:,} "
                  f"(--batch-cap); bound by {p.batch_bound}")
    console.print(f"  memory per GPU: weights {p.weight_bytes_per_gpu / 1e9:.2f} GB + KV cache "
                  f"{p.kv_bytes_per_gpu / 1e9:.2f} GB (usable {p.memory_bytes / 1e9:.1f} GB of "
                  f"{hw.mem_bytes / 2**30:.0f} GiB)")
    console.print(f"  prefill {p.prefill_s:.3f} s, decode {p.decode_s:.3f} s per batch")
    console.print(f"  throughput per GPU: {p.output_tokens_per_s:,.0f} output tok/s "
                  f"(decode {p.decode_tokens_per_s:,.0f} tok/s, prefill {p.prefill_tokens_per_s:,.0f} tok/s)")
    if explain:
        console.print(explain_table(p, eng.name))


def explain_table(p, engine: str) -> Table:
    """Where the time of one batch goes, per phase: seconds and share per part, and the amounts behind them."""
    from tessera.cost import PARTS

    labels = {"weights": "weights read", "kv": "KV cache read", "flops": "FLOPs (compute-bound)",
              "comm": "TP communication", "overhead": "overhead (kernels, steps)"}
    amounts = {"weights": ("weight_bytes", "GB"), "kv": ("kv_bytes", "GB"), "flops": ("flop_count", "TFLOP"),
               "comm": ("comm_bytes", "GB")}
    table = Table(title=f"where the time goes (per GPU, one batch of {p.batch}; engine {engine})")
    table.add_column("part")
    for phase in ("prefill", "decode"):
        table.add_column(f"{phase} s", justify="right")
        table.add_column("share", justify="right")
        table.add_column(f"{phase} amount", justify="right")
    for part in PARTS:
        row = [labels[part]]
        for phase in ("prefill", "decode"):
            d = p.parts[phase]
            total = sum(d[k] for k in PARTS) or 1.0
            key, unit = amounts.get(part, (None, ""))
            scale = 1e12 if unit == "TFLOP" else 1e9
            row += [f"{d[part]:.4f}", f"{d[part] / total:.0%}", f"{d[key] / scale:,.2f} {unit}" if key else ""]
        table.add_row(*row)
    return table


plot_app = typer.Typer(help="Plots: efficient frontier, per-layer architecture.", no_args_is_help=True)
app.add_typer(plot_app, name="plot")


@plot_app.command("frontier")
@friendly
def plot_frontier_cmd(points: Path = typer.Argument(..., help='JSON list of {"name", "throughput", "quality", "kind"}'),
                      out: Path = typer.Option(Path("frontier.png"), "--out"),
                      force: bool = typer.Option(False, "--force", help="overwrite OUT")):
    """Quality vs throughput of parent, children and baselines, with the Pareto frontier."""
    from tessera.plots import plot_frontier

    refuse_overwrite(out, force)
    try:
        data = json.loads(points.read_text())
    except (OSError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, list) and all(isinstance(p, dict) and {"name", "throughput", "quality"} <= set(p)
                                           for p in data)):
        raise TesseraError(f"{points}: expected a JSON list of objects with name, throughput and quality")
    console.print(f"wrote {plot_frontier(data, out)}")


@plot_app.command("arch")
@friendly
def plot_arch_cmd(model: str = typer.Argument(...), out: Path = typer.Option(Path("arch.png"), "--out"),
                  parent: str = typer.Option(None, help="draw the parent's widths as reference lines"),
                  force: bool = typer.Option(False, "--force", help="overwrite OUT")):
    """Per-layer KV heads and FFN width of a model; no-op and linear sub-blocks marked."""
    from tessera.plots import plot_architecture

    refuse_overwrite(out, force)
    console.print(f"wrote {plot_architecture(load_arch(model), out, parent=load_arch(parent) if parent else None)}")
