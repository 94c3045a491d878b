"""Structured pruning: take a model and importance scores, return a new, smaller model (config and weights together).

`prune` runs named steps on a working copy of the parent's tensors, in this order:

1. `drop_layers`   whole layers (depth), by a layer score or an explicit list;
2. `prune_heads`   query heads, ranked within their KV group, the same count in every layer;
3. `merge_kv`      KV heads: groups merged into fewer, chosen and weighted by KV-group importance (the GQA
                   conversion; `merge_kv_heads` is the reusable core, also for Puzzle's KV-head variants);
4. `prune_ffn`     MLP neurons (per-layer widths allowed);
5. `prune_hidden`  embedding channels (every matrix that reads or writes the residual stream, every norm, the
                   embedding and the output head).

Kept indices stay in their original order. Scores are checked against the model's fingerprint first.
`search_target` picks a width/depth split for a parameter budget by KLD to the parent on the *selection* split.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.checkpoint import from_state_dict
from tessera.data import DataSplit
from tessera.errors import TesseraError
from tessera.importance import HEAD_METRICS, Importance
from tessera.model import Transformer

MAX_CANDIDATES = 24  # width/depth splits `search_target` measures (more are listed as not tried)


@dataclass(frozen=True)
class PruneTarget:
    hidden: int | None = None  # embedding channels to keep
    ffn: int | tuple[int, ...] | None = None  # MLP width, one for all layers or one per (kept) layer
    heads: int | None = None  # query heads to keep (per layer)
    kv_heads: int | None = None  # KV heads per layer
    drop_layers: tuple[int, ...] = ()  # explicit layer indices to drop
    layers: int | None = None  # or: keep this many layers, dropping the least important
    layer_metric: str = "bi"  # a key of LAYER_METRICS
    head_metric: str = "norm"  # head and KV-group ranking: "norm" (Minitron's output norm) or "drop_kl"

    def describe(self) -> dict:
        """The set fields, JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v not in (None, ()) and not (k == "layer_metric" and self.layers is None)
                and not (k == "head_metric" and self.heads is None and self.kv_heads is None)}


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


# ---------------------------------------------------------------------------- KV-head merging
def kv_merge_plan(n_kv: int, target: int, group_scores: torch.Tensor | None = None) -> list[list[int]]:
    """Which of `n_kv` KV groups form each of `target` new ones.

    Without scores: consecutive groups (new group j = old groups j*r .. j*r+r-1, r = n_kv / target). With scores:
    the `target` most important groups anchor one new group each, and the others join them in rising importance,
    one per anchor in falling importance, so the strongest groups are merged with the weakest. New groups are
    ordered by their first old group, members by index.
    """
    if target < 1 or n_kv % target:
        raise TesseraError(f"{target} KV heads do not divide the {n_kv} KV heads; tessera merges whole groups")
    r = n_kv // target
    if group_scores is None or r == 1:
        return [list(range(j * r, (j + 1) * r)) for j in range(target)]
    order = torch.argsort(group_scores.float(), descending=True, stable=True).tolist()
    plan = [[a] for a in order[:target]]
    rest = order[target:][::-1]  # weakest first
    for k, g in enumerate(rest):
        plan[k % target].append(g)
    return sorted((sorted(p) for p in plan), key=lambda p: p[0])


