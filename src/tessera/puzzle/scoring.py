"""Puzzle stage 3: replace-1-block scores, the quality term of the MIP.

Public API (names are stable; the CLI and `tessera.puzzle.assemble` call them):

    score_library(library, parent, data, out, ...) -> ScoreTable
                                    score every variant (or those of `layers`), cached in `out/scores.json`
    ScoreTable                      `.kl[(layer, key)]` mean KL(parent || candidate) in nats (what
                                    `tessera.puzzle.mip.solve(scores=table.kl)` takes), `.lm_loss[(layer, key)]`,
                                    `.parent_lm_loss`, `.data` (the record of the scoring tokens), `.table()` rows
    load_scores(out) -> ScoreTable  the cached table, as written
    in_context_costs(parent, child, data, layers) -> (KL, {layer: cost})
                                    a child's KL to the parent and what each of its layers' choices costs in the
                                    child (the KL it loses when that layer alone gets the parent's block back):
                                    the measurement `tessera.puzzle.refine` corrects the summed scores with
    score_rows(table, library) / rich_score_table(table, library)
                                    the per-layer table (layers x variants), for printing
    (the heat map is `tessera.plots.plot_score_heatmap`)

A candidate is the parent with exactly one sub-block of one layer swapped for a trained variant (its BLD weights,
`tessera.puzzle.bld.variant_state`; the untrained initialisation where BLD has not trained it). Its score is the
mean per-token KL(parent || candidate) on held-out tokens (the selection split: never the calibration tokens the
variants were fitted on), and its LM loss on the same tokens. The parent's own sub-block scores exactly 0. A
`DataSplit` with a mask counts only the positions it marks: `tessera.evaluate.tasks.answer_split` marks those
predicting the gold answers of held-out task items, where closeness to the parent decides the tasks (on a small
parent, the KL over every position of book text does not rank children by task accuracy: docs/results.md).

How: on `tessera.stream`'s executor, each candidate is a branch that leaves the parent's main stream at its layer
(the parent's cached input to that layer), goes through the replaced layer and then the parent's later layers;
the parent's logits come from the same pass. A pass carries up to `max_branches` candidates (their activations are
what it holds; `Budget` spills them to disk beyond its RAM budget), so each parent layer is read once per pass
and a streamed parent works the same way. Scores are cached per (layer, variant key, data hash, weights hash) and
written after every pass, so a killed scoring run resumes and a retrained variant is rescored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tessera.data import DataSplit, sha256_ids
from tessera.errors import TesseraError
from tessera.io import atomic_write_json, read_json
from tessera.model import Transformer
from tessera.puzzle.bld import attention_then_parent_ffn, parent_attention_then_ffn, variant_state, weights_id
from tessera.puzzle.library import Library, Variant, variant_block

SCORES_FORMAT = "tessera.puzzle.scores"
SCORES_VERSION = 1
SCORES_FILE = "scores.json"


@dataclass
class ScoreTable:
    """Replace-1-block scores per (layer, variant key)."""

    kl: dict[tuple[int, str], float] = field(default_factory=dict)
    lm_loss: dict[tuple[int, str], float] = field(default_factory=dict)
    parent_lm_loss: float | None = None
    tokens: int = 0
    data: dict = field(default_factory=dict)
    parent_fingerprint: str = ""
    seconds: float = 0.0

    def keys(self) -> list[tuple[int, str]]:
        return sorted(self.kl)

    def total(self, choice: Sequence[tuple[str, str]]) -> float:
        """Sum of scores of a child given as (attention key, FFN key) per layer: Puzzle's quality estimate."""
        return sum(self.kl[(i, a)] + self.kl[(i, f)] for i, (a, f) in enumerate(choice))

    def to_json(self) -> dict:
        return {"format": SCORES_FORMAT, "version": SCORES_VERSION, "parent_fingerprint": self.parent_fingerprint,
                "data": self.data, "tokens": self.tokens, "parent_lm_loss": self.parent_lm_loss,
                "seconds": round(self.seconds, 2),
                "scores": [{"layer": layer, "key": key, "kl": self.kl[(layer, key)],
                            "lm_loss": self.lm_loss.get((layer, key))} for layer, key in self.keys()]}


