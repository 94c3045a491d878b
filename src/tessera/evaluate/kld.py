"""KL divergence of a child to its parent: the metric Puzzle scores blocks with and distillation reports.

KL(parent || child) per token = sum_v p(v) (log p(v) - log q(v)), computed in fp32 from log-softmax so it is
exact (no sampling, no top-k truncation). Top-1 agreement is the fraction of positions where both argmaxes
agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.model import Transformer


def kl_per_token(parent_logits: torch.Tensor, child_logits: torch.Tensor) -> torch.Tensor:
    """KL(parent || child) for each position: (..., V) logits -> (...) nats."""
    logp = torch.log_softmax(parent_logits.float(), dim=-1)
    logq = torch.log_softmax(child_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass(frozen=True)
class KLDResult:
    kld: float  # mean per-token KL(parent || child), nats
    top1: float  # fraction of positions where argmaxes agree
    tokens: int

    def as_dict(self) -> dict:
        return {"kld": self.kld, "top1_agreement": self.top1, "tokens": self.tokens}


@torch.inference_mode()
def mean_kld(parent: Transformer, child: Transformer, chunks: torch.Tensor, batch_size: int = 8,
             parent_logits: list[torch.Tensor] | None = None) -> KLDResult:
    """Mean per-token KL(parent || child) and top-1 agreement over token chunks (N, L), every position.

    `parent_logits` (one tensor per batch, as returned by `parent_logits_for`) skips the parent's forward
    passes when one parent is compared with many children. A streamed model (`tessera.stream`) runs layer by
    layer over all chunks first and its logits are computed per batch from its final hidden states, so the
    numbers are those of the model loaded whole.
    """
    if parent.arch.vocab_size != child.arch.vocab_size:
        from tessera.errors import TesseraError

        raise TesseraError(f"parent vocabulary ({parent.arch.vocab_size}) differs from child's "
                           f"({child.arch.vocab_size}); KLD needs models that share a tokenizer")
    from tessera.stream import is_streamed

    if parent_logits is None and is_streamed(parent):
        parent_logits = parent_logits_for(parent, chunks, batch_size)
    child_logits = parent_logits_for(child, chunks, batch_size) if is_streamed(child) else None
    total_kl, agree, count = 0.0, 0, 0
    for b, start in enumerate(range(0, len(chunks), batch_size)):
        ids = chunks[start:start + batch_size].to(child.device)
        p = parent_logits[b] if parent_logits is not None else parent(ids.to(parent.device))
        q = child_logits[b] if child_logits is not None else child(ids)
        total_kl += kl_per_token(p, q).double().sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        count += ids.numel()
    return KLDResult(kld=total_kl / max(count, 1), top1=agree / max(count, 1), tokens=count)


@torch.inference_mode()
def parent_logits_for(parent: Transformer, chunks: torch.Tensor, batch_size: int = 8) -> Sequence[torch.Tensor]:
    """The parent's logits per batch, to reuse across many `mean_kld` calls (memory: N*L*V floats). For a streamed
    parent, its final hidden states (N*L*hidden) after one layer-by-layer pass, turned into logits batch by batch."""
    from tessera.stream import LazyLogits, is_streamed, run_layers

    if is_streamed(parent):
        return LazyLogits(run_layers(parent, chunks, batch_size=batch_size))
    return [parent(chunks[s:s + batch_size].to(parent.device)) for s in range(0, len(chunks), batch_size)]
