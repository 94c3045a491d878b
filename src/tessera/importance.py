"""Activation-based importance (Minitron) from forward passes on calibration text.

Per layer, hooks record:
* attention heads: the norm of each head's output (the o_proj input slice of that head);
* MLP neurons: |activation| of each intermediate neuron (the down_proj input);
* embedding channels: |value| of each channel at every layernorm output, summed over the layernorms of each sample
  (so the scores do not depend on the batch size);
* layers: Block Importance BI = 1 - cos(block input, block output), averaged over tokens.
Each score is reduced over the sequence, then over the batch; the default (Minitron's best) is the L2 norm
over the batch of the mean over the sequence. `drop_layer_scores` adds the LM-loss increase and the KL to the
full model when one layer is skipped, and `drop_head_scores` the KL when one attention head's output is zeroed
(one forward pass per head: slower, but it measures what pruning does; on SmolLM2 the output norm ranks the
most damaging heads of layers 0-1 last in their groups, see docs/results.md). Scores are plain tensors, saved
with safetensors, so one pass serves many pruning targets.

Scores are tied to the model they were computed on (`meta["fingerprint"]`, `tessera.fingerprint`) and record the
data split they came from (`meta["data"]`); `Importance.check(model)` refuses to apply them to any other model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tessera.checkpoint import fingerprint
from tessera.data import DataSplit
from tessera.errors import TesseraError
from tessera.io import atomic_path
from tessera.model import Attention, LinearAttention, LinearMLP, SwiGLU, Transformer

DROP_SAMPLES = 4  # calibration chunks the drop-one-layer / drop-one-head scores use (one forward per layer or head)
HEAD_METRICS = ("norm", "drop_kl")

REDUCERS = {
    "mean": lambda x, dim: x.mean(dim),
    "l2": lambda x, dim: x.pow(2).sum(dim).sqrt(),
    "max": lambda x, dim: x.amax(dim),
}


@dataclass
class Importance:
    heads: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n_heads,) output norm
    head_drop_kl: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n_heads,) KL when zeroed
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (intermediate,)
    channels: torch.Tensor | None = None  # (hidden,)
    block_importance: torch.Tensor | None = None  # (layers,) 1 - cos
    drop_loss: torch.Tensor | None = None  # (layers,) LM-loss increase when the layer is skipped
    drop_kl: torch.Tensor | None = None  # (layers,) KL(full model || model without the layer), per token
    meta: dict = field(default_factory=dict)

    def head_scores(self, metric: str = "norm") -> dict[int, torch.Tensor]:
        if metric == "norm":
            return self.heads
        if metric == "drop_kl":
            if not self.head_drop_kl:
                raise TesseraError("importance has no per-head drop_kl scores; recompute with "
                                   "`tessera importance --head-drop-kl` (or prune without --scores)")
            return self.head_drop_kl
        raise TesseraError(f"--head-metric {metric!r}: use norm or drop_kl")

    def kv_groups(self, layer: int, n_kv: int, metric: str = "norm") -> torch.Tensor:
        """A KV group's importance: the sum of its query heads' scores (`metric` as in `head_scores`). Used to
        choose which KV groups merge and to weight the merge (`tessera.prune.merge_kv_heads`)."""
        return self.head_scores(metric)[layer].view(n_kv, -1).sum(-1)

    def check(self, model: Transformer, fp: str | None = None) -> None:
        """Refuse, with one line, to apply these scores to a model other than the one they were computed on."""
        mine = self.meta.get("fingerprint")
        if mine is None:
            raise TesseraError("importance scores carry no model fingerprint (made by an older tessera); recompute "
                               "them with `tessera importance`")
        theirs = fp or fingerprint(model)
        if mine != theirs:
            raise TesseraError(f"importance scores were computed on model {mine}, not on this model ({theirs}); "
                               "recompute them on this model with `tessera importance`")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {f"{kind}.{i}": t.contiguous() for kind in ("heads", "head_drop_kl", "neurons")
                   for i, t in getattr(self, kind).items()}
        for name in ("channels", "block_importance", "drop_loss", "drop_kl"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps(self.meta, sort_keys=True)})
        return path

    @staticmethod
    def load(path: str | Path) -> Importance:
        path = Path(path)
        if not path.is_file():
            raise TesseraError(f"{path}: no importance file; compute one with `tessera importance`")
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        imp = Importance(meta=meta)
        for key, t in tensors.items():
            kind, _, idx = key.partition(".")
            if kind in ("heads", "head_drop_kl", "neurons"):
                getattr(imp, kind)[int(idx)] = t
            else:
                setattr(imp, kind, t)
        return imp


def _chunks(data: torch.Tensor | DataSplit) -> tuple[torch.Tensor, dict | None]:
    return (data.chunks, data.record()) if isinstance(data, DataSplit) else (data, None)


class _Statistics:
    """The forward statistics of `activation_importance`, gathered by hooks while `run_layers` runs each layer over
    every batch (`tessera.stream.Observer`): the same numbers for a model loaded whole and one streamed from disk."""

    def __init__(self, model: Transformer, n_batches: int, seq_agg: str):
        self.seq_reduce = REDUCERS[seq_agg]
        self.per_sample: dict[str, list[torch.Tensor]] = defaultdict(list)  # name -> (B, dim) per batch
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(n_batches)]  # batch -> (B, hidden) per layernorm
        self.bi_sum = torch.zeros(model.arch.num_layers, dtype=torch.float64)
        self.batch = 0

    # tessera.stream.Observer
    def attach(self, i: int, block) -> list:
        reduce, hooks = self.seq_reduce, []
        if isinstance(block.self_attn, Attention):
            att = block.self_attn

            def head_hook(_m, args):
                x = args[0].float()  # (B, T, H*D)
                per_head = x.view(*x.shape[:2], att.n_heads, att.head_dim).norm(dim=-1)  # (B, T, H)
                self.per_sample[f"heads.{i}"].append(reduce(per_head, 1))

            hooks.append(att.o_proj.register_forward_pre_hook(head_hook))
        if isinstance(block.mlp, SwiGLU):
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(
                lambda _m, args: self.per_sample[f"neurons.{i}"].append(reduce(args[0].float().abs(), 1))))
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            if norm is not None:
                hooks.append(norm.register_forward_hook(
                    lambda _m, _a, out: self.norms[self.batch].append(reduce(out.float().abs(), 1))))
        return hooks

    def before_batch(self, i: int, b: int) -> None:
        self.batch = b

    def after_batch(self, i: int, b: int, x: torch.Tensor, y: torch.Tensor) -> None:
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
        self.bi_sum[i] += (1 - cos).double().sum().cpu()

    def channels(self) -> list[torch.Tensor]:
        """(B, hidden) per batch: each sample's layernorm outputs summed over every layernorm of the model."""
        return [torch.stack(parts).sum(0) for parts in self.norms if parts]