def merge_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, *, n_heads: int,
                   head_dim: int, target: int, group_scores: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """New (q_proj, k_proj, v_proj, o_proj) weights with `target` KV heads.

    The K and V of each new group are the average of its old groups' K and V, weighted by `group_scores` (the
    KV-group importance; uniform without scores or when a group's scores are all zero), so a group that
    contributes nothing does not disturb the one it joins. The query heads of merged groups are reordered to
    sit together (q_proj rows and o_proj columns move together, which changes nothing by itself).
    """
    n_kv = k.shape[0] // head_dim
    per_group = n_heads // n_kv
    plan = kv_merge_plan(n_kv, target, group_scores)
    kw, vw = k.view(n_kv, head_dim, -1), v.view(n_kv, head_dim, -1)
    new_k, new_v, head_order = [], [], []
    for members in plan:
        w = torch.ones(len(members)) if group_scores is None else group_scores[members].float().cpu().clamp(min=0)
        w = (w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(members))).to(k.device, k.dtype)
        new_k.append(torch.einsum("g,gdh->dh", w, kw[members]))
        new_v.append(torch.einsum("g,gdh->dh", w, vw[members]))
        head_order += [g * per_group + h for g in members for h in range(per_group)]
    rows = (torch.tensor(head_order)[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return q[rows], torch.cat(new_k), torch.cat(new_v), o[:, rows]


# ---------------------------------------------------------------------------- the steps
@dataclass
class _Work:
    """The child being built: tensors, per-layer specs, and where each kept layer came from in the parent."""

    state: dict[str, torch.Tensor]
    blocks: list[BlockSpec]
    source_layer: list[int]  # child layer j is parent layer source_layer[j]
    n_heads: int
    head_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # child layer -> scores of its current heads
    dropped: list[int] = field(default_factory=list)


def drop_layers(work: _Work, model: Transformer, imp: Importance, target: PruneTarget) -> None:
    drop = layers_to_drop(model, imp, target)
    keep = [i for i in range(len(work.blocks)) if i not in drop]
    index = {old: new for new, old in enumerate(keep)}
    state = {}
    for k, v in work.state.items():
        if k.startswith("model.layers."):
            old = int(k.split(".")[2])
            if old in index:
                state[k.replace(f"model.layers.{old}.", f"model.layers.{index[old]}.", 1)] = v
        else:
            state[k] = v
    work.state, work.blocks, work.source_layer, work.dropped = state, [work.blocks[i] for i in keep], keep, drop


def _head_scores(work: _Work, imp: Importance, metric: str) -> None:
    scores = imp.head_scores(metric)
    work.head_scores = {j: scores[src].float() for j, src in enumerate(work.source_layer)
                        if work.blocks[j].attention.kind == "gqa"}


def prune_heads(work: _Work, target_heads: int, head_dim: int) -> None:
    n_heads = work.n_heads
    if target_heads == n_heads:
        return
    if not 1 <= target_heads <= n_heads:
        raise TesseraError(f"--heads {target_heads} must be between 1 and the parent's {n_heads}; "
                           "a target that leaves no heads is not a model")
    for j, b in enumerate(work.blocks):
        if b.attention.kind != "gqa":
            continue
        kv = b.attention.num_kv_heads
        if target_heads % kv:
            raise TesseraError(f"--heads {target_heads} is not a multiple of layer {j}'s {kv} KV heads; "
                               f"choose a multiple of {kv}")
        per_group, scores = target_heads // kv, work.head_scores[j].view(kv, -1)
        keep = torch.cat([g * (n_heads // kv) + _top(scores[g], per_group) for g in range(kv)])
        rows = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()
        p = f"model.layers.{j}.self_attn."
        if p + "q_proj.weight" in work.state:  # the layer's tensors are in this piece of the work
            work.state[p + "q_proj.weight"] = work.state[p + "q_proj.weight"][rows]
            work.state[p + "o_proj.weight"] = work.state[p + "o_proj.weight"][:, rows]
        work.head_scores[j] = work.head_scores[j][keep]
    work.n_heads = target_heads


def merge_kv(work: _Work, target_kv: int, head_dim: int) -> None:
    if not 1 <= target_kv <= work.n_heads or work.n_heads % target_kv:
        raise TesseraError(f"--kv-heads {target_kv} must divide the {work.n_heads} attention heads")
    for j, b in enumerate(work.blocks):
        if b.attention.kind != "gqa" or b.attention.num_kv_heads == target_kv:
            continue
        kv = b.attention.num_kv_heads
        if kv % target_kv:
            raise TesseraError(f"--kv-heads {target_kv} does not divide layer {j}'s {kv} KV heads; "
                               "tessera merges whole groups")
        p = f"model.layers.{j}.self_attn."
        names = [p + f"{n}_proj.weight" for n in "qkvo"]
        group_scores = work.head_scores[j].view(kv, -1).sum(-1)
        if names[0] in work.state:
            merged = merge_kv_heads(*(work.state[n] for n in names), n_heads=work.n_heads, head_dim=head_dim,
                                    target=target_kv, group_scores=group_scores)
            work.state.update(zip(names, merged))
        work.blocks[j] = BlockSpec(AttentionSpec("gqa", target_kv), b.ffn)


def prune_ffn(work: _Work, imp: Importance, ffn: int | tuple[int, ...]) -> None:
    widths = [ffn] * len(work.blocks) if isinstance(ffn, int) else list(ffn)
    if len(widths) != len(work.blocks):
        raise TesseraError(f"--ffn gives {len(widths)} widths for {len(work.blocks)} layers; give one or one per layer")
    for j, (b, w) in enumerate(zip(work.blocks, widths)):
        if b.ffn.kind != "swiglu":
            continue
        if not 1 <= w <= b.ffn.intermediate_size:
            raise TesseraError(f"--ffn {w} for layer {j} must be between 1 and its width {b.ffn.intermediate_size}; "
                               "pruning cannot grow a model")
        keep = _top(imp.neurons[work.source_layer[j]], w)
        p = f"model.layers.{j}.mlp."
        if p + "gate_proj.weight" in work.state:
            work.state[p + "gate_proj.weight"] = work.state[p + "gate_proj.weight"][keep]
            work.state[p + "up_proj.weight"] = work.state[p + "up_proj.weight"][keep]
            work.state[p + "down_proj.weight"] = work.state[p + "down_proj.weight"][:, keep]
        work.blocks[j] = BlockSpec(b.attention, FFNSpec("swiglu", w))


def prune_hidden(work: _Work, imp: Importance, hidden: int, parent_hidden: int) -> int:
    if hidden == parent_hidden:
        return hidden
    if not 1 <= hidden <= parent_hidden:
        raise TesseraError(f"--hidden {hidden} must be between 1 and the parent's {parent_hidden}")
    idx = _top(imp.channels, hidden)
    reads = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # (out, hidden): slice columns
    writes = ("o_proj", "down_proj")  # (hidden, in): slice rows
    out = {}
    for k, v in work.state.items():
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
    work.state = out
    return hidden


def _run_steps(work: _Work, model: Transformer, imp: Importance, target: PruneTarget) -> int:
    """Every step on `work`, in order; returns the child's hidden size. The steps slice whichever tensors `work`
    holds (the whole model, or one layer, or only the embedding / norm / head) and always update the specs."""
    arch = model.arch
    drop_layers(work, model, imp, target)
    if target.heads is not None or target.kv_heads is not None:
        _head_scores(work, imp, target.head_metric)
    if target.heads is not None:
        prune_heads(work, target.heads, arch.head_dim)
    if target.kv_heads is not None:
        merge_kv(work, target.kv_heads, arch.head_dim)
    if target.ffn is not None:
        prune_ffn(work, imp, target.ffn)
    hidden = arch.hidden_size
    if target.hidden is not None:
        hidden = prune_hidden(work, imp, target.hidden, arch.hidden_size)
    return hidden


@dataclass(frozen=True)
class PrunePlan:
    """The child's architecture, the layers dropped and where each child layer comes from in the parent."""

    arch: ArchSpec
    dropped: list[int]
    source_layer: list[int]


def _layer_tensors(model: Transformer, i: int) -> dict[str, torch.Tensor]:
    """Parent layer `i`'s tensors, full names, copied (read from its shard when the model is streamed)."""
    from tessera.stream import is_streamed

    prefix = f"model.layers.{i}."
    if is_streamed(model):
        return {prefix + k: v.detach().clone() for k, v in model.streamed.state(i).items()}
    block = model.model.layers[i]
    return {prefix + k: v.detach().clone() for k, v in block.state_dict().items()}


def fit_engine(target: PruneTarget, arch: ArchSpec, engine: str | None) -> PruneTarget:
    """`target` rounded to what `engine` serves exactly, or best. A child that stays a plain Llama keeps any MLP
    width (vLLM reads `intermediate_size`), but vLLM and transformers need its hidden size to be a multiple of the
    attention heads (`round_hidden`, rounded down). A heterogeneous child keeps any hidden size but its MLP widths
    are rounded down to ones vLLM's `ffn_mult` rule expresses (`round_ffn_width`). For llama.cpp, plain or not, the
    hidden size and MLP widths are rounded down to multiples of 32, so a q8_0 GGUF quantizes every matrix."""
    from tessera.formats.engines import check_engine, round_ffn_width, round_hidden

    if engine is None:
        return target
    check_engine(engine)
    widths = (target.ffn if isinstance(target.ffn, tuple) else (target.ffn,)) if target.ffn is not None else ()
    blocks = arch.blocks
    uniform_rest = (all(b.attention.kind == "gqa" and b.ffn.kind == "swiglu" for b in blocks)
                    and (target.kv_heads is not None or len({b.attention for b in blocks}) == 1))
    uniform_ffn = len(set(widths)) == 1 if widths else len({b.ffn for b in blocks}) == 1
    plain = uniform_ffn and uniform_rest  # the child stays a plain Llama
    if target.hidden is not None and (plain or engine == "llamacpp"):
        hidden = round_hidden(target.hidden, target.heads or arch.num_attention_heads, engine)
        target = replace(target, hidden=hidden)
    if target.ffn is None or (plain and engine != "llamacpp"):
        return target
    hidden = target.hidden or arch.hidden_size
    rounded = tuple(round_ffn_width(w, hidden, engine) for w in widths)
    return replace(target, ffn=rounded if isinstance(target.ffn, tuple) else rounded[0])


def _refuse_unservable(arch: ArchSpec, engine: str | None) -> None:
    from tessera.formats.engines import incompatibilities

    problems = incompatibilities(arch, engine) if engine is not None else []
    if problems:
        first = str(problems[0]).removeprefix(f"{engine}: ")
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TesseraError(f"the pruned child cannot be served by {engine}: {first}{more}; change the target or "
                           "drop --engine")


def pruned_tensors(model: Transformer, imp: Importance, target: PruneTarget, *, check: bool = True,
                   engine: str | None = None) -> tuple[PrunePlan, Iterator[tuple[str, torch.Tensor]]]:
    """The child's plan and its tensors, produced piece by piece in `tessera.save`'s order: the output head and
    embedding, then one child layer at a time (its parent layer read, sliced by the same steps, let go), then the
    final norm. `prune` collects them into a model; `prune_to` writes them shard by shard, so a streamed parent's
    child is never whole in memory. Both run exactly the same steps on exactly the same tensors. With `engine`
    ("vllm" | "llamacpp"), MLP widths are rounded to ones it serves (`fit_engine`) and a child it still cannot
    serve is refused, naming the layer and the reason, before any tensor is produced."""
    if check:
        imp.check(model)
    target = fit_engine(target, model.arch, engine)
    if target.head_metric not in HEAD_METRICS:
        raise TesseraError(f"--head-metric {target.head_metric!r}: use {' or '.join(HEAD_METRICS)}")
    arch = model.arch

    def work(state: dict[str, torch.Tensor]) -> _Work:
        return _Work(state=state, blocks=list(arch.blocks), source_layer=list(range(arch.num_layers)),
                     n_heads=arch.num_attention_heads)

    resident = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    parent_storage = {v.data_ptr() for v in resident.values()}  # tensors no step changed are copied when yielded
    if arch.tie_word_embeddings:
        resident.pop("lm_head.weight", None)
    outer = work(resident)  # validates the whole target and gives the child's specs before any layer is read
    hidden = _run_steps(outer, model, imp, target)
    new_arch = replace(arch, hidden_size=hidden, num_attention_heads=outer.n_heads, blocks=tuple(outer.blocks))
    _refuse_unservable(new_arch, engine)
    plan = PrunePlan(new_arch, outer.dropped, outer.source_layer)

    def pieces() -> Iterator[tuple[str, torch.Tensor]]:
        from tessera.stream.writer import save_order

        def own(n: str) -> torch.Tensor:
            t = outer.state[n]
            return t.clone() if t.data_ptr() in parent_storage else t

        head = [n for n in save_order(outer.state) if n < "model.layers."]  # lm_head, embed_tokens; norm after
        yield from ((n, own(n)) for n in head)
        for src in plan.source_layer:
            piece = work(_layer_tensors(model, src))
            _run_steps(piece, model, imp, target)
            yield from ((n, piece.state[n]) for n in save_order(piece.state))
        yield from ((n, own(n)) for n in save_order(outer.state) if n not in head)

    return plan, pieces()


def _record(model: Transformer, imp: Importance, target: PruneTarget, plan: PrunePlan, engine: str | None) -> list:
    record = {"stage": "prune", "target": target.describe(), "dropped_layers": plan.dropped, "importance": imp.meta,
              "params": plan.arch.num_params()}
    if engine is not None:
        record["engine"] = engine
    return [*getattr(model, "provenance", []), record]


def prune(model: Transformer, imp: Importance, target: PruneTarget, *, check: bool = True,
          engine: str | None = None) -> Transformer:
    """A new pruned model; `model` is not modified. `check=False` skips the fingerprint check (for callers that
    made it once, like `search_target`); `engine` keeps the child servable by it (`pruned_tensors`)."""
    target = fit_engine(target, model.arch, engine)
    plan, tensors = pruned_tensors(model, imp, target, check=check, engine=engine)
    pruned = from_state_dict(plan.arch, dict(tensors), source="pruned model")
    pruned.tokenizer = model.tokenizer
    pruned.provenance = _record(model, imp, target, plan, engine)
    return pruned.eval()


def prune_to(model: Transformer, imp: Importance, target: PruneTarget, out: str | os.PathLike, *, check: bool = True,
             force: bool = False, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
             extra: dict | None = None, engine: str | None = None) -> PrunePlan:
    """Prune and write the child to `out` layer by layer and shard by shard (`tessera.stream.checkpoint_writer`):
    memory holds the parent's resident tensors, one parent layer and one shard. The directory is what
    `tessera.save(prune(...))` writes, byte for byte; `dtype` stores the child in another dtype than the model's
    (a bf16 parent computed in fp32 on a CPU, saved bf16); `extra` adds fields to the provenance record."""
    from tessera.checkpoint import MAX_SHARD_BYTES
    from tessera.stream import checkpoint_writer

    target = fit_engine(target, model.arch, engine)
    plan, tensors = pruned_tensors(model, imp, target, check=check, engine=engine)
    history = _record(model, imp, target, plan, engine)
    history[-1].update(extra or {})
    dtype = dtype or model.dtype
    with checkpoint_writer(out, plan.arch, dtype=dtype, provenance=history, tokenizer=model.tokenizer,
                           force=force, max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES) as writer:
        for name, t in tensors:
            writer.add(name, t.to(dtype))
    return plan


# ---------------------------------------------------------------------------- parameter-budget search
@dataclass(frozen=True)
class TargetSearch:
    """What `search_target` chose, every candidate it measured, and how many it left out."""

    target: PruneTarget
    candidates: list[dict]  # {"target", "params", "fraction", "kld"} per measured candidate
    considered: int  # candidates that fit the budget
    max_candidates: int
    data: dict  # the selection data's record

    def as_dict(self) -> dict:
        return {"target": self.target.describe(), "candidates": self.candidates, "considered": self.considered,
                "max_candidates": self.max_candidates, "data": self.data}


def search_target(model: Transformer, imp: Importance, fraction: float, selection: DataSplit | torch.Tensor, *,
                  multiple: int = 32, max_candidates: int = MAX_CANDIDATES) -> TargetSearch:
    """The width/depth split with the lowest KLD to the parent on `selection` chunks (the selection split, never
    the one results are reported on) among candidates at `fraction` of the parent's non-embedding parameters
    (depth: layers dropped by BI; width: MLP and embedding channels). The first `max_candidates` are measured."""
    from tessera.evaluate import mean_kld, parent_logits_for

    arch = model.arch
    if not 0 < fraction < 1:
        raise TesseraError(f"--target-params {fraction} must be a fraction between 0 and 1 of the parent's "
                           "non-embedding parameters; a target larger than the parent is not a pruning")
    if max_candidates < 1:
        raise TesseraError(f"--max-candidates must be >= 1, got {max_candidates}")
    chunks, record = (selection.chunks, selection.record()) if isinstance(selection, DataSplit) else (selection, {})
    imp.check(model)
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
    considered = len(candidates)
    candidates = candidates[:max_candidates]
    ref = parent_logits_for(model, chunks)
    rows = []
    for t in candidates:
        child = prune(model, imp, t, check=False)
        r = mean_kld(model, child, chunks, parent_logits=ref)
        params = child.arch.non_embedding_params()
        rows.append({"target": t.describe(), "params": params, "fraction": params / arch.non_embedding_params(),
                     "kld": r.kld})
    best = min(range(len(rows)), key=lambda i: rows[i]["kld"])
    return TargetSearch(candidates[best], rows, considered, max_candidates, record)


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