def load_scores(out: str | Path) -> ScoreTable:
    """The table in `out/scores.json` (all cached entries, whatever data they were scored on)."""
    file = Path(out).expanduser() / SCORES_FILE
    if not file.is_file():
        raise TesseraError(f"{out}: no {SCORES_FILE}; score the library first (`tessera puzzle score`)")
    raw = _read(file)
    table = ScoreTable(parent_lm_loss=raw.get("parent_lm_loss"), tokens=raw.get("tokens", 0),
                       data=raw.get("data", {}), parent_fingerprint=raw.get("parent_fingerprint", ""),
                       seconds=raw.get("seconds", 0.0))
    for e in raw.get("entries", []):
        table.kl[(e["layer"], e["key"])] = e["kl"]
        table.lm_loss[(e["layer"], e["key"])] = e["lm_loss"]
    return table


def _read(file: Path) -> dict:
    return read_json(file, fix="delete it to rescore", format=SCORES_FORMAT, version=SCORES_VERSION,
                     what="a tessera scores file")


def _data(data: DataSplit | torch.Tensor, library: Library) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    mask = None
    if isinstance(data, DataSplit):
        if data.name == "calibration":
            raise TesseraError("replace-1-block scores are measured on held-out tokens; give the selection split, "
                               "not the calibration split the variants were fitted on")
        chunks, mask, record = data.chunks, data.mask, data.record()
        if mask is not None and (mask.shape != chunks.shape or not mask[:, :-1].any() or mask[:, -1].any()):
            raise TesseraError("a scoring mask must have the chunks' shape, mark at least one position and never a "
                               "chunk's last one (it predicts no token)")
    else:
        chunks, record = data, {"split": "in-memory", "chunks": len(data), "seq_len": int(data.shape[1]),
                                "tokens": int(data.numel()), "sha256": sha256_ids(data)}
    if chunks.ndim != 2 or len(chunks) == 0 or chunks.shape[1] < 2:
        raise TesseraError("scoring needs token chunks (N, seq_len >= 2) with N >= 1; give more selection text")
    from tessera.data import check_disjoint

    records = {"scoring": record}
    calib = library.meta.get("calibration")
    if isinstance(calib, dict) and calib.get("sha256"):
        records["library calibration"] = calib
    run = Path(library.path) / "bld" / "run.json"
    if run.is_file():
        bld_data = json.loads(run.read_text()).get("data", {})
        if bld_data.get("sha256"):
            records["BLD training"] = bld_data
    # records of in-memory tensors have no source: only their token hashes can be compared
    records = {k: r if r.get("source_sha256") else {"sha256": r.get("sha256"), "split": f"{k} tensor",
                                                    "source_sha256": f"{k} tensor"} for k, r in records.items()}
    for name, r in records.items():  # the scoring tokens against each training set (those two may share a split)
        if name != "scoring":
            check_disjoint({"scoring": records["scoring"], name: r})
    return chunks, mask, record


def _branch_run(library: Library, parent: Transformer, layer: int, variant: Variant) -> Callable:
    """The executor branch: layer `layer` of the parent with `variant` in place of its sub-block."""

    def run(block, x, cos, sin):
        state = variant_state(library, parent, layer, variant)
        sub = variant_block(library.arch, variant, state).to(parent.device)
        if variant.part == "attention":
            return attention_then_parent_ffn(sub, block, x, cos, sin)
        return parent_attention_then_ffn(block, sub, x, cos, sin)

    return run