def _drop_branches(model: Transformer, layers: bool, heads: bool, rows: int) -> list:
    """Branches of `run_layers` that skip one layer (`layer.i`) or zero one attention head (`head.i.h`)."""
    from tessera.stream import Branch

    out = []
    if layers:
        out += [Branch(f"layer.{i}", i, lambda _block, x, _cos, _sin: x, rows) for i in range(model.arch.num_layers)]
    if heads:
        for i, spec in enumerate(model.arch.blocks):
            if spec.attention.kind == "gqa":
                out += [Branch(f"head.{i}.{h}", i, _zero_head(model.arch.head_dim, h), rows)
                        for h in range(model.arch.num_attention_heads)]
    return out


def _zero_head(head_dim: int, head: int):
    cols = slice(head * head_dim, (head + 1) * head_dim)

    def run(block, x, cos, sin):
        def zero(_m, args):
            z = args[0].clone()
            z[..., cols] = 0
            return (z,)

        hook = block.self_attn.o_proj.register_forward_pre_hook(zero)
        try:
            return block(x, cos, sin, None, None, 0)
        finally:
            hook.remove()

    return run


def _branch_losses(forward, chunks: torch.Tensor, names: list[str], rows: int
                   ) -> tuple[float, dict[str, tuple[float, float]]]:
    """Mean next-token loss of the main stream on the first `rows` chunks, and (loss, KL to the main stream) of
    each branch, batch by batch (logits of one batch exist at a time)."""
    base, totals, count = 0.0, {n: [0.0, 0.0] for n in names}, 0
    for b, s in enumerate(forward.batches):
        r = min(s.stop, rows) - s.start
        if r <= 0:
            break
        ids = chunks[s][:r].to(forward.model.device)
        targets = ids[:, 1:].flatten()
        ref = torch.log_softmax(forward.logits(b)[:r, :-1].float(), -1)
        base += F.nll_loss(ref.flatten(0, 1), targets, reduction="sum").item()
        for n in names:
            logp = torch.log_softmax(forward.logits(b, n)[:, :-1].float(), -1)
            totals[n][0] += F.nll_loss(logp.flatten(0, 1), targets, reduction="sum").item()
            totals[n][1] += (ref.exp() * (ref - logp)).sum().item()
        count += targets.numel()
    return base / count, {n: (loss / count, kl / count) for n, (loss, kl) in totals.items()}


