"""A heterogeneous Llama in plain PyTorch, readable in one sitting.

Every layer has its own attention (GQA with any number of KV heads, one linear layer, or nothing) and its
own FFN (SwiGLU of any width, one linear layer, or nothing), as described by `tessera.arch.ArchSpec`.
Parameter names equal transformers' Llama / DeciLM names, so state dicts are drop-in:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight           (absent when attention is no_op)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   | model.layers.{i}.self_attn.linear_attn.weight
    model.layers.{i}.post_attention_layernorm.weight  (absent when the FFN is no_op)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    | model.layers.{i}.mlp.linear_mlp.weight
    model.norm.weight, lm_head.weight                 (lm_head shares embed_tokens when tied)

Batches are left-padded: `attention_mask` (B, T) is 1 for real tokens, 0 for padding. The KV cache is
static, allocated once per generation, and exists only for GQA layers (linear / no-op layers keep none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.arch import ArchSpec, BlockSpec, llama3_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the gain, exactly as transformers does (fused kernel).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class LayerCache:
    k: torch.Tensor  # (B, n_kv, max_len, hd)
    v: torch.Tensor


@dataclass
class CacheState:
    """Static KV cache for one generation: per-layer K/V (None for layers without attention state)."""

    layers: list[LayerCache | None]
    key_valid: torch.Tensor  # (B, max_len) bool: which cache slots hold real (non-pad) tokens
    next_pos: torch.Tensor  # (B,) rope position of the next token of each sequence
    length: int = 0  # slots filled so far (same for every sequence; pads fill slots too)

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]

    @property
    def all_valid(self) -> bool:
        return bool(self.key_valid[:, : self.length].all())

    def repeat(self, n: int) -> CacheState:
        """Copy each sequence's cache n times (e.g. to score n continuations of one shared context)."""
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        layers = [None if c is None else LayerCache(rep(c.k), rep(c.v)) for c in self.layers]
        return CacheState(layers, rep(self.key_valid), rep(self.next_pos), self.length)


class Attention(nn.Module):
    def __init__(self, arch: ArchSpec, num_kv_heads: int):
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.n_heads, self.n_kv, self.head_dim = arch.num_attention_heads, num_kv_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def forward(self, x, cos, sin, mask, cache: LayerCache | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            cache.k[:, :, start : start + T] = k
            cache.v[:, :, start : start + T] = v
            k, v = cache.k[:, :, : start + T], cache.v[:, :, : start + T]
        # GQA: each KV head serves a contiguous group of query heads (SDPA broadcasts, no copies).
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode_static(self, x, cos, sin, mask, k_cache, v_cache, slot) -> torch.Tensor:
        """One new token per sequence, written at cache index `slot` (a 1-element tensor); attends over the
        whole static cache under `mask`. Every shape is fixed, so torch.compile traces it once."""
        B = x.shape[0]
        q = self.q_proj(x).view(B, 1, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, 1, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, -1))


