"""Batched generation over the static KV cache: greedy or sampled, with stop tokens and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tessera.model import Transformer

CACHE_BUCKET = 256


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of shape (B, T), prompts aligned to the right so new tokens share one column."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (), seed: int | None = None,
             compile: bool = False) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each.

    A stop token ends a row and is not returned. A stop string (lm-eval's `until`, e.g. "Question:") ends a row
    at the token that completes it, which is returned: a token may straddle the string, so cut the decoded text
    with `cut_at_stop_strings`. compile=True runs the decode step through torch.compile (one compilation per batch
    size and cache length; worth it for long generations, not for a handful of tokens).
    """
    stops = torch.tensor(sorted(set(stop_tokens if stop_tokens is not None else model.arch.eos_token_ids)),
                         dtype=torch.long, device=model.device)
    if stop_strings and model.tokenizer is None:
        raise ValueError("stop_strings need the model's tokenizer; load it with tessera.load")
    pad_id = model.arch.pad_token_id if model.arch.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id, model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    batch = ids.shape[0]
    ends = [max_new_tokens] * batch  # where each row's returned tokens end
    # Cache lengths are rounded up so repeated generations reuse one compiled decode graph.
    model.setup_cache(batch, -(-(ids.shape[1] + max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET)
    step = compiled_decode_step(model) if compile else model.decode_step
    try:
        logits = model(ids, attention_mask=mask, use_cache=True, last_only=True)[:, -1]
        out = torch.empty(batch, 0, dtype=torch.long, device=model.device)
        done = torch.zeros(batch, dtype=torch.bool, device=model.device)
        for i in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)
            token = torch.where(done, pad_id, token)
            out = torch.cat([out, token[:, None]], dim=1)
            stopped = ~done & torch.isin(token, stops)
            for row in torch.nonzero(stopped).flatten().tolist():
                ends[row] = i
            done |= stopped
            if stop_strings:
                for row in torch.nonzero(~done).flatten().tolist():
                    # Only the tail can hold a string completed by this token: decode a short window.
                    tail = model.tokenizer.decode(out[row, -32:].tolist(), skip_special_tokens=True)
                    if any(s in tail for s in stop_strings):
                        ends[row], done[row] = i + 1, True
            if i == max_new_tokens - 1 or bool(done.all()):
                break  # no forward pass for a token nobody will read
            logits = step(token[:, None])
    finally:
        model.reset_cache()
    return [row[:end] for row, end in zip(out.tolist(), ends)]


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first of any stop string (what lm-eval's `until` keeps)."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


def compiled_decode_step(model: Transformer, mode: str | None = None):
    """model.decode_step with its shape-static core under torch.compile (cached on the model for reuse).

    mode="reduce-overhead" adds CUDA graphs on GPU (the cache tensors are static, so replay is safe).
    """
    key = f"_compiled_decode_{mode}"
    if getattr(model, key, None) is None:
        setattr(model, key, torch.compile(model._decode_static, dynamic=False, mode=mode))
    compiled = getattr(model, key)
    return lambda token: model.decode_step(token, impl=compiled)


class CudaGraphDecode:
    """The shape-static decode step captured once as a CUDA graph for the current KV cache, then replayed.

    Removes all per-token host overhead without a compiler. Capture happens at the next free cache slot, so the
    warm-up writes land exactly where the first real step writes. Valid until the cache is set up again.
    """

    def __init__(self, model: Transformer):
        cache = model.cache
        if cache is None or model.device.type != "cuda":
            raise RuntimeError("CUDA-graph decoding needs a CUDA model with a KV cache set up")
        self.model, self.cache = model, cache
        batch, device = cache.key_valid.shape[0], model.device
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = cache.next_pos.clone()
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=device)
        ks = [c.k if c is not None else None for c in cache.layers]
        vs = [c.v if c is not None else None for c in cache.layers]
        run = lambda: model._decode_static(self.token, self.pos, self.slot, cache.key_valid, ks, vs)  # noqa: E731
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run()

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        self.token.copy_(token)
        self.pos.copy_(cache.next_pos)
        self.slot.fill_(cache.length)
        self.graph.replay()
        cache.length += 1
        cache.next_pos = cache.next_pos + 1
        return self.out.clone()


def generate_text(model: Transformer, prompt: str | Sequence[str], max_new_tokens: int = 32, *,
                  chat: bool = False, **kwargs) -> str | list[str]:
    """Tokenize, generate and decode with the model's own tokenizer."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer; load it with tessera.load or pass token ids to generate()")
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if chat and getattr(tok, "chat_template", None):
        encoded = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False) for t in texts]
    else:
        encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    new = generate(model, encoded, max_new_tokens, **kwargs)
    decoded = [tok.decode(n, skip_special_tokens=True) for n in new]
    return decoded[0] if isinstance(prompt, str) else decoded
