"""Structured pruning: take a model and importance scores, return a new, smaller model (config and weights together).

Axes, applied in this order: whole layers (depth), query heads (ranked within their KV group, the same count in
every layer), KV heads (groups merged by mean-pooling their K/V projections, the GQA conversion), MLP neurons
(per-layer widths allowed) and embedding channels (every matrix that reads or writes the residual stream, every
norm, the embedding and the output head). Kept indices stay in their original order.
`search_target` picks a width/depth split for a parameter budget by held-out KLD to the parent.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.checkpoint import from_state_dict
from tessera.errors import TesseraError
from tessera.importance import Importance
from tessera.model import Transformer


@dataclass(frozen=True)
class PruneTarget:
    hidden: int | None = None  # embedding channels to keep
    ffn: int | tuple[int, ...] | None = None  # MLP width, one for all layers or one per (kept) layer
    heads: int | None = None  # query heads to keep (per layer)
    kv_heads: int | None = None  # KV heads per layer
    drop_layers: tuple[int, ...] = ()  # explicit layer indices to drop
    layers: int | None = None  # or: keep this many layers, dropping the least important
    layer_metric: str = "bi"  # a key of LAYER_METRICS
    head_metric: str = "norm"  # head ranking: "norm" (Minitron's output norm) or "drop_kl" (KL when zeroed)


# layer ranking metric -> Importance field (low score = dropped first)
LAYER_METRICS = {"bi": "block_importance", "drop_loss": "drop_loss", "drop_kl": "drop_kl"}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores.float(), k).indices.sort().values


def layers_to_drop(model: Transformer, imp: Importance, target: PruneTarget) -> list[int]:
    n = model.arch.num_layers
    drop = set(target.drop_layers)
    if any(not 0 <= i < n for i in drop):
        raise TesseraError(f"--drop-layers names layers outside 0..{n - 1}")
    if target.layers is not None:
        if not 1 <= target.layers <= n:
            raise TesseraError(f"--layers {target.layers} must be between 1 and the parent's {n} layers")
        if target.layer_metric not in LAYER_METRICS:
            raise TesseraError(f"--layer-metric {target.layer_metric!r}: use one of {', '.join(LAYER_METRICS)}")
        scores = getattr(imp, LAYER_METRICS[target.layer_metric])
        if scores is None:
            raise TesseraError(f"importance has no {target.layer_metric} scores; recompute with layer scores")
        order = [i for i in torch.argsort(scores.float()).tolist() if i not in drop]
        drop |= set(order[: n - target.layers - len(drop)])
    if len(drop) >= n:
        raise TesseraError("the target drops every layer; keep at least one")
    return sorted(drop)


def prune(model: Transformer, imp: Importance, target: PruneTarget) -> Transformer:
    """A new pruned model; `model` is not modified."""
    arch = model.arch
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blocks = list(arch.blocks)
    # --- depth
    drop = layers_to_drop(model, imp, target)
    keep_layers = [i for i in range(arch.num_layers) if i not in drop]
    state = _renumber_layers(state, keep_layers)
    blocks = [blocks[i] for i in keep_layers]
    layer_imp = {new: old for new, old in enumerate(keep_layers)}
    n_heads = arch.num_attention_heads
    d = arch.head_dim
    # --- query heads
    if target.heads is not None and target.heads != n_heads:
        if not 1 <= target.heads <= n_heads:
            raise TesseraError(f"--heads {target.heads} must be between 1 and the parent's {n_heads}; "
                               "a target that leaves no heads is not a model")
        for j, b in enumerate(blocks):
            if b.attention.kind != "gqa":
                continue
            kv = b.attention.num_kv_heads
            if target.heads % kv:
                raise TesseraError(f"--heads {target.heads} is not a multiple of layer {j}'s {kv} KV heads; "
                                   f"choose a multiple of {kv}")
            per_group, scores = target.heads // kv, imp.head_scores(target.head_metric)[layer_imp[j]].view(kv, -1)
            keep = torch.cat([g * (n_heads // kv) + _top(scores[g], per_group) for g in range(kv)])
            rows = (keep[:, None] * d + torch.arange(d)).flatten()
            p = f"model.layers.{j}.self_attn."
            state[p + "q_proj.weight"] = state[p + "q_proj.weight"][rows]
            state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, rows]
        n_heads = target.heads
    # --- KV heads (merge groups: mean-pool K and V of consecutive groups)
    if target.kv_heads is not None:
        if not 1 <= target.kv_heads <= n_heads or n_heads % target.kv_heads:
            raise TesseraError(f"--kv-heads {target.kv_heads} must divide the {n_heads} attention heads")
        for j, b in enumerate(blocks):
            if b.attention.kind != "gqa" or b.attention.num_kv_heads == target.kv_heads:
                continue
            kv = b.attention.num_kv_heads
            if kv % target.kv_heads:
                raise TesseraError(f"--kv-heads {target.kv_heads} does not divide layer {j}'s {kv} KV heads; "
                                   "tessera merges whole groups")
            for name in ("k_proj", "v_proj"):
                key = f"model.layers.{j}.self_attn.{name}.weight"
                w = state[key].view(target.kv_heads, kv // target.kv_heads, d, -1)
                state[key] = w.mean(1).reshape(target.kv_heads * d, -1)
            blocks[j] = BlockSpec(AttentionSpec("gqa", target.kv_heads), b.ffn)
    # --- MLP neurons
    if target.ffn is not None:
        widths = [target.ffn] * len(blocks) if isinstance(target.ffn, int) else list(target.ffn)
        if len(widths) != len(blocks):
            raise TesseraError(f"--ffn gives {len(widths)} widths for {len(blocks)} layers; give one or one per layer")
        for j, (b, w) in enumerate(zip(blocks, widths)):
            if b.ffn.kind != "swiglu":
                continue
            if not 1 <= w <= b.ffn.intermediate_size:
                raise TesseraError(f"--ffn {w} for layer {j} must be between 1 and its width {b.ffn.intermediate_size}; "
                                   "pruning cannot grow a model")
            keep = _top(imp.neurons[layer_imp[j]], w)
            p = f"model.layers.{j}.mlp."
            state[p + "gate_proj.weight"] = state[p + "gate_proj.weight"][keep]
            state[p + "up_proj.weight"] = state[p + "up_proj.weight"][keep]
            state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, keep]
            blocks[j] = BlockSpec(b.attention, FFNSpec("swiglu", w))
    # --- embedding channels
    hidden = arch.hidden_size
    if target.hidden is not None and target.hidden != hidden:
        if not 1 <= target.hidden <= hidden:
            raise TesseraError(f"--hidden {target.hidden} must be between 1 and the parent's {hidden}")
        state = _slice_hidden(state, _top(imp.channels, target.hidden))
        hidden = target.hidden
    new_arch = replace(arch, hidden_size=hidden, num_attention_heads=n_heads, head_dim=d, blocks=tuple(blocks))
    pruned = from_state_dict(new_arch, state, source="pruned model")
    pruned.tokenizer = model.tokenizer
    pruned.provenance = [*getattr(model, "provenance", []),
                         {"stage": "prune", "target": _jsonable(asdict(target)), "dropped_layers": drop,
                          "importance": imp.meta, "params": new_arch.num_params()}]
    return pruned.eval()


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _renumber_layers(state: dict, keep: list[int]) -> dict:
    out = {}
    index = {old: new for new, old in enumerate(keep)}
    for k, v in state.items():
        if k.startswith("model.layers."):
            old = int(k.split(".")[2])
            if old in index:
                out[k.replace(f"model.layers.{old}.", f"model.layers.{index[old]}.", 1)] = v
        else:
            out[k] = v
    return out


def _slice_hidden(state: dict, idx: torch.Tensor) -> dict:
    reads = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # (out, hidden): slice columns
    writes = ("o_proj", "down_proj")  # (hidden, in): slice rows
    out = {}
    for k, v in state.items():
        name = k.rsplit(".", 2)[-2] if k.endswith(".weight") else ""
        if k in ("model.embed_tokens.weight", "lm_head.weight") or name in reads:
            out[k] = v[:, idx]
        elif name in writes:
            out[k] = v[idx]
        elif name in ("linear_attn", "linear_mlp"):
            out[k] = v[idx][:, idx]
        elif "norm" in name or k == "model.norm.weight":
            out[k] = v[idx]
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------- parameter-budget search
def search_target(model: Transformer, imp: Importance, fraction: float, chunks: torch.Tensor, *,
                  multiple: int = 32, max_candidates: int = 12) -> tuple[PruneTarget, list[dict]]:
    """The width/depth split with the lowest held-out KLD to the parent among candidates at `fraction` of the
    parent's non-embedding parameters (depth: layers dropped by BI; width: MLP and embedding channels)."""
    from tessera.evaluate import mean_kld, parent_logits_for

    arch = model.arch
    if not 0 < fraction < 1:
        raise TesseraError(f"--target-params {fraction} must be a fraction between 0 and 1 of the parent's "
                           "non-embedding parameters; a target larger than the parent is not a pruning")
    budget = fraction * arch.non_embedding_params()
    candidates = []
    h = arch.hidden_size
    for hidden in sorted({h, _round(h * 0.875, multiple), _round(h * 0.75, multiple)}, reverse=True):
        depth_step = max(1, arch.num_layers // 8)
        for n_layers in sorted({arch.num_layers - k for k in range(0, arch.num_layers // 2 + 1, depth_step)}, reverse=True):
            t = _fit_ffn(model, imp, PruneTarget(hidden=hidden, layers=n_layers), budget, multiple)
            if t is not None:
                candidates.append(t)
    if not candidates:
        raise TesseraError(f"no width/depth split reaches {fraction:.0%} of the non-embedding parameters")
    candidates = candidates[:max_candidates]
    ref = parent_logits_for(model, chunks)
    report = []
    for t in candidates:
        child = prune(model, imp, t)
        r = mean_kld(model, child, chunks, parent_logits=ref)
        report.append({"target": _jsonable(asdict(t)), "params": child.arch.non_embedding_params(), "kld": r.kld})
    best = min(range(len(report)), key=lambda i: report[i]["kld"])
    return candidates[best], report


def _round(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def _fit_ffn(model: Transformer, imp: Importance, base: PruneTarget, budget: float, multiple: int) -> PruneTarget | None:
    """The uniform MLP width that brings `base` (hidden, layers) to the budget, or None if none does."""
    arch = model.arch
    drop = layers_to_drop(model, imp, base)
    kept = [b for i, b in enumerate(arch.blocks) if i not in drop]
    hid = base.hidden or arch.hidden_size
    probe = ArchSpec.with_blocks(replace(arch, hidden_size=hid), kept)
    fixed = sum(probe.attention_params(i) + hid for i in range(probe.num_layers))  # attention + FFN norm
    per_neuron = 3 * hid * probe.num_layers
    width = _round((budget - fixed) / per_neuron, multiple)
    if width < multiple or width > arch.blocks[0].ffn.intermediate_size:
        return None
    return replace(base, ffn=width)


def shortgpt(model: Transformer, imp: Importance, n_layers: int) -> Transformer:
    """ShortGPT baseline: drop the layers with the lowest Block Importance."""
    return prune(model, imp, PruneTarget(layers=n_layers, layer_metric="bi"))


def clone(model: Transformer) -> Transformer:
    """A deep copy (tokenizer shared, not copied)."""
    tok, model.tokenizer = model.tokenizer, None
    try:
        twin = copy.deepcopy(model)
    finally:
        model.tokenizer = tok
    twin.tokenizer = tok
    return twin
