"""Minitron commands: importance, prune, distill.

Data come from the three disjoint splits of `tessera.data`: importance scores and distillation use the
calibration split, the width/depth search and distillation's periodic KLD the selection split; nothing here
reads the reporting split (that is for `tessera kld` and the benchmarks).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from tessera.cli.app import (
    DEVICE_HELP,
    DTYPE_HELP,
    ENGINE_HELP,
    STREAM_HELP,
    app,
    console,
    echo_json,
    friendly,
    int_list,
    load_model,
    warn_engines,
)
from tessera.errors import TesseraError
from tessera.io import refuse_overwrite


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
    values = int_list(text, "--ffn")
    return values[0] if len(values) == 1 else tuple(values)


def _compute_importance(model, data, seq_len, samples, method, *, seed=0, head_drop=False, drop_samples=None):
    from tessera.data import load_split
    from tessera.importance import DROP_SAMPLES, activation_importance, magnitude_importance, random_importance

    if method == "magnitude":
        return magnitude_importance(model)
    if method == "random":
        return random_importance(model, seed)
    if method != "activation":
        raise TesseraError(f"--method {method!r}: use activation, magnitude or random")
    calib = load_split(model.tokenizer, "calibration", data, seq_len=seq_len, max_tokens=samples * seq_len).take(samples)
    return activation_importance(model, calib, with_drop_loss=True, with_head_drop=head_drop,
                                 drop_samples=drop_samples or DROP_SAMPLES)


def _importance_lines(imp) -> list[str]:
    meta = imp.meta
    lines = [f"importance: {meta.get('method')} on model {meta.get('fingerprint')}"]
    if "data" in meta:
        d = meta["data"]
        lines.append(f"  data: {d['chunks']} chunks x {d['seq_len']} = {d['tokens']:,} tokens of the {d['split']} split "
                     f"of {d['source']} (sha256 {d['sha256']})")
    if "drop_samples" in meta:
        lines.append(f"  layer/head drop scores on the first {meta['drop_samples']} of them (--drop-samples)")
    return lines


@app.command()
@friendly
def importance(model: str = typer.Argument(...), out: Path = typer.Option(..., "--out", help="scores file (.safetensors)"),
               data: Path = typer.Option(None, "--data", help="calibration text/JSONL (default: the shared corpus)"),
               samples: int = typer.Option(64, min=1, help="calibration chunks"),
               seq_len: int = typer.Option(256, "--seq-len", min=2),
               drop_samples: int = typer.Option(4, "--drop-samples", min=1,
                                                help="chunks for the drop-one-layer/head scores (a forward each)"),
               method: str = typer.Option("activation", help="activation | magnitude | random"),
               head_drop_kl: bool = typer.Option(False, "--head-drop-kl",
                                                 help="also score each head by the KL when it is zeroed (slow)"),
               device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
               stream: str = typer.Option("auto", "--stream", help=STREAM_HELP),
               force: bool = typer.Option(False, "--force"), as_json: bool = typer.Option(False, "--json")):
    """Compute and save importance scores (heads, KV groups, neurons, channels, layers) for later pruning."""
    refuse_overwrite(out, force)
    m = load_model(model, device, dtype, stream=stream)
    imp = _compute_importance(m, data, seq_len, samples, method, head_drop=head_drop_kl, drop_samples=drop_samples)
    imp.save(out)
    if as_json:
        echo_json({"out": str(out), "meta": imp.meta})
        return
    for line in _importance_lines(imp):
        console.print(line, highlight=False)
    console.print(f"wrote {out}", highlight=False)


def candidates_table(search, parent_params: int) -> Table:
    table = Table(title=f"width/depth candidates: KLD to the parent on {search.data.get('tokens', '?'):,} tokens of "
                        f"the {search.data.get('split', '?')} split")
    for col in ("hidden", "FFN", "layers", "non-emb params", "of parent", "KLD", "chosen"):
        table.add_column(col, justify="right")
    best = search.target.describe()
    for r in search.candidates:
        t = r["target"]
        table.add_row(str(t.get("hidden", "")), str(t.get("ffn", "")), str(t.get("layers", "")), f"{r['params']:,}",
                      f"{r['params'] / parent_params:.1%}", f"{r['kld']:.4f}", "<-" if t == best else "")
    return table


@app.command("prune")
@friendly
def prune_cmd(model: str = typer.Argument(...), out: Path = typer.Option(..., "--out"),
              hidden: int = typer.Option(None, help="embedding channels to keep"),
              ffn: str = typer.Option(None, help="MLP width, or one width per kept layer (comma-separated)"),
              heads: int = typer.Option(None, help="query heads to keep per layer"),
              kv_heads: int = typer.Option(None, "--kv-heads",
                                           help="KV heads per layer (groups merged, chosen and weighted by importance)"),
              layers: int = typer.Option(None, help="keep this many layers (drop the least important)"),
              drop_layers: str = typer.Option(None, "--drop-layers", help="e.g. 16-31"),
              layer_metric: str = typer.Option("bi", "--layer-metric", help="bi (ShortGPT) | drop_loss | drop_kl"),
              head_metric: str = typer.Option("norm", "--head-metric",
                                              help="head and KV-group ranking: norm (Minitron) | drop_kl"),
              target_params: float = typer.Option(None, "--target-params",
                                                  help="fraction of non-embedding parameters; searches width/depth"),
              select_samples: int = typer.Option(8, "--select-samples", min=1,
                                                 help="selection-split chunks the --target-params search scores on"),
              max_candidates: int = typer.Option(24, "--max-candidates", min=1,
                                                 help="width/depth splits the search measures"),
              multiple: int = typer.Option(32, "--multiple", min=1,
                                           help="the search rounds hidden and FFN widths to multiples of this"),
              method: str = typer.Option("activation", help="importance: activation | magnitude | random"),
              engine: str = typer.Option(None, "--engine", help=ENGINE_HELP),
              scores: Path = typer.Option(None, "--scores", help="precomputed importance file (of this model)"),
              data: Path = typer.Option(None, "--data"), samples: int = typer.Option(64, min=1),
              seq_len: int = typer.Option(256, "--seq-len", min=2),
              drop_samples: int = typer.Option(4, "--drop-samples", min=1,
                                               help="chunks for the drop-one-layer/head scores (a forward each)"),
              device: str = typer.Option("auto", help=DEVICE_HELP), dtype: str = typer.Option(None, help=DTYPE_HELP),
              stream: str = typer.Option("auto", "--stream", help=STREAM_HELP),
              save_dtype: str = typer.Option(None, "--save-dtype",
                                             help="dtype the child is written in: fp32 | bf16 | fp16 (default: --dtype)"),
              force: bool = typer.Option(False, "--force"), as_json: bool = typer.Option(False, "--json")):
    """Prune heads, KV heads, MLP neurons, embedding channels and/or layers; writes a loadable checkpoint (layer by
    layer, shard by shard: a streamed parent's child is never whole in memory)."""
    from tessera.importance import HEAD_METRICS, Importance
    from tessera.prune import PruneTarget, prune_to, search_target
    from tessera.stream import is_streamed

    refuse_overwrite(out, force, "output directory")
    if engine is not None and engine not in ("vllm", "llamacpp"):
        raise TesseraError(f"--engine {engine!r}: use vllm or llamacpp")
    if head_metric not in HEAD_METRICS:
        raise TesseraError(f"--head-metric {head_metric!r}: use {' or '.join(HEAD_METRICS)}")
    m = load_model(model, device, dtype, stream=stream)
    if target_params is not None and is_streamed(m):
        raise TesseraError("--target-params builds and scores many children in memory, which a streamed parent "
                           "cannot afford; give the widths (--hidden / --ffn / --layers ...) or load it whole "
                           "(--stream off)")
    needs_head_kl = (heads is not None or kv_heads is not None) and head_metric == "drop_kl"
    imp = (Importance.load(scores) if scores else
           _compute_importance(m, data, seq_len, samples, method, head_drop=needs_head_kl, drop_samples=drop_samples))
    imp.check(m)
    search = None
    if target_params is not None:
        from tessera.data import load_split

        selection = load_split(m.tokenizer, "selection", data, seq_len=seq_len,
                               max_tokens=select_samples * seq_len).take(select_samples)
        search = search_target(m, imp, target_params, selection, max_candidates=max_candidates, multiple=multiple)
        target = search.target
    else:
        target = PruneTarget(hidden=hidden, ffn=_ffn_arg(ffn), heads=heads, kv_heads=kv_heads,
                             drop_layers=_layer_list(drop_layers) if drop_layers else (), layers=layers,
                             layer_metric=layer_metric, head_metric=head_metric)
    from tessera.devices import torch_dtype

    plan = prune_to(m, imp, target, out, check=False, force=force, dtype=torch_dtype(save_dtype) if save_dtype else None,
                    extra={"search": search.as_dict()} if search is not None else None, engine=engine)
    child = plan.arch
    warn_engines(child, str(out))
    summary = {"out": str(out), "target": target.describe(), "params": child.num_params(),
               "parent_params": m.arch.num_params(), "non_embedding_params": child.non_embedding_params(),
               "non_embedding_fraction": child.non_embedding_params() / m.arch.non_embedding_params(),
               "importance": imp.meta, "search": search.as_dict() if search else None}
    if as_json:
        echo_json(summary)
        return
    for line in _importance_lines(imp):
        console.print(line, highlight=False)
    if search is not None:
        console.print(candidates_table(search, m.arch.non_embedding_params()))
        left = search.considered - len(search.candidates)
        console.print(f"measured {len(search.candidates)} of {search.considered} candidates at {target_params:.0%} "
                      f"(--max-candidates {search.max_candidates}" + (f"; {left} not tried" if left else "")
                      + f"; widths in multiples of {multiple}, --multiple)", highlight=False)
    console.print(f"pruned {m.arch.num_params():,} -> {child.num_params():,} parameters "
                  f"({summary['non_embedding_fraction']:.1%} of non-embedding); wrote {out}", highlight=False)


@app.command("distill")
@friendly
def distill_cmd(teacher: str = typer.Option(..., "--teacher"), student: str = typer.Option(..., "--student"),
                out: Path = typer.Option(..., "--out"),
                data: Path = typer.Option(None, "--data", help="text/JSONL (default: the shared corpus)"),
                tokens: int = typer.Option(1_000_000, help="training budget in tokens"),
                seq_len: int = typer.Option(256, "--seq-len", min=2), batch: int = typer.Option(8, min=1),
                grad_accum: int = typer.Option(1, "--grad-accum", min=1), lr: float = typer.Option(1e-4),
                warmup: int = typer.Option(10, help="warm-up steps"), temperature: float = typer.Option(1.0),
                loss: str = typer.Option("kl", help="kl | kl+cosine | kl+cosine-layers (Puzzle's GKD)"),
                eval_every: int = typer.Option(50, "--eval-every", min=1),
                eval_chunks: int = typer.Option(16, "--eval-chunks", min=1,
                                                help="selection-split chunks for the periodic held-out KLD"),
                ckpt_every: int = typer.Option(50, "--ckpt-every", min=1),
                teacher_correction: int = typer.Option(0, "--teacher-correction", min=0,
                                                       help="LM fine-tuning steps on the teacher first"),
                teacher_correction_lr: float = typer.Option(1e-5, "--teacher-correction-lr"),
                device: str = typer.Option("auto", help=DEVICE_HELP),
                dtype: str = typer.Option(None, help="compute dtype: " + DTYPE_HELP + "; the student trains in fp32 "
                                          "master weights under autocast"),
                parallel: str = typer.Option("ddp", "--parallel", help="under torchrun: ddp (replicate the student) | "
                                             "fsdp (shard it with FSDP2 fully_shard)"),
                resume: bool = typer.Option(False, "--resume"), force: bool = typer.Option(False, "--force"),
                seed: int = typer.Option(0), as_json: bool = typer.Option(False, "--json")):
    """Logit distillation (optionally + hidden-state cosine), resumable; run under torchrun for DDP or FSDP2."""
    import json

    from tessera.checkpoint import save
    from tessera.data import load_split
    from tessera.devices import default_dtype, format_name, init_distributed, resolve_device
    from tessera.distill import DistillConfig, distill

    if out.exists() and not (force or resume):
        raise TesseraError(f"{out}: already exists; pass --resume to continue or --force to overwrite")
    ckpt_dir = out.with_name(out.name + ".ckpt")
    last = ckpt_dir / "last" / "state.json"
    if last.is_file() and not (resume or force):
        step = json.loads(last.read_text()).get("step")
        raise TesseraError(f"{ckpt_dir}: holds a checkpoint of an earlier run (step {step}); pass --resume to "
                           "continue it or --force to start over")
    cfg = DistillConfig(tokens=tokens, seq_len=seq_len, batch=batch, grad_accum=grad_accum, lr=lr, warmup_steps=warmup,
                        temperature=temperature, loss=loss, eval_every=eval_every, ckpt_every=ckpt_every, seed=seed,
                        teacher_correction_steps=teacher_correction, teacher_correction_lr=teacher_correction_lr)
    cfg.validate()
    where = resolve_device(device)
    compute = format_name(dtype, ("fp32", "bf16", "fp16")) if dtype else default_dtype(where)
    rank, _world = init_distributed(where)
    # The teacher only runs forward (in the compute dtype) unless it is corrected; the student holds fp32 weights.
    t = load_model(teacher, str(where), "fp32" if teacher_correction else compute)
    s = load_model(student, str(where), "fp32")
    train = load_split(t.tokenizer, "calibration", data, seq_len=seq_len,
                       max_tokens=max(tokens, cfg.tokens_per_step), min_chunks=batch)
    heldout = load_split(t.tokenizer, "selection", data, seq_len=seq_len,
                         max_tokens=eval_chunks * seq_len).take(eval_chunks)
    s, log = distill(t, s, train, cfg, heldout=heldout, ckpt_dir=ckpt_dir, resume=resume, compute_dtype=compute,
                     inplace_teacher=True, progress=not as_json, parallel=parallel)
    if rank != 0:
        return
    save(s, out, force=True, extra_files={"distill_log.json": log})
    warn_engines(s.arch, str(out))
    last_entry = log[-1] if log else {}
    summary = {"out": str(out), "steps": cfg.steps, "tokens": cfg.steps * cfg.tokens_per_step,
               "final_loss": last_entry.get("loss"), "heldout_kld": last_entry.get("heldout_kld"),
               "device": str(where), "compute_dtype": compute, "data": s.provenance[-1]["data"]}
    if as_json:
        echo_json(summary)
        return
    console.print(f"distilled {cfg.steps} steps ({summary['tokens']:,} tokens of the calibration split) on {where} "
                  f"({compute}); final loss {last_entry.get('loss', float('nan')):.4f}, held-out KLD "
                  f"{last_entry.get('heldout_kld', float('nan')):.4f} on {heldout.tokens:,} tokens of the selection "
                  f"split; wrote {out}", highlight=False)
