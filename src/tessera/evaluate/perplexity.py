"""Perplexity of a text with a sliding window (transformers' / lm-eval's rolling semantics).

Windows of `max_len` tokens advance by `stride`; each token is scored exactly once, with as much preceding
context as the window allows (stride < max_len gives every scored token at least max_len - stride of context).
The first token is conditioned on the end-of-text token, as lm-eval's loglikelihood_rolling does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tessera.errors import TesseraError
from tessera.model import Transformer


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # total negative log-likelihood, nats
    tokens: int
    bits_per_byte: float | None = None

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "bits_per_byte": self.bits_per_byte}


@torch.inference_mode()
def rolling_nll(model: Transformer, ids: list[int], max_len: int | None = None, stride: int | None = None) -> float:
    """Total negative log-likelihood of `ids` (every token scored once)."""
    max_len = max_len or min(model.arch.max_position_embeddings, 2048)
    stride = stride or max_len
    if not 0 < stride <= max_len:
        raise TesseraError(f"stride must be in 1..{max_len} (the window), got {stride}")
    eos = model.arch.eos_token_ids
    seq = [eos[0] if eos else 0] + list(ids)  # position 0 only conditions the first real token
    total, scored_upto = 0.0, 1  # seq[:scored_upto] already scored (seq[0] is never a target)
    begin = 0
    while scored_upto < len(seq):
        end = min(begin + max_len + 1, len(seq))  # window of inputs seq[begin:end-1] predicting seq[begin+1:end]
        window = torch.tensor([seq[begin:end]], device=model.device)
        n_new = end - scored_upto
        h = model.hidden(window[:, :-1])[0, -n_new:]
        logprobs = torch.log_softmax(model.lm_head(h).float(), -1)
        targets = window[0, -n_new:]
        total -= float(logprobs.gather(-1, targets[:, None]).double().sum())
        scored_upto = end
        begin = min(begin + stride, max(len(seq) - max_len - 1, 0)) if end < len(seq) else begin
    return total


def perplexity(model: Transformer, text: str, max_len: int | None = None, stride: int | None = None) -> PerplexityResult:
    from tessera.data import tokenize

    ids = tokenize(model.tokenizer, text).tolist()
    return perplexity_of_ids(model, ids, max_len, stride, n_bytes=len(text.encode("utf-8")))


def perplexity_of_ids(model: Transformer, ids: list[int], max_len: int | None = None, stride: int | None = None,
                      n_bytes: int | None = None) -> PerplexityResult:
    """Perplexity of token ids; bits per byte of `n_bytes` (default: the bytes of the decoded ids)."""
    if not ids:
        raise TesseraError("the text is empty; perplexity needs at least one token")
    nll = rolling_nll(model, ids, max_len, stride)
    if n_bytes is None and model.tokenizer is not None:
        n_bytes = len(model.tokenizer.decode(ids).encode("utf-8"))
    return PerplexityResult(math.exp(nll / len(ids)), nll, len(ids), nll / math.log(2) / n_bytes if n_bytes else None)
