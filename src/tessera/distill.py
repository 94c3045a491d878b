"""Knowledge distillation: train a student to match a teacher's logits (and optionally hidden states).

Loss (`distill_loss`) = T^2 * KL(teacher_T || student_T) on the logits at temperature T (forward KL, Minitron),
plus, with loss="kl+cosine", a cosine loss between final hidden states (needs equal hidden sizes), or, with
loss="kl+cosine-layers", the cosine loss averaged over every block's output (Puzzle's global distillation, GKD;
needs equal hidden sizes and depths: a Puzzle child keeps the parent's layers, some of them no-op).
AdamW, linear warm-up then cosine decay, gradient clipping, periodic KLD on held-out (selection) chunks.

`distill` runs named steps on a `DistillRun`:

1. `prepare_teacher`  optional teacher correction (Minitron: a short LM fine-tune of the teacher on the data),
                      checkpointed, so a resumed run distils from exactly the same corrected teacher;
2. `start_run`        checks, seeds, the optimizer, the DDP wrapper; fingerprints of the inputs;
3. `restore`          with resume=True: refuses a checkpoint made with other settings or inputs (naming each
                      difference), else loads student, optimizer, RNG and step;
4. `train_step`       one global batch (gradient accumulation, DDP all-reduce), under the compute dtype's autocast;
5. `evaluate`         held-out KLD every `eval_every` steps;
6. `save_checkpoint`  every `ckpt_every` steps, atomically: student weights, optimizer, RNG, step, config and the
                      input fingerprints;
7. `finish`           provenance.

The data order is a pure function of (seed, step), so a resumed run continues bit for bit. Under torchrun each
process takes its slice of every global batch and gradients are averaged (gloo on the CPU, NCCL when the tensors
are on CUDA), so the result matches one process with the same global batch. Two ways to spread the student:

* `parallel="ddp"`  (default) every process holds the whole student; DDP all-reduces gradients;
* `parallel="fsdp"` PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`, per decoder layer, then the root):
                    parameters, gradients and optimizer state are sharded across processes and gathered layer by
                    layer for each forward/backward, for a student too big for one device. Checkpoints hold the
                    full (gathered) weights and optimizer state, so a run may resume with either strategy.

The teacher only runs forward; each process holds it whole (in the compute dtype on a GPU).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tessera.checkpoint import fingerprint
from tessera.data import DataSplit, sha256_ids
from tessera.devices import autocast, default_dtype, format_name
from tessera.errors import TesseraError
from tessera.io import atomic_dir, torch_save
from tessera.model import Transformer

LOSSES = ("kl", "kl+cosine", "kl+cosine-layers")


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
    loss: str = "kl"  # one of LOSSES
    cosine_weight: float = 1.0
    eval_every: int = 50
    ckpt_every: int = 50
    seed: int = 0
    teacher_correction_steps: int = 0  # LM fine-tuning steps on the teacher before distillation (0: none)
    teacher_correction_lr: float = 1e-5

    # Fields that do not change the trained weights, so a resumed run may change them.
    RESUMABLE_CHANGES = ("eval_every", "ckpt_every")

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq_len

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.tokens_per_step)

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise TesseraError(f"--loss {self.loss!r} is not supported; use {' or '.join(LOSSES)}")
        if self.temperature <= 0 or self.lr <= 0:
            raise TesseraError("--temperature and --lr must be positive")
        if self.batch < 1 or self.grad_accum < 1 or self.eval_every < 1 or self.ckpt_every < 1:
            raise TesseraError("--batch, --grad-accum, --eval-every and --ckpt-every must be >= 1")
        if self.teacher_correction_steps < 0 or self.teacher_correction_lr <= 0:
            raise TesseraError("--teacher-correction must be >= 0 steps with a positive learning rate")


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
    if cfg.loss != "kl" and teacher.arch.hidden_size != student.arch.hidden_size:
        raise TesseraError(f"--loss {cfg.loss} needs equal hidden sizes (the student's embedding was pruned); "
                           "use --loss kl")
    if cfg.loss == "kl+cosine-layers" and teacher.arch.num_layers != student.arch.num_layers:
        raise TesseraError(f"--loss kl+cosine-layers compares every layer's output: the teacher has "
                           f"{teacher.arch.num_layers} layers, the student {student.arch.num_layers}; use --loss kl+cosine")
    if teacher.device != student.device:
        raise TesseraError(f"teacher is on {teacher.device} and student on {student.device}; put both on one device")


# ---------------------------------------------------------------------------- the loss
@dataclass
class Outputs:
    """What the loss may compare: logits (B, T, V), final-norm hidden states (B, T, h) and, when asked for, every
    block's output (L tensors (B, T, h))."""

    logits: torch.Tensor
    hidden: torch.Tensor
    states: list[torch.Tensor] | None = None


