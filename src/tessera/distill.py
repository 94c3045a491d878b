"""Knowledge distillation: train a student to match a teacher's logits (and optionally hidden states).

Loss = T^2 * KL(teacher_T || student_T) on the logits at temperature T (forward KL, Minitron), plus, with
loss="kl+cosine", a cosine loss between final hidden states (Puzzle's GKD; needs equal hidden sizes). AdamW,
linear warm-up then cosine decay, gradient clipping, periodic held-out KLD. Every `ckpt_every` steps a
checkpoint (student weights, optimizer, RNG, step) is written atomically; `resume=True` continues from it
bit for bit: the data order is a pure function of (seed, step). Under torchrun each process takes its slice
of every global batch and DDP averages gradients (gloo on CPU, nccl on GPU), so the result matches one
process with the same global batch.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tessera.errors import TesseraError
from tessera.io import atomic_dir
from tessera.model import Transformer


@dataclass(frozen=True)
class DistillConfig:
    tokens: int = 1_000_000  # training budget in tokens (global)
    seq_len: int = 256
    batch: int = 8  # sequences per micro-batch (global, split across processes)
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    temperature: float = 1.0
    loss: str = "kl"  # "kl" | "kl+cosine"
    cosine_weight: float = 1.0
    eval_every: int = 50
    ckpt_every: int = 50
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq_len

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def validate(self) -> None:
        if self.loss not in ("kl", "kl+cosine"):
            raise TesseraError(f"--loss {self.loss!r} is not supported; use kl or kl+cosine")
        if self.temperature <= 0 or self.lr <= 0:
            raise TesseraError("--temperature and --lr must be positive")


def lr_at(cfg: DistillConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def batch_indices(cfg: DistillConfig, n_chunks: int, step: int) -> torch.Tensor:
    """Chunk indices of global step `step`: epochs are seeded permutations, so any step is reproducible."""
    per_step = cfg.batch * cfg.grad_accum
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, pos = divmod(start + len(out), n_chunks)
        perm = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        out.extend(perm[pos:pos + per_step - len(out)].tolist())
    return torch.tensor(out)


def check_pair(teacher: Transformer, student: Transformer, cfg: DistillConfig) -> None:
    if teacher.arch.vocab_size != student.arch.vocab_size:
        raise TesseraError(f"teacher vocabulary ({teacher.arch.vocab_size}) and student vocabulary "
                           f"({student.arch.vocab_size}) differ; distillation needs one tokenizer")
    tt, st = teacher.tokenizer, student.tokenizer
    if tt is not None and st is not None and tt.get_vocab() != st.get_vocab():
        raise TesseraError("teacher and student tokenizers differ; distil a student pruned from this teacher")
    if cfg.loss == "kl+cosine" and teacher.arch.hidden_size != student.arch.hidden_size:
        raise TesseraError("--loss kl+cosine needs equal hidden sizes (the student's embedding was pruned); use --loss kl")


def kd_loss(t_logits, s_logits, temperature: float, t_hidden=None, s_hidden=None, cosine_weight: float = 1.0):
    t = torch.log_softmax(t_logits.float() / temperature, -1)
    s = torch.log_softmax(s_logits.float() / temperature, -1)
    loss = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    if t_hidden is not None:
        loss = loss + cosine_weight * (1 - F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)).mean()
    return loss


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, student: Transformer, optimizer, step: int, cfg: DistillConfig, log: list) -> None:
    with atomic_dir(path, force=True) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
        if student.arch.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "student.safetensors"))
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():  # resume on GPU is bit-exact too (nothing in the loop draws from it today)
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), **rng}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(cfg), "log": log}, indent=2))


def load_checkpoint(path: Path, student: Transformer, optimizer) -> tuple[int, list]:
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "student.safetensors"))
    student.load_state_dict(weights, strict=not student.arch.tie_word_embeddings)
    extra = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"])
    if "cuda_rng" in extra and torch.cuda.is_available() and len(extra["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state["step"], state["log"]


# ---------------------------------------------------------------------------- training
def distill(teacher: Transformer, student: Transformer, train: torch.Tensor, cfg: DistillConfig, *,
            heldout: torch.Tensor | None = None, ckpt_dir: str | Path | None = None, resume: bool = False,
            max_steps: int | None = None, progress: bool = True) -> tuple[Transformer, list[dict]]:
    """Train `student` in place to match `teacher` on token chunks `train` (N, seq_len); returns it and the log.

    `max_steps` stops early (as if killed) after that many steps of this call; a later call with
    resume=True continues exactly where the checkpoint left off.
    """
    cfg.validate()
    check_pair(teacher, student, cfg)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if cfg.batch % world:
        raise TesseraError(f"--batch {cfg.batch} must be divisible by the {world} processes")
    if len(train) < cfg.batch:
        raise TesseraError(f"only {len(train)} training chunks of {train.shape[1] if train.ndim == 2 else '?'} "
                           f"tokens for a batch of {cfg.batch}; give more data or lower --batch/--seq-len")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = Path(ckpt_dir) / "last" if ckpt_dir is not None else None
    step, log = 0, []
    if resume:
        if ckpt is None or not (ckpt / "state.json").is_file():
            raise TesseraError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        step, log = load_checkpoint(ckpt, student, optimizer)
    use_cosine = cfg.loss == "kl+cosine"
    per_rank = cfg.batch // world
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress or rank != 0)
    done_here = 0
    with bar:
        task = bar.add_task("distill", total=cfg.steps, completed=step, info="")
        while step < cfg.steps and (max_steps is None or done_here < max_steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            idx = batch_indices(cfg, len(train), step).view(cfg.grad_accum, cfg.batch)
            total = 0.0
            for micro in range(cfg.grad_accum):
                ids = train[idx[micro, rank * per_rank:(rank + 1) * per_rank]].to(student.device)
                with torch.no_grad():
                    t_logits, th = teacher(ids, return_hidden=True)
                s_logits, sh = model(ids, return_hidden=True)  # through DDP's forward when distributed
                loss = kd_loss(t_logits, s_logits, cfg.temperature, th if use_cosine else None,
                               sh if use_cosine else None, cfg.cosine_weight) / cfg.grad_accum
                loss.backward()
                total += loss.item()
            if world > 1:  # log the global batch's loss, not this rank's share
                t = torch.tensor(total)
                dist.all_reduce(t)
                total = t.item() / world
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done_here += 1
            entry = {"step": step, "loss": total, "lr": lr_at(cfg, step - 1),
                     "tokens_per_s": cfg.tokens_per_step / (time.perf_counter() - t0)}
            if heldout is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                from tessera.evaluate import mean_kld

                student.eval()
                entry["heldout_kld"] = mean_kld(teacher, student, heldout).kld
                student.train()
            log.append(entry)
            bar.update(task, completed=step, info=f"loss {total:.4f}  {entry['tokens_per_s']:.0f} tok/s"
                       + (f"  kld {entry['heldout_kld']:.4f}" if "heldout_kld" in entry else ""))
            if ckpt is not None and rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                save_checkpoint(ckpt, student, optimizer, step, cfg, log)
    student.eval()
    student.provenance = [*getattr(student, "provenance", []),
                          {"stage": "distill", "config": asdict(cfg), "steps": step, "world_size": world,
                           "final_loss": log[-1]["loss"] if log else None}]
    return student, log


def correct_teacher(teacher: Transformer, train: torch.Tensor, *, steps: int, lr: float = 1e-5, batch: int = 8,
                    seed: int = 0, inplace: bool = False) -> Transformer:
    """Teacher correction (Minitron): briefly fine-tune the teacher with next-token loss on the distillation data,
    so it matches the data the student is distilled on. Returns a new model unless `inplace` (the CLI's choice:
    it holds the only copy, and a second copy of a large teacher may not fit)."""
    if steps < 1 or len(train) == 0:
        raise TesseraError("teacher correction needs at least one step and some training data")
    if not inplace:
        teacher = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    teacher.train()
    for _ in range(steps):
        ids = train[torch.randint(len(train), (batch,), generator=g)].to(teacher.device)
        logits = teacher(ids)[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    teacher.eval()
    teacher.provenance = [*getattr(teacher, "provenance", []), {"stage": "teacher_correction", "steps": steps, "lr": lr}]
    return teacher
