"""Puzzle stage 2: blockwise local distillation (BLD) of every variant in the library.

Public API (names are stable; `tessera.puzzle.assemble` and the CLI call them):

    BLDConfig                       frozen: tokens, batch, lr, min_lr_ratio, warmup_steps, weight_decay, betas, seed,
                                    save_every (the only field a resumed run may change)
    run_bld(library, parent, data, cfg, ...) -> BLDReport
                                    train every variant of the library (or of `layers`), resumable, split across
                                    torchrun processes (rank r takes the pending layers r::world)
    variant_state(library, parent, layer, variant) -> state dict
                                    a variant's trained weights in the parent's dtype, or its untrained
                                    initialisation when BLD has not trained it (the parent's own sub-block, no_op,
                                    a layer BLD skipped); quantised variants use their native twin's weights
    is_trained(library, layer, variant) -> bool
    weights_id(library, layer, variant) -> str
                                    'init' or the trained weights' hash: what downstream caches key on
    load_report(library) -> BLDReport | None
    normalised_mse(library, parent, chunks, ...) -> {(layer, key): nMSE}
                                    each variant's normalised MSE on `chunks`, trained or at initialisation
    attention_then_parent_ffn / parent_attention_then_ffn
                                    the layer with one sub-block replaced, shared with `tessera.puzzle.scoring`

What is learned (Puzzle, section 4, "decoupled BLD"): every variant learns to reproduce the parent's layer from
the parent's own input to that layer. An attention variant is trained beside the parent's FFN (frozen), an FFN
variant beside the parent's attention (frozen), so a layer costs |attention| + |FFN| trainings, not their product.
The loss is the normalised MSE of the layer's update to the residual stream,

    nMSE = MSE(y_parent, y_variant) / MSE(y_parent - x, 0)     x: the layer's input, y: its output,

so 0 is exact and 1 is as far off as dropping the whole layer (the residual x cancels in the numerator).

How (on `tessera.stream`'s executor, so an in-memory and a streamed 8B parent run the same code): the calibration
chunks go through the parent layer by layer; at layer i each batch's input x, mid-layer state h (the FFN's input,
taken by a hook, never recomputed) and output y are computed once and every variant of the layer takes one AdamW
step on them, so all variants of a layer train in one pass over the data (tokens = chunks x seq_len, one epoch).

On disk, under the library directory:

    bld/run.json                     config, data record, parent fingerprint (a resumed run must match)
    bld/layer-NNN/KEY.safetensors    a trained variant (fp32 master weights; metadata: steps, tokens, nMSE)
    bld/layer-NNN/KEY.resume.pt      while training: weights, AdamW moments, step, loss sums (weights_only load)
    bld/layer-NNN/layer.json         the layer is done: per-variant nMSE at initialisation and after training
    bld/bld.json                     the report, written when every layer is done

Resume: a killed run restarts where it stopped and ends with the same weights bit for bit: the data order is a
seeded permutation of the chunks, batch b of a layer is step b of each of its variants, training draws no random
numbers (no dropout), and the resume file holds everything the next step depends on. Done layers are skipped; a
partly trained layer restarts from its last checkpoint (every `save_every` steps and at the end of the layer).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tessera.data import DataSplit, sha256_ids
from tessera.errors import TesseraError
from tessera.io import atomic_path, atomic_write_json
from tessera.model import Block, Transformer
from tessera.puzzle.library import Library, Variant, init_variant, parent_variants, variant_block
from tessera.stream.executor import Observer, rope_for

BLD_FORMAT = "tessera.puzzle.bld"
BLD_VERSION = 1
BLD_DIR = "bld"


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class BLDConfig:
    """How the variants are trained. `tokens` caps the calibration tokens used (one pass; each variant sees all of
    them); `batch` is sequences per step; the learning rate warms up linearly, then decays by a cosine to
    `lr * min_lr_ratio` over the pass."""

    tokens: int = 1_000_000
    batch: int = 8
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    save_every: int = 50

    # Fields that do not change the trained weights, so a resumed run may change them.
    RESUMABLE_CHANGES = ("save_every",)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.tokens < 1 or self.batch < 1 or self.save_every < 1 or self.warmup_steps < 0:
            raise TesseraError("BLD --tokens, --batch and --save-every must be >= 1 (warmup >= 0)")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.weight_decay < 0:
            raise TesseraError("BLD --lr must be positive, min_lr_ratio in [0, 1], weight decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise TesseraError(f"BLD betas {self.betas} must be two numbers in [0, 1)")

    def lr_at(self, step: int, steps: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class BLDReport:
    """What `run_bld` did: per (layer, key) the nMSE at initialisation and after training, steps and tokens."""

    path: Path
    config: dict
    data: dict
    variants: dict[tuple[int, str], dict] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_s: float = 0.0  # calibration tokens through training per second (this process)
    variant_tokens_per_s: float = 0.0  # the same times the variants each token trained

    def nmse(self, which: str = "final") -> dict[tuple[int, str], float]:
        return {k: v[f"nmse_{which}"] for k, v in self.variants.items()}

    def to_json(self) -> dict:
        return {"format": BLD_FORMAT, "version": BLD_VERSION, "config": self.config, "data": self.data,
                "seconds": round(self.seconds, 2), "tokens_per_s": round(self.tokens_per_s, 1),
                "variant_tokens_per_s": round(self.variant_tokens_per_s, 1),
                "variants": [{"layer": layer, "key": key, **m} for (layer, key), m in sorted(self.variants.items())]}


# ---------------------------------------------------------------------------- the layer with one sub-block replaced
def attention_then_parent_ffn(attention: Block, parent_block: Block, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Layer output with `attention` (a variant block: x + a(norm x)) in place of the parent's attention."""
    h = attention(x, cos, sin, None, None, 0)
    if parent_block.mlp is None:
        return h
    return h + parent_block.mlp(parent_block.post_attention_layernorm(h))


