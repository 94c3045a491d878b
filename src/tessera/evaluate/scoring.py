"""Loglikelihood engine: log P(continuation | context) and whether the continuation is the greedy completion.

Tokenisation follows lm-eval: the context and context+continuation are encoded, and the continuation tokens
are what the whole adds after the context's tokens (so BPE merges across the boundary are respected). Two
paths, same numbers:
* shared context (multiple choice): the context runs once through the KV cache; the cache is forked once per
  choice and only the continuations run, all choices in one batch. The context's leading tokens shared with the
  previous item's context (MMLU's 5-shot prompt of one subject, TruthfulQA's 6-shot primer) are copied from that
  item's cache instead of being recomputed, so callers order items by context;
* different contexts (winogrande, lambada): full sequences, left-padded and batched across items.
In both, `lm_head` runs only at the positions that predict continuation tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tessera.generate import left_pad
from tessera.model import CacheState, Transformer

MIN_REUSE = 16  # shortest shared token prefix worth copying from the previous context's cache


@dataclass(frozen=True)
class Score:
    loglik: float  # sum of log-probabilities of the continuation tokens
    is_greedy: bool  # every continuation token is the argmax
    n_tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encode_pair: trailing context spaces move to the continuation; split the joint encoding into
    (context tokens, continuation tokens)."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = encode(context) if context else []
    whole = encode(context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(continuation)


class Scorer:
    def __init__(self, model: Transformer, batch_size: int = 16):
        if model.tokenizer is None:
            from tessera.errors import TesseraError

            raise TesseraError("evaluation needs a tokenizer; load the model from a directory with tokenizer files")
        self.model, self.tok, self.batch_size = model, model.tokenizer, batch_size
        self._last: tuple[list[int], CacheState] | None = None  # previous shared context and its KV cache

    def clear(self) -> None:
        """Forget the previous context's cache (call after changing the model's weights)."""
        self._last = None

    def _reuse_prefix(self, ctx: list[int]) -> int:
        """Copy the K/V of the longest token prefix `ctx` shares with the previous context into the fresh cache;
        return its length. At least one token is left to run, for the hidden state predicting the continuation."""
        if self._last is None:
            return 0
        prev, prev_cache = self._last
        n = 0
        limit = min(len(prev), len(ctx) - 1)
        while n < limit and prev[n] == ctx[n]:
            n += 1
        if n < MIN_REUSE:
            return 0
        cache = self.model.cache
        for dst, src in zip(cache.layers, prev_cache.layers):
            if dst is not None:
                dst.k[:, :, :n] = src.k[:, :, :n]
                dst.v[:, :, :n] = src.v[:, :, :n]
        cache.key_valid[:, :n] = True
        cache.next_pos[:] = n
        cache.length = n
        return n

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tok, context, continuation)

    def _prefix(self, ctx: list[int]) -> list[int]:
        # An empty context is conditioned on the end-of-text token, as lm-eval does.
        if ctx:
            return ctx
        eos = self.model.arch.eos_token_ids
        return [eos[0] if eos else 0]

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score_shared(self, context: str, continuations: Sequence[str]) -> list[Score]:
        """All continuations of one context: context once (KV cache), continuations as one batch."""
        pairs = [self.split(context, c) for c in continuations]
        ctx = self._prefix(pairs[0][0])
        if any(p[0] != pairs[0][0] for p in pairs):  # a boundary merge changed the context tokens
            return self.score_pairs([(context, c) for c in continuations])
        conts = [p[1] for p in pairs]
        model = self.model
        width = max(len(c) for c in conts)
        model.setup_cache(1, len(ctx) + width)
        try:
            reused = self._reuse_prefix(ctx)
            h = model.hidden(torch.tensor([ctx[reused:]], device=model.device), use_cache=True)
            first = torch.log_softmax(model.lm_head(h[0, -1]).float(), -1)  # predicts each continuation's 1st token
            self._last = (ctx, model.cache)  # the forks below are copies: this cache stays as the context left it
            model.cache = model.cache.repeat(len(conts))
            batch = torch.zeros(len(conts), width, dtype=torch.long)
            for i, c in enumerate(conts):
                batch[i, : len(c)] = torch.tensor(c)  # right padding: later positions are never read
            h = model.hidden(batch.to(model.device), use_cache=True) if width > 1 else None
        finally:
            model.reset_cache()
        scores = []
        for i, c in enumerate(conts):
            target = torch.tensor(c, device=model.device)
            lp = [first]
            if len(c) > 1:
                lp.append(torch.log_softmax(model.lm_head(h[i, : len(c) - 1]).float(), -1))
            logprobs = torch.cat([x.view(-1, x.shape[-1]) for x in lp])  # (len(c), V)
            scores.append(self._score(logprobs, target))
        return scores

    @torch.inference_mode()
    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Score]:
        """Independent (context, continuation) pairs, batched as full left-padded sequences."""
        encoded = []
        for ctx, cont in pairs:
            c, t = self.split(ctx, cont)
            encoded.append((self._prefix(c), t))
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
        out: list[Score | None] = [None] * len(encoded)
        model = self.model
        pad = model.arch.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs = [(encoded[i][0] + encoded[i][1])[-model.arch.max_position_embeddings:] for i in idx]
            ids, mask = left_pad(seqs, pad, model.device)
            h = model.hidden(ids, attention_mask=mask)
            for row, i in enumerate(idx):
                n = len(encoded[i][1])
                logprobs = torch.log_softmax(model.lm_head(h[row, -n - 1:-1]).float(), -1)
                out[i] = self._score(logprobs, torch.tensor(encoded[i][1], device=model.device))
        return out  # type: ignore[return-value]

    @staticmethod
    def _score(logprobs: torch.Tensor, target: torch.Tensor) -> Score:
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((logprobs.argmax(-1) == target).all())
        return Score(float(picked.double().sum()), greedy, int(target.numel()))
