"""Puzzle stage 6: assemble the searched child from its chosen variants, save it, and heal it (global distillation).

`assemble` builds the child the MIP chose: per layer the chosen attention and FFN variants, each with its
trained weights (blockwise local distillation, `tessera.puzzle.bld`) or, where none were trained, the library's
initialisation from the parent; the embedding, final norm and output head are the parent's. A quantised variant
(`@fp8`, `@nvfp4`) takes its native twin's weights, fake-quantised in place. The child keeps the parent's depth
(a removed block is a no-op layer), so it is a nemotron-nas checkpoint whenever it is not a plain Llama.

`search_record` is the `search.json` saved beside the child: the library it came from, the scores, the costs
and the constraints the MIP saw, the chosen variants per layer and the predicted totals (speed, memory,
parameters) of the child, so a checkpoint says how and why it was made.

`heal` is global knowledge distillation (Puzzle's GKD) with `tessera.distill`: KL on the logits plus the
cosine loss on every layer's output (`loss="kl+cosine-layers"`), resumable like every distillation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tessera.errors import TesseraError
from tessera.model import Transformer
from tessera.puzzle.library import Library, Variant, apply_precision, block_of

SEARCH_FORMAT = "tessera.puzzle.search"
SEARCH_VERSION = 1
GKD_LOSS = "kl+cosine-layers"

# (layer, native variant) -> its weights, named as in the layer's Block ("self_attn.q_proj.weight", ...)
WeightsFn = Callable[[int, Variant], dict[str, torch.Tensor]]


def check_choice(library: Library, choice: Sequence[tuple[Variant, Variant]]) -> None:
    """Refuse a choice that is not one offered (attention, FFN) pair per layer of this library."""
    L = library.arch.num_layers
    if len(choice) != L:
        raise TesseraError(f"the choice has {len(choice)} layers but the library's parent has {L}; the MIP result "
                           "comes from a different library")
    for i, (a, f) in enumerate(choice):
        for v, part in ((a, "attention"), (f, "ffn")):
            if not isinstance(v, Variant) or v.part != part:
                raise TesseraError(f"layer {i}: expected an {part} variant, got {v!r}")
            if v not in library.variants(i, part):
                raise TesseraError(f"layer {i}: variant {v.key} is not in the library at {library.path}; the MIP "
                                   "result comes from a different library (rerun the search on this one)")


def assemble(parent: Transformer, library: Library, choice: Sequence[tuple[Variant, Variant]], *,
             weights: WeightsFn | None = None) -> Transformer:
    """The child with `choice[i] = (attention variant, FFN variant)` in layer i, on the parent's device and dtype.

    `weights(layer, variant)` gives a native variant's trained weights (e.g. `tessera.puzzle.bld`'s); by default
    every variant is the library's untrained initialisation."""
    from tessera.checkpoint import from_state_dict

    library.check_parent(parent)
    check_choice(library, choice)
    get = weights or (lambda layer, v: library.init_state(parent, layer, v))
    arch = parent.arch.with_blocks(block_of(a, f) for a, f in choice)
    own = parent.state_dict()
    state = {k: v.detach().clone() for k, v in own.items() if not k.startswith("model.layers.")}
    for i, (a, f) in enumerate(choice):
        for v in (a, f):
            if not v.has_weights:
                continue
            for name, tensor in get(i, v.native).items():
                state[f"model.layers.{i}.{name}"] = tensor.detach().to(parent.dtype).clone()
    child = from_state_dict(arch, state, source=f"puzzle child of {library.parent_fingerprint}").to(parent.device)
    for i, (a, f) in enumerate(choice):
        block = child.model.layers[i]
        if a.precision != "native":
            apply_precision(block.self_attn, a.precision)
        if f.precision != "native":
            apply_precision(block.mlp, f.precision)
    child.tokenizer = parent.tokenizer
    child.provenance = [*getattr(parent, "provenance", []),
                        {"stage": "puzzle.assemble", "library": str(library.path),
                         "parent_fingerprint": library.parent_fingerprint,
                         "weights": "given" if weights is not None else "library initialisation (untrained)",
                         "layers": [{"attention": a.key, "ffn": f.key} for a, f in choice]}]
    return child.eval()


def _score_rows(scores: Mapping[tuple[int, str], float] | Any) -> list[dict[str, Any]]:
    if hasattr(scores, "as_dict"):
        return scores.as_dict()
    return [{"layer": int(layer), "variant": key, "score": float(value)}
            for (layer, key), value in sorted(scores.items())]


def search_record(library: Library, scores, costs, constraints: Sequence, solution, *,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What `search.json` holds: library, scores, costs, constraints, the chosen variants and predicted totals."""
    return {
        "format": SEARCH_FORMAT, "version": SEARCH_VERSION,
        "library": {"path": str(library.path), "parent_source": library.parent_source,
                    "parent_fingerprint": library.parent_fingerprint, "config": asdict(library.config)},
        "scores": _score_rows(scores),
        "costs": costs.as_dict(),
        "constraints": [asdict(c) for c in constraints],
        "chosen": [{"layer": i, "attention": a.key, "ffn": f.key} for i, (a, f) in enumerate(solution.layers)],
        "objective": solution.objective,
        "optimal": solution.optimal,
        "predicted": dict(solution.totals),
        "constraint_values": dict(solution.constraints),
        **dict(extra or {}),
    }


def choice_from_record(record: Mapping[str, Any]) -> list[tuple[Variant, Variant]]:
    """The per-layer (attention, FFN) variants of a `search.json` or a MIP result's `chosen` list."""
    rows = record.get("chosen") if isinstance(record, Mapping) else None
    if not isinstance(rows, list) or not rows:
        raise TesseraError("the search record has no chosen variants ('chosen'); rerun the MIP stage")
    return [(Variant.from_key(r["attention"]), Variant.from_key(r["ffn"])) for r in rows]


def save_child(child: Transformer, out: str | Path, record: Mapping[str, Any], *, force: bool = False,
               extra_files: Mapping[str, Any] | None = None) -> Path:
    """The child as a checkpoint (nemotron-nas unless it is a plain Llama) with `search.json` beside it, atomic."""
    from tessera.checkpoint import save

    return save(child, out, force=force, extra_files={"search.json": dict(record), **dict(extra_files or {})})


def gkd_config(tokens: int, **overrides) -> Any:
    """The `DistillConfig` of Puzzle's global distillation: KL on logits + cosine on every layer's output."""
    from tessera.distill import DistillConfig

    overrides.pop("loss", None)
    return DistillConfig(tokens=tokens, loss=GKD_LOSS, **overrides)


def heal(parent: Transformer, child: Transformer, train, cfg, *, heldout=None, ckpt_dir: str | Path | None = None,
         resume: bool = False, progress: bool = True, compute_dtype: str | None = None,
         max_steps: int | None = None) -> tuple[Transformer, list[dict]]:
    """Global distillation of `child` (in place) from `parent` with `tessera.distill`; `cfg.loss` must be the GKD
    loss (see `gkd_config`). Returns the healed child and the log."""
    from tessera.distill import distill

    if cfg.loss != GKD_LOSS:
        raise TesseraError(f"global distillation uses loss {GKD_LOSS!r} (got {cfg.loss!r}); build the config with "
                           "gkd_config")
    return distill(parent, child, train, cfg, heldout=heldout, ckpt_dir=ckpt_dir, resume=resume, progress=progress,
                   compute_dtype=compute_dtype, max_steps=max_steps)