@torch.no_grad()
def score_library(library: Library, parent: Transformer, data: DataSplit | torch.Tensor, out: str | Path, *,
                  layers: Sequence[int] | None = None, keys: Sequence[str] | None = None, batch_size: int = 8,
                  max_branches: int = 32, budget=None, progress: bool = True, force: bool = False) -> ScoreTable:
    """Replace-1-block KL and LM loss of every variant of `layers` (default all; `keys` narrows the variants) on
    `data` (the selection split), reusing `out/scores.json` entries of the same (layer, key, data, weights).
    Returns the table of the requested candidates; the file keeps every entry scored so far."""
    from tessera.stream import Branch, Budget, run_layers

    library.check_parent(parent)
    chunks, mask, record = _data(data, library)
    out = Path(out).expanduser()
    file = out / SCORES_FILE
    entries: dict[tuple[int, str, str], dict] = {}
    parent_lm = None
    if file.is_file() and not force:
        raw = _read(file)
        if raw.get("parent_fingerprint") != library.parent_fingerprint:
            raise TesseraError(f"{file}: scores of a different parent; pass --force to rescore or use another --out")
        entries = {(e["layer"], e["key"], e["data"]): e for e in raw.get("entries", [])}
        parent_lm = raw.get("parent_lm", {}).get(record["sha256"])
    wanted = range(library.arch.num_layers) if layers is None else sorted(set(layers))
    candidates = [(i, v) for i in wanted for v in library.variants(i) if keys is None or v.key in keys]
    if keys is not None:
        unknown = set(keys) - {v.key for _, v in candidates}
        if unknown:
            raise TesseraError(f"variant keys {sorted(unknown)} are not in the library at the given layers")
    sha = record["sha256"]
    # the weights id is part of the cache key: a variant retrained by BLD is rescored
    ids = {(i, v.key): weights_id(library, i, v) for i, v in candidates}
    current = {}
    todo = []
    for i, v in candidates:
        e = entries.get((i, v.key, sha))
        if e is not None and e.get("weights") == ids[(i, v.key)]:
            current[(i, v.key)] = e
        else:
            todo.append((i, v))
    t0 = time.perf_counter()
    bar = None
    if progress and todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("candidates"),
                       TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task("score", total=len(todo))
    budget = budget or Budget()
    groups = [todo[g:g + max_branches] for g in range(0, len(todo), max(1, max_branches))]
    if not groups and parent_lm is None:
        groups = [[]]  # nothing to score, but the parent's LM loss on these tokens is not cached yet
    try:
        for group in groups:
            branches = [Branch(f"{i}:{v.key}", i, _branch_run(library, parent, i, v)) for i, v in group]
            fwd = run_layers(parent, chunks, batch_size=batch_size, branches=branches, budget=budget)
            try:
                sums = {br.name: [0.0, 0.0] for br in branches}
                lm_sum, count, lm_count = 0.0, 0, 0
                for b, s in enumerate(fwd.batches):
                    pos = None if mask is None else mask[s]  # the positions that count (None: all)
                    logp = _logprobs(fwd.logits(b, positions=pos))  # once, for every branch
                    p = logp.exp()
                    target = (chunks[s, 1:] if pos is None else chunks[s].roll(-1, dims=1)[pos]).to(logp.device)
                    lm_sum += _lm_loss_sum(logp, target)
                    count += logp.shape[:-1].numel()
                    lm_count += target.numel()
                    for br in branches:
                        logq = _logprobs(fwd.logits(b, br.name, positions=pos))
                        sums[br.name][0] += _kl_sum(logp, p, logq)
                        sums[br.name][1] += _lm_loss_sum(logq, target)
                    del logp, p
            finally:
                fwd.close()
            parent_lm = lm_sum / lm_count
            for (i, v), br in zip(group, branches, strict=True):
                kl, lm = sums[br.name]
                e = {"layer": i, "key": v.key, "data": sha, "weights": ids[(i, v.key)], "kl": kl / count,
                     "lm_loss": lm / lm_count, "tokens": count}
                entries[(i, v.key, sha)] = e
                current[(i, v.key)] = e
            _write(file, library, record, entries, parent_lm, time.perf_counter() - t0)
            if bar is not None:
                bar.update(task, advance=len(group))
    finally:
        if bar is not None:
            bar.stop()
    tokens = int(chunks.numel() if mask is None else mask.sum())  # the positions that counted
    table = ScoreTable(parent_lm_loss=parent_lm, tokens=tokens, data=record,
                       parent_fingerprint=library.parent_fingerprint, seconds=time.perf_counter() - t0)
    for (i, key), e in sorted(current.items()):
        table.kl[(i, key)] = e["kl"]
        table.lm_loss[(i, key)] = e["lm_loss"]
    return table


