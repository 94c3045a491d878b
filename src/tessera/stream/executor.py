"""Layer-by-layer execution over a whole calibration set: each layer is materialised once, every batch goes through it.

    embed every batch -> for each layer i: materialise it, run every batch through it, release it -> final states

The same loop serves a model loaded whole (its layers are simply there) and a streamed one (`tessera.stream.model`),
and every number a stage computes from it is the same for both: each batch meets exactly the operations
`Transformer.hidden` applies to it (same RoPE tables, no mask for unpadded chunks), only the order of (layer, batch)
pairs differs.

Two things ride along:
* an **observer** sees the main stream: `attach(i, block)` may register hooks on the layer for its pass (they are
  removed after it), `before_batch(i, b)` / `after_batch(i, b, x, y)` frame each batch (x its input, y its output);
* **branches** leave the main stream at one layer: `Branch(name, layer, run, rows)` computes layer `layer`'s output
  as `run(block, x, cos, sin)` (the parent's block is materialised and passed in: skip it, ablate a head, swap a
  sub-block for a variant, ...) on the first `rows` sequences, and the parent's later layers carry it to the end.
  Drop-one-layer / drop-one-head scores and Puzzle's replace-1-block scores are branches; each layer is still read
  once however many branches there are.

`Forward.logits(b)` / `Forward.logits(b, branch)` apply the final norm and the output head to one batch, so logits
(N x T x vocab floats) never need to exist for the whole set at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from tessera.model import Block, Transformer
from tessera.stream.activations import Activations, Budget
from tessera.stream.model import is_streamed


@dataclass
class Branch:
    """Activations that leave the main stream at `layer`, where `run(block, x, cos, sin)` replaces the layer."""

    name: str
    layer: int
    run: Callable[[Block, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rows: int | None = None  # the first `rows` sequences of the data (None: all)


class Observer:
    """What a stage watches on the main stream (every method optional to override)."""

    def attach(self, i: int, block: Block) -> list:
        return []

    def before_batch(self, i: int, b: int) -> None:
        pass

    def after_batch(self, i: int, b: int, x: torch.Tensor, y: torch.Tensor) -> None:
        pass


@contextmanager
def layer(model: Transformer, i: int) -> Iterator[Block]:
    """Layer i of a model, materialised for the block when the model is streamed."""
    if is_streamed(model):
        with model.streamed.layer(i) as block:
            yield block
    else:
        with nullcontext(model.model.layers[i]) as block:
            yield block


def rope_for(model: Transformer, batch: int, seq_len: int, dtype: torch.dtype):
    """cos / sin exactly as `Transformer.hidden` builds them for an unpadded batch without a cache."""
    device = model.device
    positions = torch.zeros(batch, 1, dtype=torch.long, device=device) + torch.arange(seq_len, device=device)
    return model._rope(positions, dtype)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


@dataclass
class Forward:
    """The result of `run_layers`: final hidden states (before the final norm) of the main stream and each branch."""

    model: Transformer
    batches: list[slice]
    main: Activations
    branches: dict[str, Activations] = field(default_factory=dict)
    layers_read: int = 0

    def hidden(self, b: int, branch: str | None = None) -> torch.Tensor:
        return (self.main if branch is None else self.branches[branch])[b]

    def logits(self, b: int, branch: str | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of batch b, computed as `Transformer.forward` computes them: (B, T, V), or (P, V) at the P
        positions a bool mask `positions` (B, T) marks (the head runs only there)."""
        m = self.model
        h = self.hidden(b, branch)
        return m.lm_head(m.model.norm(h if positions is None else h[positions.to(h.device)]))

    def branch_batches(self, name: str) -> int:
        return len(self.branches[name])

    def close(self) -> None:
        self.main.close()
        for acts in self.branches.values():
            acts.close()


class LazyLogits(Sequence):
    """`forward.logits(b)` for b = 0, 1, ... as a sequence: what `mean_kld(parent_logits=...)` takes."""

    def __init__(self, forward: Forward, branch: str | None = None):
        self.forward, self.branch = forward, branch

    def __len__(self) -> int:
        return len(self.forward.batches)

    def __getitem__(self, b):
        if not isinstance(b, int):
            raise TypeError("LazyLogits is indexed by batch number")
        return self.forward.logits(b, self.branch)


@torch.no_grad()
def run_layers(model: Transformer, chunks: torch.Tensor, *, batch_size: int = 8, observer: Observer | None = None,
               branches: Sequence[Branch] = (), budget: Budget | None = None,
               progress: Callable[[int, int], None] | None = None, until: int | None = None) -> Forward:
    """Run token `chunks` (N, T) through every layer of `model`, one layer at a time (see the module doc).

    `until` stops after layers 0 .. until-1 (a stage that needs only the first layers' inputs, e.g. BLD of a
    subset of layers); the returned states are then layer `until`'s inputs, not final hidden states.
    The caller closes the returned `Forward` (or lets it be collected) to free its activations."""
    budget = budget or Budget()
    observer = observer or Observer()
    n, seq_len = chunks.shape
    slices = batch_slices(n, batch_size)
    dtype = model.model.embed_tokens.weight.dtype
    hidden = model.arch.hidden_size
    main = budget.new([(s.stop - s.start, seq_len, hidden) for s in slices], dtype, model.device)
    ropes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(rows: int):
        if rows not in ropes:
            ropes[rows] = rope_for(model, rows, seq_len, dtype)
        return ropes[rows]

    for b, s in enumerate(slices):
        main[b] = model.model.embed_tokens(chunks[s].to(model.device))
    starting: dict[int, list[Branch]] = {}
    for br in branches:
        if not 0 <= br.layer < model.arch.num_layers:
            raise ValueError(f"branch {br.name}: layer {br.layer} outside the model")
        starting.setdefault(br.layer, []).append(br)
    running: dict[str, tuple[Branch, Activations]] = {}
    out = Forward(model, slices, main)
    last = model.arch.num_layers if until is None else max(0, min(until, model.arch.num_layers))
    for i in range(last):
        with layer(model, i) as block:
            for _br, acts in running.values():  # branches that left earlier: the parent's layer i carries them on
                for b in range(len(acts)):
                    acts[b] = block(acts[b], *rope(acts.shapes[b][0]), None, None, 0)
            for br in starting.get(i, ()):
                rows = n if br.rows is None else min(br.rows, n)
                parts = [(b, min(s.stop, rows) - s.start) for b, s in enumerate(slices) if s.start < rows]
                acts = budget.new([(r, seq_len, hidden) for _, r in parts], dtype, model.device)
                for b, r in parts:
                    acts[b] = br.run(block, main[b][:r], *rope(r))
                running[br.name] = (br, acts)
            handles = observer.attach(i, block)
            try:
                for b, s in enumerate(slices):
                    observer.before_batch(i, b)
                    x = main[b]
                    y = block(x, *rope(s.stop - s.start), None, None, 0)
                    observer.after_batch(i, b, x, y)
                    main[b] = y
            finally:
                for h in handles:
                    h.remove()
        out.layers_read += 1
        if progress is not None:
            progress(i + 1, last)
    out.branches = {name: acts for name, (_, acts) in running.items()}
    return out