def parent_attention_then_ffn(parent_block: Block, ffn: Block, x: torch.Tensor, cos, sin) -> torch.Tensor:
    """Layer output with `ffn` (a variant block: h + f(norm h)) in place of the parent's FFN."""
    h = x
    if parent_block.self_attn is not None:
        h = x + parent_block.self_attn(parent_block.input_layernorm(x), cos, sin, None, None, 0)
    return ffn(h, cos, sin, None, None, 0)


# ---------------------------------------------------------------------------- where things are
def bld_dir(library: Library) -> Path:
    return Path(library.path) / BLD_DIR


def _layer_dir(library: Library, layer: int) -> Path:
    return bld_dir(library) / f"layer-{layer:03d}"


def _weights_file(library: Library, layer: int, variant: Variant) -> Path:
    return _layer_dir(library, layer) / f"{variant.native.key}.safetensors"


def _resume_file(library: Library, layer: int, variant: Variant) -> Path:
    return _layer_dir(library, layer) / f"{variant.native.key}.resume.pt"


def trainable(library: Library, layer: int, parts: Sequence[str] = ("attention", "ffn")) -> list[Variant]:
    """The variants of `layer` that BLD trains: native, with weights, not the parent's own sub-block (exact)."""
    own = set(parent_variants(library.arch, layer))
    return [v for v in library.variants(layer) if v.part in parts and v.precision == "native" and v.has_weights
            and v not in own]


def is_trained(library: Library, layer: int, variant: Variant) -> bool:
    return _weights_file(library, layer, variant).is_file()