@torch.no_grad()
def in_context_costs(parent: Transformer, child: Transformer, data: DataSplit | torch.Tensor, layers: Sequence[int],
                     *, batch_size: int = 8, budget=None) -> tuple[float, dict[int, float]]:
    """The child's mean KL(parent || child) on `data` (the masked positions of a `DataSplit` with a mask, else
    every position, as `score_library` counts them), and for each of `layers` the in-context cost of the child's
    block there: the child's KL minus the KL of the child with that one layer replaced by the parent's layer.
    Replace-1-block scores measure a block in the parent; this measures it among the child's other choices, where
    removals interact. One pass of the child on `tessera.stream`'s executor, a branch per layer (the parent's layer
    fed the child's own input to it, the child's later layers after it), and one pass of the parent. With no
    `layers`, only the KL (a child of any depth)."""
    from tessera.stream import Branch, Budget, is_streamed, run_layers

    if child.arch.vocab_size != parent.arch.vocab_size or layers and child.arch.num_layers != parent.arch.num_layers:
        raise TesseraError("in-context costs need a child with the parent's vocabulary and, to give layers back, its "
                           "layers (a Puzzle child)")
    if is_streamed(parent) or is_streamed(child):
        raise TesseraError("in-context costs (refinement) need the parent and the child in memory, not streamed "
                           "layer by layer; leave --refine-rounds at 0 for a parent larger than memory")
    chunks, mask = (data.chunks, data.mask) if isinstance(data, DataSplit) else (data, None)
    branches = [Branch(str(i), i, lambda block, x, cos, sin, i=i: parent.model.layers[i](x, cos, sin, None, None, 0))
                for i in sorted(set(layers))]
    fwd = run_layers(child, chunks, batch_size=batch_size, branches=branches, budget=budget or Budget())
    sums = {br.name: 0.0 for br in branches}
    total, count = 0.0, 0
    try:
        for b, s in enumerate(fwd.batches):
            pos = None if mask is None else mask[s]
            logp = parent(chunks[s].to(parent.device))
            logp = _logprobs(logp if pos is None else logp[pos.to(logp.device)])
            p = logp.exp()
            total += _kl_sum(logp, p, _logprobs(fwd.logits(b, positions=pos)))
            count += logp.shape[:-1].numel()
            for br in branches:
                sums[br.name] += _kl_sum(logp, p, _logprobs(fwd.logits(b, br.name, positions=pos)))
    finally:
        fwd.close()
    return total / count, {br.layer: (total - sums[br.name]) / count for br in branches}


def _kl_sum(logp: torch.Tensor, p: torch.Tensor, logq: torch.Tensor) -> float:
    """Summed KL(parent || candidate) over positions, from log-probabilities: the parent's `logp` (and `p`, their
    exp, computed once for many candidates) and the candidate's `logq`."""
    return (p * (logp - logq)).sum(-1).double().sum().item()


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _lm_loss_sum(logprobs: torch.Tensor, target: torch.Tensor) -> float:
    """Summed next-token cross-entropy (nats) of log-probabilities (B, T, V) against target ids (B, T-1), or of
    (P, V) at masked positions against their P targets."""
    lp = logprobs[:, :-1] if logprobs.ndim == 3 else logprobs
    return -lp.gather(-1, target.unsqueeze(-1)).double().sum().item()


def _write(file: Path, library: Library, record: dict, entries: dict, parent_lm: float, seconds: float) -> None:
    old = {}
    if file.is_file():
        old = json.loads(file.read_text()).get("parent_lm", {})
    payload = {"format": SCORES_FORMAT, "version": SCORES_VERSION, "parent_fingerprint": library.parent_fingerprint,
               "library": str(library.path), "data": record, "tokens": record.get("tokens"),
               "parent_lm_loss": parent_lm, "parent_lm": {**old, record["sha256"]: parent_lm},
               "seconds": round(seconds, 2),
               "entries": [entries[k] for k in sorted(entries)]}
    atomic_write_json(file, payload)


# ---------------------------------------------------------------------------- printing
def score_rows(table: ScoreTable, library: Library | None = None) -> tuple[list[str], list[list[float | None]]]:
    """(variant keys, per-layer rows of KL, None where a layer does not offer a key): the heat map's matrix."""
    keys = sorted({k for _, k in table.kl}, key=_key_order)
    layers = sorted({i for i, _ in table.kl})
    n = library.arch.num_layers if library is not None else (max(layers) + 1 if layers else 0)
    rows = [[table.kl.get((i, k)) for k in keys] for i in range(n)]
    return keys, rows


def _key_order(key: str) -> tuple:
    v = Variant.from_key(key)
    size = (v.spec.num_kv_heads if v.kind == "gqa" else v.spec.intermediate_size if v.kind == "swiglu" else 0) or 0
    return (v.part, {"gqa": 0, "swiglu": 0, "linear": 1, "no_op": 2}.get(v.kind, 3), -size, v.precision)


def rich_score_table(table: ScoreTable, library: Library | None = None, title: str = "replace-1-block KL (nats)"):
    """A rich Table: one row per layer, one column per variant key, KL to 4 significant digits."""
    from rich.table import Table

    keys, rows = score_rows(table, library)
    t = Table(title=title)
    t.add_column("layer", justify="right")
    for k in keys:
        t.add_column(k, justify="right")
    for i, row in enumerate(rows):
        t.add_row(str(i), *("" if x is None else f"{x:.4g}" for x in row))
    return t