def run_model(model, ids: torch.Tensor, states: bool = False) -> Outputs:
    """One forward pass (through the DDP wrapper when there is one); `states` also keeps every block's output."""
    if states:
        logits, hidden, all_states = model(ids, return_states=True)
        return Outputs(logits, hidden, all_states[1:])
    logits, hidden = model(ids, return_hidden=True)
    return Outputs(logits, hidden)


def layer_cosine_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of 1 - cos(student block output, teacher block output)."""
    terms = [(1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for t, s in zip(teacher, student)]
    return torch.stack(terms).mean()


def kd_loss(t_logits, s_logits, temperature: float, t_hidden=None, s_hidden=None, cosine_weight: float = 1.0):
    t = torch.log_softmax(t_logits.float() / temperature, -1)
    s = torch.log_softmax(s_logits.float() / temperature, -1)
    loss = (t.exp() * (t - s)).sum(-1).mean() * temperature**2
    if t_hidden is not None:
        loss = loss + cosine_weight * (1 - F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)).mean()
    return loss


def distill_loss(cfg: DistillConfig, teacher: Outputs, student: Outputs) -> torch.Tensor:
    """The training loss of `cfg.loss` (add a term here, and its name to LOSSES, to extend distillation)."""
    if cfg.loss == "kl+cosine":
        return kd_loss(teacher.logits, student.logits, cfg.temperature, teacher.hidden, student.hidden,
                       cfg.cosine_weight)
    if cfg.loss == "kl+cosine-layers":
        return (kd_loss(teacher.logits, student.logits, cfg.temperature)
                + cfg.cosine_weight * layer_cosine_loss(teacher.states, student.states))
    return kd_loss(teacher.logits, student.logits, cfg.temperature)


# ---------------------------------------------------------------------------- the run
PARALLEL = ("ddp", "fsdp")  # how the student is spread over torchrun processes (see the module doc)


@dataclass
class DistillRun:
    cfg: DistillConfig
    teacher: Transformer
    student: Transformer
    model: torch.nn.Module  # the student, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    train: torch.Tensor
    heldout: torch.Tensor | None
    compute_dtype: str  # autocast dtype (fp32: none)
    world: int = 1
    rank: int = 0
    step: int = 0
    log: list[dict] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # fingerprints of teacher, student and data: must match on resume
    data: dict = field(default_factory=dict)  # records of the data splits used
    ckpt: Path | None = None
    parallel: str = "ddp"  # how the student is spread over processes (PARALLEL); one process: unused

    @property
    def device(self) -> torch.device:
        return self.student.device

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.parallel == "fsdp"


def _tensor_and_record(data: torch.Tensor | DataSplit | None) -> tuple[torch.Tensor | None, dict | None]:
    if data is None:
        return None, None
    if isinstance(data, DataSplit):
        return data.chunks, data.record()
    return data, {"split": "given", "chunks": len(data), "tokens": data.numel(), "sha256": sha256_ids(data)}


def prepare_teacher(teacher: Transformer, train: torch.Tensor, cfg: DistillConfig, ckpt_dir: Path | None, *,
                    inplace: bool = False, rank: int = 0, compute_dtype: str | None = None) -> Transformer:
    """The teacher to distil from: itself, or its correction (`correct_teacher`), which is saved under
    `ckpt_dir/teacher` and reloaded from there when the same correction of the same teacher was made before."""
    if cfg.teacher_correction_steps == 0:
        return teacher
    settings = {"teacher": fingerprint(teacher), "data": sha256_ids(train), "steps": cfg.teacher_correction_steps,
                "lr": cfg.teacher_correction_lr, "batch": cfg.batch, "seed": cfg.seed}
    saved = ckpt_dir / "teacher" if ckpt_dir is not None else None
    if saved is not None and (saved / "state.json").is_file():
        if json.loads((saved / "state.json").read_text()).get("settings") == settings:
            target = teacher if inplace else copy.deepcopy(teacher)
            weights = load_file(str(saved / "teacher.safetensors"), device=str(teacher.device))
            target.load_state_dict(weights, strict=not teacher.arch.tie_word_embeddings)
            target.provenance = [*getattr(teacher, "provenance", []), _correction_record(cfg)]
            return target.eval()
    corrected = correct_teacher(teacher, train, steps=cfg.teacher_correction_steps, lr=cfg.teacher_correction_lr,
                                batch=cfg.batch, seed=cfg.seed, inplace=inplace, compute_dtype=compute_dtype)
    if saved is not None and rank == 0:
        with atomic_dir(saved, force=True) as tmp:
            save_file(_cpu_state(corrected), str(tmp / "teacher.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"settings": settings}, indent=2, sort_keys=True))
    if dist.is_initialized():
        dist.barrier()
    return corrected


def start_run(teacher: Transformer, student: Transformer, train: torch.Tensor | DataSplit, cfg: DistillConfig, *,
              heldout: torch.Tensor | DataSplit | None, ckpt_dir: str | Path | None,
              compute_dtype: str | None, parallel: str = "ddp") -> DistillRun:
    cfg.validate()
    if parallel not in PARALLEL:
        raise TesseraError(f"--parallel {parallel!r}: use {' or '.join(PARALLEL)}")
    check_pair(teacher, student, cfg)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    train_t, train_rec = _tensor_and_record(train)
    held_t, held_rec = _tensor_and_record(heldout)
    if cfg.batch % world:
        raise TesseraError(f"--batch {cfg.batch} must be divisible by the {world} processes")
    if len(train_t) < cfg.batch:
        raise TesseraError(f"only {len(train_t)} training chunks of {train_t.shape[1] if train_t.ndim == 2 else '?'} "
                           f"tokens for a batch of {cfg.batch}; give more data or lower --batch/--seq-len")
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    model: torch.nn.Module = student
    inputs = {"teacher": fingerprint(teacher), "student": fingerprint(student), "train": sha256_ids(train_t),
              "heldout": sha256_ids(held_t) if held_t is not None else None}  # before sharding: whole weights
    if world > 1 and parallel == "fsdp":
        shard(student)
    elif world > 1:
        device = student.device
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    dtype = format_name(compute_dtype) if compute_dtype else default_dtype(student.device)
    return DistillRun(cfg, teacher, student, model, optimizer, train_t, held_t, dtype, world, rank, inputs=inputs,
                      data={"train": train_rec, "heldout": held_rec},
                      ckpt=Path(ckpt_dir) / "last" if ckpt_dir is not None else None, parallel=parallel)


def shard(student: Transformer) -> None:
    """FSDP2: each decoder layer is one all-gather unit, the root (embeddings, final norm, head) another."""
    from torch.distributed.fsdp import fully_shard

    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student)


def full_state(run: DistillRun, everywhere: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The student's whole weights (CPU, tied head dropped) and optimizer state: gathered from every process under
    FSDP (a collective: every rank calls it; rank 0 alone receives them unless `everywhere`), read directly
    otherwise."""
    if not run.sharded:
        return _cpu_state(run.student), run.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    model_sd, optim_sd = get_state_dict(run.student, run.optimizer, options=opts)
    if run.student.arch.tie_word_embeddings:
        model_sd.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in model_sd.items()}, optim_sd