class LinearAttention(nn.Module):
    """Attention replaced by one hidden x hidden matrix (DeciLM `replace_with_linear`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear_attn = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, *_args) -> torch.Tensor:
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    """FFN replaced by one hidden x hidden matrix (DeciLM `replace_with_linear`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear_mlp = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class Block(nn.Module):
    def __init__(self, arch: ArchSpec, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        h, eps = arch.hidden_size, arch.rms_norm_eps
        att, ffn = spec.attention, spec.ffn
        # A no-op sub-block has neither weights nor layernorm; a linear one keeps its layernorm.
        self.input_layernorm = RMSNorm(h, eps) if att.kind != "no_op" else None
        if att.kind == "gqa":
            self.self_attn = Attention(arch, att.num_kv_heads)
        elif att.kind == "linear":
            self.self_attn = LinearAttention(h)
        else:
            self.self_attn = None
        self.post_attention_layernorm = RMSNorm(h, eps) if ffn.kind != "no_op" else None
        if ffn.kind == "swiglu":
            self.mlp = SwiGLU(h, ffn.intermediate_size)
        elif ffn.kind == "linear":
            self.mlp = LinearMLP(h)
        else:
            self.mlp = None

    def forward(self, x, cos, sin, mask, cache, start) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x

    def decode_static(self, x, cos, sin, mask, k_cache, v_cache, slot) -> torch.Tensor:
        if isinstance(self.self_attn, Attention):
            x = x + self.self_attn.decode_static(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, slot)
        elif self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Backbone(nn.Module):
    """Embedding, blocks and final norm: transformers' `model.` prefix."""

    def __init__(self, arch: ArchSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(Block(arch, spec) for spec in arch.blocks)
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class Transformer(nn.Module):
    """A causal LM. `forward` returns logits; `hidden` returns final-norm hidden states (for KD / scoring)."""

    def __init__(self, arch: ArchSpec):
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cache: CacheState | None = None
        self.tokenizer = None  # set by tessera.load; travels with the model

    # ------------------------------------------------------------------ cache
    def setup_cache(self, batch_size: int, max_len: int) -> CacheState:
        w = self.model.embed_tokens.weight
        layers = []
        for block in self.model.layers:
            att = block.self_attn
            if isinstance(att, Attention):
                shape = (batch_size, att.n_kv, max_len, att.head_dim)
                layers.append(LayerCache(torch.zeros(shape, dtype=w.dtype, device=w.device),
                                         torch.zeros(shape, dtype=w.dtype, device=w.device)))
            else:
                layers.append(None)
        valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=w.device)
        self.cache = CacheState(layers, valid, torch.zeros(batch_size, dtype=torch.long, device=w.device))
        return self.cache

    def reset_cache(self) -> None:
        self.cache = None

    # ------------------------------------------------------------------ forward
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               use_cache: bool = False, output_hidden_states: bool = False):
        """Final-norm hidden states (B, T, h); with output_hidden_states also every block's input and output."""
        B, T = input_ids.shape
        device = input_ids.device
        cache = self.cache if use_cache else None
        if use_cache and cache is None:
            raise RuntimeError("use_cache=True needs setup_cache() first")
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise RuntimeError(f"KV cache holds {cache.max_len} tokens; {start + T} requested")
        real = attention_mask.bool() if attention_mask is not None else None

        # Positions: count only real tokens, so left padding does not shift RoPE.
        if real is None:
            base = cache.next_pos[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
            positions = base + torch.arange(T, device=device)
        else:
            base = cache.next_pos[:, None] if cache is not None else 0
            positions = (base + real.long().cumsum(-1) - 1).clamp(min=0)

        # Mask: None lets SDPA use its causal fast path (no padding, nothing cached before).
        if cache is not None:
            cache.key_valid[:, start : start + T] = True if real is None else real
            key_valid = cache.key_valid[:, : start + T]
            need_mask = T > 1 and start > 0 or not bool(key_valid.all())
        else:
            key_valid = real
            need_mask = real is not None and not bool(real.all())
        mask = None
        if need_mask:
            q_idx = torch.arange(start, start + T, device=device)[:, None]
            k_idx = torch.arange(start + T, device=device)[None, :]
            allowed = (k_idx <= q_idx)[None] & key_valid[:, None, :]  # (B, T, S)
            allowed |= (k_idx == q_idx)[None]  # a pad query attends to itself, never to nothing (NaN)
            mask = allowed[:, None]  # (B, 1, T, S)
        elif cache is not None and start > 0 and T == 1:
            mask = None  # one new token attends to every cached slot: no mask needed

        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(positions, x.dtype)
        states = [x] if output_hidden_states else None
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache.layers[i] if cache is not None else None, start)
            if states is not None:
                states.append(x)
        if cache is not None:
            cache.length = start + T
            cache.next_pos = positions[:, -1] + 1
        x = self.model.norm(x)
        return (x, states) if output_hidden_states else x

    def decode_step(self, token: torch.Tensor, impl=None) -> torch.Tensor:
        """Logits (B, V) for one new token per sequence (B, 1) after a cached prefill; shape-static, so
        `impl=torch.compile(model._decode_static)` compiles once per cache shape (gpt-fast's trick)."""
        cache = self.cache
        slot = torch.full((1,), cache.length, dtype=torch.long, device=token.device)
        out = (impl or self._decode_static)(token, cache.next_pos, slot, cache.key_valid,
                                  [c.k if c is not None else None for c in cache.layers],
                                  [c.v if c is not None else None for c in cache.layers])
        cache.length += 1
        cache.next_pos = cache.next_pos + 1
        return out

    def _decode_static(self, token, next_pos, slot, key_valid, ks, vs) -> torch.Tensor:
        key_valid.index_fill_(1, slot, True)
        slots = torch.arange(key_valid.shape[1], device=token.device)
        mask = (key_valid & (slots <= slot))[:, None, None, :]  # (B, 1, 1, S)
        x = self.model.embed_tokens(token)
        cos, sin = self._rope(next_pos[:, None], x.dtype)
        for block, k, v in zip(self.model.layers, ks, vs):
            x = block.decode_static(x, cos, sin, mask, k, v, slot)
        return self.lm_head(self.model.norm(x))[:, -1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, last_only: bool = False, return_hidden: bool = False,
                return_states: bool = False):
        """Logits; with return_hidden also the final-norm hidden states, with return_states also every block's
        input and output (a list of L + 1 tensors, for layer-wise distillation through a DDP wrapper)."""
        if return_states:
            x, states = self.hidden(input_ids, attention_mask, use_cache, output_hidden_states=True)
        else:
            x, states = self.hidden(input_ids, attention_mask, use_cache), None
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        if return_states:
            return logits, x, states
        return (logits, x) if return_hidden else logits

    # ------------------------------------------------------------------ facts
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