def _forward_scores(model: Transformer, chunks: torch.Tensor, *, batch_size: int, stats: _Statistics | None,
                    drop_layers: bool, drop_heads: bool, drop_samples: int, budget=None, progress=None):
    """One layer-by-layer pass (`tessera.stream.run_layers`: each layer read once, streamed or not) that gathers
    the forward statistics and the drop-one-layer / drop-one-head branches together."""
    from tessera.stream import run_layers

    rows = min(len(chunks), drop_samples)
    branches = _drop_branches(model, drop_layers, drop_heads, rows)
    forward = run_layers(model, chunks, batch_size=batch_size, observer=stats, branches=branches, budget=budget,
                         progress=progress)
    try:
        if not branches:
            return None, None, {}
        base, scores = _branch_losses(forward, chunks, [br.name for br in branches], rows)
    finally:
        forward.close()
    n = model.arch.num_layers
    drop = None
    if drop_layers:
        drop = (torch.tensor([scores[f"layer.{i}"][0] - base for i in range(n)]),
                torch.tensor([scores[f"layer.{i}"][1] for i in range(n)]))
    heads = {}
    if drop_heads:
        for i, spec in enumerate(model.arch.blocks):
            if spec.attention.kind == "gqa":
                heads[i] = torch.tensor([scores[f"head.{i}.{h}"][1] for h in range(model.arch.num_attention_heads)])
    return drop, heads, scores


@torch.inference_mode()
def activation_importance(model: Transformer, data: torch.Tensor | DataSplit, *, batch_size: int = 8,
                          seq_agg: str = "mean", batch_agg: str = "l2", with_drop_loss: bool = False,
                          with_head_drop: bool = False, drop_samples: int = DROP_SAMPLES, budget=None,
                          progress=None) -> Importance:
    """Minitron importance of heads, neurons, embedding channels and layers from calibration token chunks (N, L)
    (a `DataSplit`, whose record is kept in `meta["data"]`, or a tensor). The drop-one-layer and drop-one-head
    scores use the first `drop_samples` chunks.

    Everything comes from one layer-by-layer pass (`tessera.stream.run_layers`): each layer is read once, every
    batch goes through it with the statistics hooks attached, and each drop score is a branch that leaves the main
    stream at its layer. A model streamed from its shards (`tessera.stream.open_streamed`) therefore needs memory
    for one layer plus the activations (`budget`: in RAM or spilled), and gives the scores of the model loaded
    whole, bit for bit."""
    chunks, record = _chunks(data)
    if seq_agg not in REDUCERS or batch_agg not in REDUCERS:
        raise TesseraError(f"aggregation must be one of {', '.join(REDUCERS)}")
    if len(chunks) == 0:
        raise TesseraError("no calibration data: give a longer text or a smaller --seq-len")
    if drop_samples < 1:
        raise TesseraError(f"--drop-samples must be >= 1, got {drop_samples}")
    n_batches = (len(chunks) + batch_size - 1) // batch_size
    stats = _Statistics(model, n_batches, seq_agg)
    drop, head_kl, _ = _forward_scores(model, chunks, batch_size=batch_size, stats=stats, drop_layers=with_drop_loss,
                                       drop_heads=with_head_drop, drop_samples=drop_samples, budget=budget,
                                       progress=progress)
    batch_reduce = REDUCERS[batch_agg]
    imp = Importance(meta={"seq_agg": seq_agg, "batch_agg": batch_agg, "samples": len(chunks),
                           "seq_len": chunks.shape[1], "method": "activation", "fingerprint": fingerprint(model)})
    if record is not None:
        imp.meta["data"] = record
    channels = stats.channels()
    if channels:
        imp.channels = batch_reduce(torch.cat(channels).cpu(), 0)
    for name, parts in stats.per_sample.items():
        kind, idx = name.split(".")
        getattr(imp, kind)[int(idx)] = batch_reduce(torch.cat(parts).cpu(), 0)  # (N, dim) -> (dim,)
    imp.block_importance = (stats.bi_sum / chunks.numel()).float()
    if with_drop_loss or with_head_drop:
        imp.meta["drop_samples"] = min(len(chunks), drop_samples)
    if with_drop_loss:
        imp.drop_loss, imp.drop_kl = drop
    if with_head_drop:
        imp.head_drop_kl = head_kl
    return imp


