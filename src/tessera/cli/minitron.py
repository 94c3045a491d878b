"""Minitron commands: importance, prune, distill."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.cli.app import app, console, friendly, int_list
from tessera.errors import TesseraError


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
