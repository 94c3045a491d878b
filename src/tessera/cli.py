"""`tessera` command line: a thin typer dispatch over documented library functions.

Every command catches `TesseraError` and prints one line (`error: ...`) with exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tessera.errors import TesseraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tessera: turn a large Llama-family parent into smaller, faster children.")
console = Console()
err_console = Console(stderr=True)


def friendly(fn):
    """Turn TesseraError (and a few clear OS errors) into one line and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TesseraError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


# ---------------------------------------------------------------- foundation commands (issue 3)
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _load_arch(model: str):
    """An ArchSpec from a model name/dir/GGUF; a directory with only config.json needs no weights."""
    from tessera.arch import ArchSpec
    from tessera.checkpoint import DEFAULT_NAME, default_parent_dir

    if model == DEFAULT_NAME:
        return ArchSpec.from_file(default_parent_dir())
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ArchSpec.from_file(path)
    if path.suffix == ".gguf" and path.is_file():
        from tessera.checkpoint import load

        return load(path, with_tokenizer=False).arch
    if not path.exists():
        raise TesseraError(f"{path}: no such file or directory; pass 'default', a model directory or a .gguf file")
    raise TesseraError(f"{path}: no config.json here; pass a model directory or a .gguf file")


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
                      str(r["ffn_width"] or "-"), f"{r['params']:,}", _fmt_bytes(r["kv_bytes_per_token"]))
    table.add_section()
    table.add_row("total", "", "", "", "", f"{totals['params']:,}", _fmt_bytes(totals["kv_bytes_per_token_bf16"]))
    console.print(table)
    console.print(f"non-embedding parameters: {totals['non_embedding_params']:,}; "
                  f"config format: {'llama' if arch.is_homogeneous else 'nemotron-nas'}")