def resume_differences(saved: dict, run: DistillRun) -> list[str]:
    """'name: then -> now' for every config field and input that differs from the checkpoint's."""
    diffs = []
    then_cfg, now_cfg = saved.get("config", {}), asdict(run.cfg)
    for key, now in now_cfg.items():
        if key not in DistillConfig.RESUMABLE_CHANGES and then_cfg.get(key) != now:
            diffs.append(f"{key} {then_cfg.get(key)!r} -> {now!r}")
    then_in = saved.get("inputs") or {}
    for key, now in run.inputs.items():
        if then_in.get(key) != now:
            diffs.append(f"{key} {then_in.get(key) or 'unrecorded'} -> {now}")
    return diffs


def restore(run: DistillRun) -> None:
    if run.ckpt is None or not (run.ckpt / "state.json").is_file():
        where = run.ckpt.parent if run.ckpt is not None else "(no checkpoint directory given)"
        raise TesseraError(f"--resume: no checkpoint in {where}; start without --resume")
    saved = json.loads((run.ckpt / "state.json").read_text())
    diffs = resume_differences(saved, run)
    if diffs:
        raise TesseraError(f"--resume: the checkpoint in {run.ckpt} was made with other settings or inputs: "
                           f"{'; '.join(diffs)}; restore them, or start over with --force")
    extra = torch.load(run.ckpt / "optimizer.pt", weights_only=True, map_location="cpu" if run.sharded else run.device)
    if run.sharded:  # every process reads the whole checkpoint and keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        weights = load_file(str(run.ckpt / "student.safetensors"))
        set_state_dict(run.student, run.optimizer, model_state_dict=weights, optim_state_dict=extra["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=not run.student.arch.tie_word_embeddings))
    else:
        weights = load_file(str(run.ckpt / "student.safetensors"), device=str(run.device))
        run.student.load_state_dict(weights, strict=not run.student.arch.tie_word_embeddings)
        run.optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"].cpu())
    if "cuda_rng" in extra and torch.cuda.is_available() and len(extra["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in extra["cuda_rng"]])
    run.step, run.log = saved["step"], saved["log"]


def train_step(run: DistillRun) -> dict:
    """One optimizer step over a global batch; returns its log entry."""
    cfg = run.cfg
    t0 = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, run.step)
    idx = batch_indices(cfg, len(run.train), run.step).view(cfg.grad_accum, cfg.batch)
    per_rank = cfg.batch // run.world
    total = 0.0
    for micro in range(cfg.grad_accum):
        ids = run.train[idx[micro, run.rank * per_rank:(run.rank + 1) * per_rank]].to(run.device)
        with autocast(run.device, run.compute_dtype):
            layers = cfg.loss == "kl+cosine-layers"
            with torch.no_grad():
                t_out = run_model(run.teacher, ids, layers)
            s_out = run_model(run.model, ids, layers)
            loss = distill_loss(cfg, t_out, s_out) / cfg.grad_accum
        loss.backward()
        total += loss.item()
    if run.world > 1:  # log the global batch's loss, not this rank's share
        t = torch.tensor(total, device=run.device)
        dist.all_reduce(t)
        total = t.item() / run.world
    torch.nn.utils.clip_grad_norm_(run.student.parameters(), cfg.clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {"step": run.step, "loss": total, "lr": lr_at(cfg, run.step - 1),
            "tokens_per_s": cfg.tokens_per_step / (time.perf_counter() - t0)}


def evaluate(run: DistillRun, entry: dict) -> None:
    """Adds the held-out KLD to `entry` every `eval_every` steps and at the last step."""
    if run.heldout is None or not (run.step % run.cfg.eval_every == 0 or run.step == run.cfg.steps):
        return
    from tessera.evaluate import mean_kld

    run.student.eval()
    entry["heldout_kld"] = mean_kld(run.teacher, run.student, run.heldout).kld
    run.student.train()


def _cpu_state(model: Transformer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(run: DistillRun, force: bool = False) -> None:
    """Every `ckpt_every` steps and at the end (rank 0): student, optimizer, RNG, step, log, config, inputs."""
    if run.ckpt is None or not (force or run.step % run.cfg.ckpt_every == 0 or run.step == run.cfg.steps):
        return
    if run.rank != 0 and not run.sharded:
        return
    weights, optim_state = full_state(run)  # under FSDP every rank takes part in the gather
    if run.rank != 0:
        return
    with atomic_dir(run.ckpt, force=True) as tmp:
        save_file(weights, str(tmp / "student.safetensors"))
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():  # resume on GPU is bit-exact too (nothing in the loop draws from it today)
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch_save({"optimizer": optim_state, **rng}, tmp / "optimizer.pt")
        state = {"step": run.step, "config": asdict(run.cfg), "inputs": run.inputs, "data": run.data, "log": run.log}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def finish(run: DistillRun) -> Transformer:
    if run.sharded:  # gather the shards into a plain (unsharded) model on every process
        from tessera.checkpoint import from_state_dict

        weights, _ = full_state(run, everywhere=True)
        plain = from_state_dict(run.student.arch, weights, source="fsdp").to(run.device)
        plain.tokenizer = run.student.tokenizer
        plain.provenance = list(getattr(run.student, "provenance", []))
        run.student = plain
    run.student.eval()
    run.student.provenance = [*getattr(run.student, "provenance", []),
                              {"stage": "distill", "config": asdict(run.cfg), "steps": run.step, "world_size": run.world,
                               "parallel": run.parallel if run.world > 1 else None,
                               "final_loss": run.log[-1]["loss"] if run.log else None, "inputs": run.inputs,
                               "data": run.data}]
    return run.student


def distill(teacher: Transformer, student: Transformer, train: torch.Tensor | DataSplit, cfg: DistillConfig, *,
            heldout: torch.Tensor | DataSplit | None = None, ckpt_dir: str | Path | None = None,
            resume: bool = False, max_steps: int | None = None, progress: bool = True,
            compute_dtype: str | None = None, inplace_teacher: bool = False,
            parallel: str = "ddp") -> tuple[Transformer, list[dict]]:
    """Train `student` in place to match `teacher` on token chunks `train` (N, seq_len; the calibration split);
    returns it and the log. `heldout` (the selection split) is scored every `cfg.eval_every` steps.

    Both models must be on one device (the student in fp32: it holds the master weights); the forward passes run
    under `compute_dtype` autocast (default: bf16 on a GPU, none (fp32) on the CPU). `max_steps` stops early (as if
    killed) after that many steps of this call; a later call with resume=True continues exactly where the checkpoint
    left off.
    `inplace_teacher` corrects the teacher in place (when the caller holds the only copy of a large teacher).
    `parallel` (under torchrun): "ddp" replicates the student, "fsdp" shards it with FSDP2 (see the module doc).
    """
    cfg.validate()
    train_t = train.chunks if isinstance(train, DataSplit) else train
    rank = dist.get_rank() if dist.is_initialized() else 0
    teacher = prepare_teacher(teacher, train_t, cfg, Path(ckpt_dir) if ckpt_dir is not None else None,
                              inplace=inplace_teacher, rank=rank, compute_dtype=compute_dtype)
    run = start_run(teacher, student, train, cfg, heldout=heldout, ckpt_dir=ckpt_dir, compute_dtype=compute_dtype,
                    parallel=parallel)
    if resume:
        restore(run)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not progress or run.rank != 0)
    done_here = 0
    with bar:
        task = bar.add_task("distill", total=cfg.steps, completed=run.step, info="")
        while run.step < cfg.steps and (max_steps is None or done_here < max_steps):
            entry = train_step(run)
            done_here += 1
            evaluate(run, entry)
            run.log.append(entry)
            bar.update(task, completed=run.step, info=f"loss {entry['loss']:.4f}  {entry['tokens_per_s']:.0f} tok/s"
                       + (f"  kld {entry['heldout_kld']:.4f}" if "heldout_kld" in entry else ""))
            save_checkpoint(run)
    return finish(run), run.log


def _correction_record(cfg: DistillConfig) -> dict:
    return {"stage": "teacher_correction", "steps": cfg.teacher_correction_steps, "lr": cfg.teacher_correction_lr}


def correct_teacher(teacher: Transformer, train: torch.Tensor, *, steps: int, lr: float = 1e-5, batch: int = 8,
                    seed: int = 0, inplace: bool = False, compute_dtype: str | None = None) -> Transformer:
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
    dtype = compute_dtype or default_dtype(teacher.device)
    for _ in range(steps):
        ids = train[torch.randint(len(train), (batch,), generator=g)].to(teacher.device)
        with autocast(teacher.device, dtype):
            logits = teacher(ids)[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    teacher.eval()
    teacher.provenance = [*getattr(teacher, "provenance", []), {"stage": "teacher_correction", "steps": steps, "lr": lr}]
    return teacher