def variant_state(library: Library, parent: Transformer, layer: int, variant: Variant, *,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights of `variant` in `layer` (named as in a Block), in `dtype` (default: the parent's), on the
    parent's device: BLD's trained weights when it trained them, else the untrained initialisation from the
    parent (the parent's own sub-block, a no_op, a variant BLD has not reached). A quantised variant gets its
    native twin's weights (`variant_block` fake-quantises them)."""
    from tessera.stream import layer as materialised

    dtype = dtype or parent.model.embed_tokens.weight.dtype
    file = _weights_file(library, layer, variant)
    if file.is_file() and variant.has_weights:
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        with materialised(parent, layer):
            state = init_variant(parent, layer, variant, library.stats)
    return {k: v.to(device=parent.device, dtype=dtype) for k, v in state.items()}


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, values)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update((t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_id(library: Library, layer: int, variant: Variant) -> str:
    """What `variant_state` returns, as a short id that changes when BLD retrains the variant: the trained
    weights' hash (read from the file's header), or 'init' for the initialisation from the parent (fixed by the
    library, which is tied to the parent's fingerprint). Caches of downstream stages key on it."""
    file = _weights_file(library, layer, variant)
    if not (variant.has_weights and file.is_file()):
        return "init"
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    return meta.get("weights_sha256") or f"mtime-{file.stat().st_mtime_ns}"


def load_report(library: Library) -> BLDReport | None:
    file = bld_dir(library) / "bld.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    variants = {(v.pop("layer"), v.pop("key")): v for v in raw["variants"]}
    return BLDReport(bld_dir(library), raw["config"], raw["data"], variants, raw.get("seconds", 0.0),
                     raw.get("tokens_per_s", 0.0))


# ---------------------------------------------------------------------------- one variant in training
class _Trainee:
    def __init__(self, library: Library, parent: Transformer, layer: int, variant: Variant, cfg: BLDConfig,
                 steps: int, device: torch.device):
        self.library, self.layer, self.variant, self.cfg, self.steps = library, layer, variant, cfg, steps
        self.resume_file = _resume_file(library, layer, variant)
        saved = None
        if self.resume_file.is_file():
            saved = torch.load(self.resume_file, map_location="cpu", weights_only=True)
            if saved.get("steps") != steps:
                raise TesseraError(f"{self.resume_file}: saved for {saved.get('steps')} steps, this run has {steps}; "
                                   "rerun with --force to restart BLD")
            state = saved["weights"]
        else:
            state = init_variant(parent, layer, variant, library.stats)
        state = {k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
        self.module = variant_block(library.arch, variant, state).to(device).train()
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.step, self.nmse_init, self.loss_sum, self.loss_count = 0, None, 0.0, 0
        if saved is not None:
            self.opt.load_state_dict(saved["optimizer"])
            self.step, self.nmse_init = int(saved["step"]), saved["nmse_init"]
            self.loss_sum, self.loss_count = float(saved["loss_sum"]), int(saved["loss_count"])

    @property
    def tail_start(self) -> int:
        """Steps from here on enter the final nMSE (the last quarter of the pass, measured before each update)."""
        return self.steps - max(1, self.steps // 4)

    def train_step(self, out: Callable[[Block], torch.Tensor], y: torch.Tensor, norm: torch.Tensor) -> float:
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr_at(self.step, self.steps)
        loss = (out(self.module) - y).pow(2).mean() / norm
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        value = float(loss.detach())
        if self.step == 0:
            self.nmse_init = value
        if self.step >= self.tail_start:
            self.loss_sum += value
            self.loss_count += 1
        self.step += 1
        return value

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.module.state_dict().items()}

    def save_resume(self) -> None:
        payload = {"weights": self.weights(), "optimizer": self.opt.state_dict(), "step": self.step,
                   "steps": self.steps, "nmse_init": self.nmse_init, "loss_sum": self.loss_sum,
                   "loss_count": self.loss_count}
        with atomic_path(self.resume_file) as tmp:
            torch.save(payload, tmp)

    def finish(self, tokens: int) -> dict:
        from safetensors.torch import save_file

        metrics = {"nmse_init": self.nmse_init, "nmse_final": self.loss_sum / max(1, self.loss_count),
                   "steps": self.step, "tokens": tokens}
        weights = self.weights()
        meta = {**{k: json.dumps(v) for k, v in metrics.items()}, "weights_sha256": state_hash(weights)}
        with atomic_path(_weights_file(self.library, self.layer, self.variant)) as tmp:
            save_file(weights, str(tmp), metadata=meta)
        return metrics


# ---------------------------------------------------------------------------- the observer that trains
class _Trainer(Observer):
    """An executor observer: at each of `layers`, every batch's (x, h, y) trains every variant of the layer."""

    def __init__(self, library: Library, parent: Transformer, cfg: BLDConfig, layers: Sequence[int], steps: int,
                 chunks: torch.Tensor, on_step: Callable[[int, int], None] | None, bar):
        self.library, self.parent, self.cfg, self.steps = library, parent, cfg, steps
        self.seq_len, self.layer_tokens = chunks.shape[1], int(chunks.numel())
        self.layers, self.on_step, self.bar = set(layers), on_step, bar
        self.trainees: list[_Trainee] = []
        self.parent_block: Block | None = None
        self.h: torch.Tensor | None = None
        self.tokens = 0  # data tokens trained on (each trains every variant of its layer)
        self.variant_tokens = 0
        self.ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.t0 = time.perf_counter()

    def attach(self, i: int, block: Block) -> list:
        self.trainees = []
        if i not in self.layers or (_layer_dir(self.library, i) / "layer.json").is_file():
            return []
        device = self.parent.device
        self.trainees = [_Trainee(self.library, self.parent, i, v, self.cfg, self.steps, device)
                         for v in trainable(self.library, i)]
        # the parent's layer in fp32, frozen, beside which the variants train (a copy: a streamed layer goes away)
        self.parent_block = Block(self.library.arch, self.library.arch.blocks[i]).to(device)
        self.parent_block.load_state_dict({k: t.float() for k, t in block.state_dict().items()}, strict=True)
        self.parent_block.requires_grad_(False)
        if block.post_attention_layernorm is None:
            return []

        def take_h(_m, args):
            self.h = args[0]

        return [block.post_attention_layernorm.register_forward_pre_hook(take_h)]

    def _rope(self, rows: int):
        if rows not in self.ropes:
            self.ropes[rows] = rope_for(self.parent, rows, self.seq_len, torch.float32)
        return self.ropes[rows]

    def after_batch(self, i: int, b: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.trainees:
            return
        if self.parent_block.mlp is None:
            h = y
        elif self.parent_block.self_attn is None:
            h = x
        else:
            h = self.h
        x32, h32, y32 = x.float(), h.float(), y.float()
        cos, sin = self._rope(x.shape[0])
        norm = (y32 - x32).pow(2).mean().clamp_min(1e-30)
        ran = 0
        with torch.enable_grad():
            for t in self.trainees:
                if t.step > b:  # trained on this batch before the run was interrupted
                    continue
                if t.variant.part == "attention":
                    t.train_step(lambda m: attention_then_parent_ffn(m, self.parent_block, x32, cos, sin), y32, norm)
                else:
                    t.train_step(lambda m: m(h32, cos, sin, None, None, 0), y32, norm)
                ran += 1
        last = b == self.steps - 1
        if ran and not last and (b + 1) % self.cfg.save_every == 0:
            for t in self.trainees:
                t.save_resume()
        n_tokens = x.shape[0] * x.shape[1]
        self.tokens += n_tokens if ran else 0
        self.variant_tokens += n_tokens * ran
        if self.bar is not None:
            bar, task = self.bar
            rate = self.variant_tokens / max(1e-9, time.perf_counter() - self.t0)
            bar.update(task, advance=n_tokens, rate=f"{rate:,.0f} variant-tokens/s", layer=f"layer {i}")
        if ran and self.on_step is not None:
            self.on_step(i, b)
        if last:
            self._finish_layer(i)

    def _finish_layer(self, i: int) -> None:
        metrics = {t.variant.key: t.finish(self.layer_tokens) for t in self.trainees}
        atomic_write_json(_layer_dir(self.library, i) / "layer.json", {"layer": i, "variants": metrics})
        for t in self.trainees:  # only now: a kill before layer.json resumes from these
            t.resume_file.unlink(missing_ok=True)
        self.trainees, self.parent_block, self.h = [], None, None


# ---------------------------------------------------------------------------- the stage
def _data(data: DataSplit | torch.Tensor, cfg: BLDConfig) -> tuple[torch.Tensor, dict]:
    if isinstance(data, DataSplit):
        if data.name in ("selection", "reporting"):
            raise TesseraError(f"BLD trains on the calibration split, not {data.name} (which scores and reports); "
                               "load the calibration split")
        chunks, record = data.chunks, data.record()
    else:
        chunks, record = data, {"split": "in-memory", "chunks": len(data), "seq_len": int(data.shape[1]),
                                "tokens": int(data.numel()), "sha256": sha256_ids(data)}
    if chunks.ndim != 2 or len(chunks) == 0:
        raise TesseraError("BLD needs token chunks (N, seq_len) with N >= 1; give more calibration text")
    seq_len = chunks.shape[1]
    n = max(1, min(len(chunks), cfg.tokens // seq_len))
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    used = chunks[perm]
    record = {**record, "used_chunks": n, "used_tokens": int(used.numel()), "used_sha256": sha256_ids(used)}
    return used, record


def _run_header(library: Library, cfg: BLDConfig, data_record: dict) -> dict:
    return {"format": BLD_FORMAT, "version": BLD_VERSION, "parent_fingerprint": library.parent_fingerprint,
            "config": asdict(cfg), "data": data_record}


def _check_resume(saved: dict, now: dict) -> list[str]:
    diffs = []
    if saved.get("parent_fingerprint") != now["parent_fingerprint"]:
        diffs.append("parent")
    for k, v in now["config"].items():
        if k not in BLDConfig.RESUMABLE_CHANGES and json.loads(json.dumps(saved.get("config", {}).get(k))) != \
                json.loads(json.dumps(v)):
            diffs.append(f"config.{k}")
    if saved.get("data", {}).get("used_sha256") != now["data"]["used_sha256"]:
        diffs.append("data")
    return diffs


def run_bld(library: Library, parent: Transformer, data: DataSplit | torch.Tensor, cfg: BLDConfig, *,
            layers: Sequence[int] | None = None, force: bool = False, progress: bool = True, budget=None,
            on_step: Callable[[int, int], None] | None = None) -> BLDReport:
    """Train every variant of `layers` (default: all) of `library` on `data` (the calibration split); see the module
    doc. Under torchrun each rank trains the pending layers r::world and rank 0 writes the report. A directory left
    by a killed run is resumed if its config and data match (else: one line naming what differs; `force` restarts).
    `on_step(layer, batch)` is called after each training step (tests interrupt a run with it)."""
    from tessera.devices import init_distributed
    from tessera.stream import Budget, run_layers

    library.check_parent(parent)
    chunks, record = _data(data, cfg)
    steps = math.ceil(len(chunks) / cfg.batch)
    rank, world = init_distributed(parent.device)
    root = bld_dir(library)
    header = _run_header(library, cfg, record)
    problem = None
    if rank == 0:
        run_file = root / "run.json"
        if force and root.exists():
            shutil.rmtree(root)
        diffs = _check_resume(json.loads(run_file.read_text()), header) if run_file.is_file() else []
        if diffs:
            problem = (f"{root}: a BLD run with a different {', '.join(diffs)} is here; rerun with the same settings "
                       "to resume it, or pass --force to restart")
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_file, header)
    problem = _from_rank0(problem, world)  # every rank stops with rank 0's refusal, none waits for it forever
    if problem:
        raise TesseraError(problem)
    wanted = list(range(library.arch.num_layers)) if layers is None else sorted(set(layers))
    for i in wanted:
        if not 0 <= i < library.arch.num_layers:
            raise TesseraError(f"layer {i} is outside the {library.arch.num_layers}-layer parent")
    pending = [i for i in wanted if trainable(library, i) and not (_layer_dir(library, i) / "layer.json").is_file()]
    mine = pending[rank::world]
    t0 = time.perf_counter()
    trainer = None
    if mine:
        bar = None
        if progress and rank == 0:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar_obj = Progress(TextColumn("BLD {task.fields[layer]}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("tokens, {task.fields[rate]}"), TimeRemainingColumn(), transient=True)
            bar_obj.start()
            bar = (bar_obj, bar_obj.add_task("bld", total=len(mine) * int(chunks.numel()), layer="", rate=""))
        trainer = _Trainer(library, parent, cfg, mine, steps, chunks, on_step, bar)
        try:
            run_layers(parent, chunks, batch_size=cfg.batch, observer=trainer, budget=budget or Budget(),
                       until=max(mine) + 1).close()
        finally:
            if bar is not None:
                bar[0].stop()
    _barrier(world)
    report = _collect(library, header, wanted)
    report.seconds = time.perf_counter() - t0
    if trainer is not None:
        report.tokens_per_s = trainer.tokens / max(1e-9, report.seconds)
        report.variant_tokens_per_s = trainer.variant_tokens / max(1e-9, report.seconds)
    everything = range(library.arch.num_layers)
    if rank == 0 and all((_layer_dir(library, i) / "layer.json").is_file() for i in everything
                         if trainable(library, i)):
        full = _collect(library, header, everything)
        full.seconds, full.tokens_per_s, full.variant_tokens_per_s = (report.seconds, report.tokens_per_s,
                                                                      report.variant_tokens_per_s)
        atomic_write_json(root / "bld.json", full.to_json())
    return report


def _from_rank0(value, world: int):
    """`value` as rank 0 has it (and a barrier); itself in a single process."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _collect(library: Library, header: dict, layers: Sequence[int]) -> BLDReport:
    report = BLDReport(bld_dir(library), header["config"], header["data"])
    for i in layers:
        file = _layer_dir(library, i) / "layer.json"
        if file.is_file():
            for key, m in json.loads(file.read_text())["variants"].items():
                report.variants[(i, key)] = m
    return report


# ---------------------------------------------------------------------------- measuring
@torch.no_grad()
def normalised_mse(library: Library, parent: Transformer, chunks: torch.Tensor, *, trained: bool = True,
                   layers: Sequence[int] | None = None, batch_size: int = 8) -> dict[tuple[int, str], float]:
    """nMSE of each weighted native variant of `layers` on `chunks` (parent inputs, as in training), with its
    trained weights (`trained=True`, falling back to the initialisation where BLD has not trained it) or at
    initialisation: the measure BLD lowers, for tests and reports."""
    from tessera.stream import run_layers

    wanted = set(range(library.arch.num_layers) if layers is None else layers)
    sums: dict[tuple[int, str], list[float]] = {}

    class Measure(Observer):
        def attach(self, i, block):
            self.blocks = {}
            if i not in wanted:
                return []
            dtype = torch.float32
            for v in library.variants(i):
                if v.precision == "native" and v.has_weights:
                    state = (variant_state(library, parent, i, v, dtype=dtype) if trained else
                             {k: t.float() for k, t in init_variant(parent, i, v, library.stats).items()})
                    self.blocks[v] = variant_block(library.arch, v, state).to(parent.device)
            self.parent_block = Block(library.arch, library.arch.blocks[i]).to(parent.device)
            self.parent_block.load_state_dict({k: t.float() for k, t in block.state_dict().items()})
            return []

        def after_batch(self, i, b, x, y):
            if not self.blocks:
                return
            x32, y32 = x.float(), y.float()
            cos, sin = rope_for(parent, x.shape[0], x.shape[1], torch.float32)
            norm = (y32 - x32).pow(2).mean().clamp_min(1e-30)
            for v, m in self.blocks.items():
                out = (attention_then_parent_ffn(m, self.parent_block, x32, cos, sin) if v.part == "attention"
                       else parent_attention_then_ffn(self.parent_block, m, x32, cos, sin))
                s = sums.setdefault((i, v.key), [0.0, 0])
                s[0] += float((out - y32).pow(2).mean() / norm) * x.shape[0]
                s[1] += x.shape[0]

    until = max(wanted) + 1 if wanted else 0
    run_layers(parent, chunks, batch_size=batch_size, observer=Measure(), until=until).close()
    return {k: s / n for k, (s, n) in sums.items()}