@app.command()
@friendly
def inspect(model: str = typer.Argument(..., help="'default', a model directory (config.json is enough) or .gguf"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Per-layer architecture: attention kind and KV heads, FFN width, parameters, KV-cache bytes per token."""
    print_inspect(_load_arch(model), model, as_json)


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


# ---------------------------------------------------------------- evaluation commands (issue 4)
def _write_text_atomic(path: Path, text: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _refuse_overwrite(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise TesseraError(f"{path}: already exists; choose another output path or pass --force to overwrite")


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
             force: bool = typer.Option(False, "--force", help="overwrite --out")):
    """Accuracy on multiple-choice benchmarks (lm-eval-harness prompts), with standard errors."""
    from tessera.checkpoint import load
    from tessera.evaluate import DEFAULT_TASKS, accuracy_preserved, evaluate_tasks, get_task, render_preserved_markdown
    from tessera.evaluate.table import rich_preserved_table, rich_results_table

    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(DEFAULT_TASKS)
    if out:
        _refuse_overwrite(out, force)
        if baseline:
            _refuse_overwrite(out.with_suffix(".md"), force)
    for name in names:
        get_task(name)
    kwargs = dict(limit=limit, batch_size=batch_size, data_dir=data_dir, use_cache=not no_cache)
    results = evaluate_tasks(load(model), names, **kwargs)
    console.print(rich_results_table(results, title=f"{model}" + (f" (limit {limit})" if limit else "")))
    payload = {"model": model, "limit": limit, "results": results}
    if baseline:
        parent = evaluate_tasks(load(baseline), names, **kwargs)
        table = accuracy_preserved(results, parent)
        console.print(rich_preserved_table(table, title=f"accuracy preserved: {model} vs {baseline}"))
        payload |= {"baseline": baseline, "baseline_results": parent, "preserved": table}
        if out:
            _write_text_atomic(out.with_suffix(".md"), render_preserved_markdown(table))
    if out:
        _write_text_atomic(out, json.dumps(payload, indent=2, sort_keys=True))
        console.print(f"wrote {out}")


@app.command()
@friendly
def perplexity(model: str = typer.Argument(...), file: Path = typer.Argument(..., help="text or JSONL file"),
               max_len: int = typer.Option(None, "--max-len", help="window (default: min(max positions, 2048))"),
               stride: int = typer.Option(None, "--stride", help="window step (default: the window)"),
               max_tokens: int = typer.Option(None, "--max-tokens", help="score only the first N tokens")):
    """Perplexity of a text with a sliding window; each token is scored once."""
    from tessera.checkpoint import load
    from tessera.data import read_text
    from tessera.evaluate.perplexity import perplexity as ppl

    m = load(model)
    text = read_text(file)
    if max_tokens:
        ids = m.tokenizer(text[: max_tokens * 12], add_special_tokens=False)["input_ids"][:max_tokens]
        text = m.tokenizer.decode(ids)
    r = ppl(m, text, max_len, stride)
    console.print(f"perplexity {r.perplexity:.3f} over {r.tokens:,} tokens (bits/byte {r.bits_per_byte:.4f})")


@app.command()
@friendly
def kld(parent: str = typer.Argument(...), child: str = typer.Argument(...),
        file: Path = typer.Argument(None, help="text or JSONL file (default: the shared corpus)"),
        seq_len: int = typer.Option(256, "--seq-len", min=2), max_tokens: int = typer.Option(32768, "--max-tokens"),
        batch_size: int = typer.Option(8, "--batch-size", min=1)):
    """Mean per-token KL(parent || child) and top-1 agreement on a text (Puzzle's block-scoring metric)."""
    from tessera.checkpoint import load
    from tessera.data import load_chunks
    from tessera.evaluate import mean_kld

    p, c = load(parent), load(child)
    chunks = load_chunks(p.tokenizer, file, seq_len=seq_len, max_tokens=max_tokens, heldout_fraction=0.0)
    r = mean_kld(p, c, chunks.train, batch_size)
    console.print(f"KL(parent || child) = {r.kld:.5f} nats/token, top-1 agreement {100 * r.top1:.2f}% "
                  f"over {r.tokens:,} tokens")

# ---------------------------------------------------------------- pruning / distillation commands (issue 5)
def _layer_list(text: str) -> tuple[int, ...]:
    """'16-31,40' -> (16, ..., 31, 40)."""
    out = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise TesseraError(f"--drop-layers {text!r}: use indices and ranges like 16-31,40") from None
    return tuple(sorted(set(out)))


def _ffn_arg(text: str | None):
    if text is None:
        return None
    values = _int_list(text, "--ffn")
    return values[0] if len(values) == 1 else tuple(values)


def _compute_importance(model, data, seq_len, samples, method, seed=0, head_drop=False):
    from tessera.data import load_chunks
    from tessera.importance import activation_importance, magnitude_importance, random_importance

    if method == "magnitude":
        return magnitude_importance(model)
    if method == "random":
        return random_importance(model, seed)
    if method != "activation":
        raise TesseraError(f"--method {method!r}: use activation, magnitude or random")
    chunks = load_chunks(model.tokenizer, data, seq_len=seq_len, max_tokens=samples * seq_len * 2, heldout_fraction=0.0)
    return activation_importance(model, chunks.train[:samples], with_drop_loss=True, with_head_drop=head_drop)


@app.command()
@friendly
def importance(model: str = typer.Argument(...), out: Path = typer.Option(..., "--out", help="scores file (.safetensors)"),
               data: Path = typer.Option(None, "--data", help="calibration text/JSONL (default: the shared corpus)"),
               samples: int = typer.Option(64, min=1), seq_len: int = typer.Option(256, "--seq-len", min=2),
               method: str = typer.Option("activation", help="activation | magnitude | random"),
               head_drop_kl: bool = typer.Option(False, "--head-drop-kl",
                                                 help="also score each head by the KL when it is zeroed (slow)"),
               force: bool = typer.Option(False, "--force")):
    """Compute and save importance scores (heads, neurons, channels, layers) for later pruning."""
    from tessera.checkpoint import load

    if out.exists() and not force:
        raise TesseraError(f"{out}: already exists; pass --force to overwrite")
    imp = _compute_importance(load(model), data, seq_len, samples, method, head_drop=head_drop_kl)
    console.print(f"wrote {imp.save(out)}")


@app.command("prune")
@friendly
def prune_cmd(model: str = typer.Argument(...), out: Path = typer.Option(..., "--out"),
              hidden: int = typer.Option(None, help="embedding channels to keep"),
              ffn: str = typer.Option(None, help="MLP width, or one width per kept layer (comma-separated)"),
              heads: int = typer.Option(None, help="query heads to keep per layer"),
              kv_heads: int = typer.Option(None, "--kv-heads", help="KV heads per layer (groups merged)"),
              layers: int = typer.Option(None, help="keep this many layers (drop the least important)"),
              drop_layers: str = typer.Option(None, "--drop-layers", help="e.g. 16-31"),
              layer_metric: str = typer.Option("bi", "--layer-metric", help="bi (ShortGPT) | drop_loss | drop_kl"),
              head_metric: str = typer.Option("norm", "--head-metric", help="norm (Minitron) | drop_kl"),
              target_params: float = typer.Option(None, "--target-params",
                                                  help="fraction of non-embedding parameters; searches width/depth"),
              method: str = typer.Option("activation", help="importance: activation | magnitude | random"),
              scores: Path = typer.Option(None, "--scores", help="precomputed importance file"),
              data: Path = typer.Option(None, "--data"), samples: int = typer.Option(64, min=1),
              seq_len: int = typer.Option(256, "--seq-len", min=2), force: bool = typer.Option(False, "--force")):
    """Prune heads, KV heads, MLP neurons, embedding channels and/or layers; writes a loadable checkpoint."""
    from tessera.checkpoint import load, save
    from tessera.importance import Importance
    from tessera.prune import PruneTarget, prune, search_target

    if out.exists() and not force:
        raise TesseraError(f"{out}: already exists; choose another output directory or pass --force to overwrite")
    m = load(model)
    if head_metric not in ("norm", "drop_kl"):
        raise TesseraError(f"--head-metric {head_metric!r}: use norm or drop_kl")
    imp = (Importance.load(scores) if scores else
           _compute_importance(m, data, seq_len, samples, method, head_drop=heads is not None and head_metric == "drop_kl"))
    if target_params is not None:
        from tessera.data import load_chunks

        held = load_chunks(m.tokenizer, data, seq_len=seq_len, max_tokens=16 * seq_len * 2).heldout
        if len(held) < 2:
            held = load_chunks(m.tokenizer, data, seq_len=seq_len, max_tokens=16 * seq_len * 2,
                               heldout_fraction=0.5).heldout
        target, report = search_target(m, imp, target_params, held[:8])
        for r in report:
            console.print(f"  candidate {r['target']}: {r['params']:,} params, KLD {r['kld']:.4f}")
    else:
        target = PruneTarget(hidden=hidden, ffn=_ffn_arg(ffn), heads=heads, kv_heads=kv_heads,
                             drop_layers=_layer_list(drop_layers) if drop_layers else (), layers=layers,
                             layer_metric=layer_metric, head_metric=head_metric)
    child = prune(m, imp, target)
    save(child, out, force=force)
    console.print(f"pruned {m.arch.num_params():,} -> {child.arch.num_params():,} parameters "
                  f"({child.arch.non_embedding_params() / m.arch.non_embedding_params():.1%} of non-embedding); "
                  f"wrote {out}")


@app.command("distill")
@friendly
def distill_cmd(teacher: str = typer.Option(..., "--teacher"), student: str = typer.Option(..., "--student"),
                out: Path = typer.Option(..., "--out"),
                data: Path = typer.Option(None, "--data", help="text/JSONL (default: the shared corpus)"),
                tokens: int = typer.Option(1_000_000, help="training budget in tokens"),
                seq_len: int = typer.Option(256, "--seq-len", min=2), batch: int = typer.Option(8, min=1),
                grad_accum: int = typer.Option(1, "--grad-accum", min=1), lr: float = typer.Option(1e-4),
                warmup: int = typer.Option(10, help="warm-up steps"), temperature: float = typer.Option(1.0),
                loss: str = typer.Option("kl", help="kl | kl+cosine"),
                eval_every: int = typer.Option(50, "--eval-every"), ckpt_every: int = typer.Option(50, "--ckpt-every"),
                teacher_correction: int = typer.Option(0, "--teacher-correction",
                                                       help="LM fine-tuning steps on the teacher first"),
                resume: bool = typer.Option(False, "--resume"), force: bool = typer.Option(False, "--force"),
                seed: int = typer.Option(0)):
    """Logit distillation (optionally + hidden-state cosine), resumable; run under torchrun for DDP."""
    import os

    import torch.distributed as dist

    from tessera.checkpoint import load, save
    from tessera.data import load_chunks
    from tessera.distill import DistillConfig, correct_teacher, distill

    if out.exists() and not (force or resume):
        raise TesseraError(f"{out}: already exists; pass --resume to continue or --force to overwrite")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    t, s = load(teacher), load(student)
    cfg = DistillConfig(tokens=tokens, seq_len=seq_len, batch=batch, grad_accum=grad_accum, lr=lr, warmup_steps=warmup,
                        temperature=temperature, loss=loss, eval_every=eval_every, ckpt_every=ckpt_every, seed=seed)
    chunks = load_chunks(t.tokenizer, data, seq_len=seq_len, min_chunks=2)
    if teacher_correction:
        t = correct_teacher(t, chunks.train, steps=teacher_correction, batch=batch, seed=seed, inplace=True)
    s, log = distill(t, s, chunks.train, cfg, heldout=chunks.heldout[:16], ckpt_dir=out.with_name(out.name + ".ckpt"),
                     resume=resume)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save(s, out, force=True, extra_files={"distill_log.json": log})
        last = log[-1] if log else {}
        console.print(f"distilled {cfg.steps} steps ({cfg.steps * cfg.tokens_per_step:,} tokens); final loss "
                      f"{last.get('loss', float('nan')):.4f}, held-out KLD {last.get('heldout_kld', float('nan')):.4f}; "
                      f"wrote {out}")

# ---------------------------------------------------------------- speed / cost / plot commands (issue 6)
def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TesseraError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise TesseraError(f"{what} must be positive integers, got {text!r}")
    return values


@app.command()
@friendly
def bench(model: str = typer.Argument(..., help="'default', a model directory or .gguf"),
          scenarios: str = typer.Option("128/128,128/1024,2048/128", help="comma-separated IN/OUT token lengths"),
          batch_sizes: str = typer.Option("1", "--batch-sizes", help="comma-separated batch sizes"),
          device: str = typer.Option("cpu", help="cpu | cuda"),
          dtype: str = typer.Option(None, help="float32 | bfloat16 | float16 (default: float32 on cpu, bf16 on cuda)"),
          reps: int = typer.Option(3, min=1), compile: bool = typer.Option(False, help="torch.compile the decode step"),
          cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="replay the decode step as a CUDA graph"),
          as_json: bool = typer.Option(False, "--json")):
    """Measured prefill / decode / end-to-end tokens/s over the KV cache, per serving scenario and batch."""
    import torch

    from tessera.bench import bench as run_bench
    from tessera.checkpoint import load
    from tessera.cost import Scenario

    if device == "cuda" and not torch.cuda.is_available():
        raise TesseraError("--device cuda but no CUDA device is visible; use --device cpu")
    scen = [Scenario.parse(x.strip()) for x in scenarios.split(",") if x.strip()]
    sizes = _int_list(batch_sizes, "--batch-sizes")
    m = load(model, dtype=dtype or ("bfloat16" if device == "cuda" else None), device=device, with_tokenizer=False)
    if cuda_graphs and device != "cuda":
        raise TesseraError("--cuda-graphs needs --device cuda")
    results = run_bench(m, scen, sizes, reps=reps, compile=compile, cuda_graphs=cuda_graphs,
                        progress=None if as_json else lambda r: err_console.print(f"  {r.scenario} batch {r.batch} done"))
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        return
    table = Table(title=f"{model} on {device} ({m.dtype}), median of {reps}")
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
         scenario: str = typer.Option("128/1024", help="IN/OUT token lengths"),
         tp: int = typer.Option(1, "--tp", min=1, help="tensor-parallel GPUs"),
         batch: str = typer.Option("auto", help="batch size, or auto (best throughput that fits)"),
         as_json: bool = typer.Option(False, "--json")):
    """Predicted throughput from the roofline cost model (no weights needed)."""
    from tessera.cost import Scenario, predict
    from tessera.hardware import get_hardware

    arch = _load_arch(model)
    hw = get_hardware(gpu)
    if batch != "auto" and not batch.isdigit():
        raise TesseraError(f"--batch must be a positive integer or 'auto', got {batch!r}")
    p = predict(arch, hw, Scenario.parse(scenario), dtype=dtype, batch=batch, tp=tp)
    if as_json:
        typer.echo(json.dumps(p.as_dict(), indent=2))
        return
    console.print(f"[bold]{model}[/] on {tp} x {hw.name}, {dtype}, scenario {scenario}: batch {p.batch}")
    console.print(f"  memory per GPU: weights {p.weight_bytes / tp / 1e9:.2f} GB + KV cache {p.kv_bytes / tp / 1e9:.2f} GB "
                  f"(usable {p.memory_bytes / 1e9:.1f} GB)")  # tensor parallelism splits both across tp GPUs
    console.print(f"  prefill {p.prefill_s:.3f} s, decode {p.decode_s:.3f} s per batch")
    console.print(f"  throughput per GPU: {p.output_tokens_per_s:,.0f} output tok/s "
                  f"(decode {p.decode_tokens_per_s:,.0f} tok/s, prefill {p.prefill_tokens_per_s:,.0f} tok/s)")


plot_app = typer.Typer(help="Plots: efficient frontier, per-layer architecture.", no_args_is_help=True)
app.add_typer(plot_app, name="plot")


@plot_app.command("frontier")
@friendly
def plot_frontier_cmd(points: Path = typer.Argument(..., help='JSON list of {"name", "throughput", "quality", "kind"}'),
                      out: Path = typer.Option(Path("frontier.png"), "--out"),
                      force: bool = typer.Option(False, "--force", help="overwrite OUT")):
    """Quality vs throughput of parent, children and baselines, with the Pareto frontier."""
    from tessera.plots import plot_frontier

    _refuse_overwrite(out, force)
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

    _refuse_overwrite(out, force)
    console.print(f"wrote {plot_architecture(_load_arch(model), out, parent=_load_arch(parent) if parent else None)}")


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `tessera inspect ... | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