@torch.inference_mode()
def lm_loss(model: Transformer, chunks: torch.Tensor, batch_size: int = 8,
            reference: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """Mean next-token cross-entropy and, given the full model's log-probs `reference` (one tensor per batch),
    the mean per-token KL(reference || model)."""
    total, kl, count = 0.0, 0.0, 0
    for b, start in enumerate(range(0, len(chunks), batch_size)):
        ids = chunks[start:start + batch_size].to(model.device)
        logp = torch.log_softmax(model(ids)[:, :-1].float(), -1)  # (B, T-1, V)
        total += F.nll_loss(logp.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        if reference is not None:
            ref = reference[b]
            kl += (ref.exp() * (ref - logp)).sum().item()
        count += ids[:, 1:].numel()
    return total / count, kl / count


class _Identity(torch.nn.Module):
    def forward(self, x, *_args):
        return x


@contextmanager
def ablated(model: Transformer, layer: int, head: int | None = None):
    """Within the block, `layer` is skipped (head None) or its attention head `head` contributes nothing (what the
    drop scores measure; a check for them and for branches of `tessera.stream.run_layers`)."""
    if head is None:
        layers = model.model.layers
        saved = layers[layer]
        layers[layer] = _Identity()
        try:
            yield
        finally:
            layers[layer] = saved
        return
    att = model.model.layers[layer].self_attn
    cols = slice(head * att.head_dim, (head + 1) * att.head_dim)

    def zero_head(_m, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x,)

    hook = att.o_proj.register_forward_pre_hook(zero_head)
    try:
        yield
    finally:
        hook.remove()


@torch.inference_mode()
def drop_layer_scores(model: Transformer, chunks: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the LM-loss increase and the KL to the full model when that layer alone is skipped
    (higher = more important). One layer-by-layer pass with a branch per layer."""
    drop, _, _ = _forward_scores(model, chunks, batch_size=batch_size, stats=None, drop_layers=True,
                                 drop_heads=False, drop_samples=len(chunks))
    return drop


@torch.inference_mode()
def drop_head_scores(model: Transformer, chunks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per attention layer, the KL to the full model when each query head's output alone is zeroed. One
    layer-by-layer pass with a branch per head."""
    _, heads, _ = _forward_scores(model, chunks, batch_size=batch_size, stats=None, drop_layers=False,
                                  drop_heads=True, drop_samples=len(chunks))
    return heads


def magnitude_importance(model: Transformer) -> Importance:
    """Baseline: weight norms instead of activations (no data needed). Heads: the norm of each head's o_proj
    columns; neurons: the product of their gate, up and down norms; channels: norm gains plus embedding column
    norms; layers: the Frobenius norms of the block's output projections (o_proj / linear_attn plus down_proj /
    linear_mlp), i.e. how much the block can write into the residual stream."""
    imp = Importance(meta={"method": "magnitude", "fingerprint": fingerprint(model),
                           "layer_score": "output projection norms"})
    channels = torch.zeros(model.arch.hidden_size)
    layer_scores = []
    for i, block in enumerate(model.model.layers):
        writes = 0.0
        if isinstance(block.self_attn, Attention):
            att = block.self_attn
            o = att.o_proj.weight.detach().float().cpu().view(-1, att.n_heads, att.head_dim)  # (h, H, D)
            imp.heads[i] = o.norm(dim=(0, 2))
            writes += float(att.o_proj.weight.detach().float().norm())
        elif isinstance(block.self_attn, LinearAttention):
            writes += float(block.self_attn.linear_attn.weight.detach().float().norm())
        if isinstance(block.mlp, SwiGLU):
            mlp = block.mlp
            imp.neurons[i] = (mlp.gate_proj.weight.detach().float().norm(dim=1)
                              * mlp.up_proj.weight.detach().float().norm(dim=1)
                              * mlp.down_proj.weight.detach().float().norm(dim=0)).cpu()
            writes += float(mlp.down_proj.weight.detach().float().norm())
        elif isinstance(block.mlp, LinearMLP):
            writes += float(block.mlp.linear_mlp.weight.detach().float().norm())
        layer_scores.append(writes)
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            if norm is not None:
                channels += norm.weight.detach().float().abs().cpu()
    imp.channels = channels + model.model.embed_tokens.weight.detach().float().norm(dim=0).cpu()
    imp.block_importance = torch.tensor(layer_scores)
    return imp


def random_importance(model: Transformer, seed: int = 0) -> Importance:
    """Baseline: random scores of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    imp = Importance(meta={"method": "random", "seed": seed, "fingerprint": fingerprint(model)})
    for i, block in enumerate(model.model.layers):
        if isinstance(block.self_attn, Attention):
            imp.heads[i] = torch.rand(block.self_attn.n_heads, generator=g)
        if isinstance(block.mlp, SwiGLU):
            imp.neurons[i] = torch.rand(block.mlp.gate_proj.out_features, generator=g)
    imp.channels = torch.rand(model.arch.hidden_size, generator=g)
    imp.block_importance = torch.rand(model.arch.num_layers, generator=g)
    return imp
