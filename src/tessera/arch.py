"""Architecture spec: the global shape of a Llama-family model plus one block spec per layer.

`ArchSpec` is the single description every stage reads and writes (model construction, pruning,
Puzzle NAS, the cost model). It round-trips to `config.json`:

* homogeneous  -> a plain Llama config (`model_type: llama`), loadable by every tool;
* heterogeneous -> the DeciLM / Nemotron-NAS format (`model_type: nemotron-nas`, `block_configs`),
  which vLLM, TensorRT-LLM and (after `import tessera`) transformers load.

Attention variants: GQA with any number of KV heads | `linear` (one hidden x hidden matrix) | `no_op`.
FFN variants:       SwiGLU with any width              | `linear`                             | `no_op`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from tessera.errors import TesseraError

AttentionKind = Literal["gqa", "linear", "no_op"]
FFNKind = Literal["swiglu", "linear", "no_op"]



@dataclass(frozen=True)
class AttentionSpec:
    kind: AttentionKind = "gqa"
    num_kv_heads: int | None = None  # only for kind == "gqa"

    def __post_init__(self):
        if self.kind not in ("gqa", "linear", "no_op"):
            raise TesseraError(f"unknown attention kind {self.kind!r}; use 'gqa', 'linear' or 'no_op'")
        if self.kind == "gqa" and (self.num_kv_heads is None or self.num_kv_heads < 1):
            raise TesseraError(f"GQA attention needs num_kv_heads >= 1, got {self.num_kv_heads}")
        if self.kind != "gqa" and self.num_kv_heads is not None:
            object.__setattr__(self, "num_kv_heads", None)

    def describe(self) -> str:
        return f"gqa(kv={self.num_kv_heads})" if self.kind == "gqa" else self.kind


@dataclass(frozen=True)
class FFNSpec:
    kind: FFNKind = "swiglu"
    intermediate_size: int | None = None  # only for kind == "swiglu"

    def __post_init__(self):
        if self.kind not in ("swiglu", "linear", "no_op"):
            raise TesseraError(f"unknown FFN kind {self.kind!r}; use 'swiglu', 'linear' or 'no_op'")
        if self.kind == "swiglu" and (self.intermediate_size is None or self.intermediate_size < 1):
            raise TesseraError(f"SwiGLU FFN needs intermediate_size >= 1, got {self.intermediate_size}")
        if self.kind != "swiglu" and self.intermediate_size is not None:
            object.__setattr__(self, "intermediate_size", None)

    def describe(self) -> str:
        return f"swiglu({self.intermediate_size})" if self.kind == "swiglu" else self.kind


@dataclass(frozen=True)
class BlockSpec:
    attention: AttentionSpec
    ffn: FFNSpec

    @staticmethod
    def parent(num_kv_heads: int, intermediate_size: int) -> BlockSpec:
        return BlockSpec(AttentionSpec("gqa", num_kv_heads), FFNSpec("swiglu", intermediate_size))

    def describe(self) -> str:
        return f"{self.attention.describe()} + {self.ffn.describe()}"


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Llama 3.1+). Other rope types are rejected at parse time."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ArchSpec:
    # --- global shape
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    head_dim: int
    blocks: tuple[BlockSpec, ...]
    # --- positions and normalisation
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # --- embeddings and special tokens
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)  # unknown config keys kept verbatim

    def __post_init__(self):
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise TesseraError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.blocks:
            raise TesseraError("an architecture needs at least one layer (blocks is empty)")
        for i, block in enumerate(self.blocks):
            kv = block.attention.num_kv_heads
            if kv is not None and self.num_attention_heads % kv != 0:
                raise TesseraError(
                    f"layer {i}: {self.num_attention_heads} attention heads are not divisible by {kv} KV heads; "
                    f"choose a KV-head count that divides {self.num_attention_heads}"
                )

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def llama(
        *,
        vocab_size: int,
        hidden_size: int,
        num_layers: int,
        num_attention_heads: int,
        num_kv_heads: int,
        intermediate_size: int,
        head_dim: int | None = None,
        **kwargs,
    ) -> ArchSpec:
        """A homogeneous Llama: every layer GQA(num_kv_heads) + SwiGLU(intermediate_size)."""
        block = BlockSpec.parent(num_kv_heads, intermediate_size)
        return ArchSpec(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            head_dim=head_dim or hidden_size // num_attention_heads,
            blocks=(block,) * num_layers,
            **kwargs,
        )

    # ------------------------------------------------------------------ derived facts
    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_homogeneous(self) -> bool:
        first = self.blocks[0]
        return first.attention.kind == "gqa" and first.ffn.kind == "swiglu" and all(b == first for b in self.blocks)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def with_blocks(self, blocks) -> ArchSpec:
        return replace(self, blocks=tuple(blocks))

    def replace_block(self, index: int, block: BlockSpec) -> ArchSpec:
        blocks = list(self.blocks)
        blocks[index] = block
        return self.with_blocks(blocks)

    # parameter accounting (exact: matches the weights the model allocates)
    def attention_matmul_params(self, att: AttentionSpec) -> int:
        """Weights of the matrices of an attention sub-block of this shape (q, k, v, o; or the linear map), no norm."""
        h, d = self.hidden_size, self.head_dim
        if att.kind == "no_op":
            return 0
        if att.kind == "linear":
            return h * h
        return 2 * h * self.num_attention_heads * d + 2 * h * att.num_kv_heads * d

    def ffn_matmul_params(self, ffn: FFNSpec) -> int:
        """Weights of the matrices of an FFN sub-block of this shape (gate, up, down; or the linear map), no norm."""
        h = self.hidden_size
        if ffn.kind == "no_op":
            return 0
        if ffn.kind == "linear":
            return h * h
        return 3 * h * ffn.intermediate_size

    def attention_params(self, i: int) -> int:
        att = self.blocks[i].attention
        return 0 if att.kind == "no_op" else self.attention_matmul_params(att) + self.hidden_size  # + its norm

    def ffn_params(self, i: int) -> int:
        ffn = self.blocks[i].ffn
        return 0 if ffn.kind == "no_op" else self.ffn_matmul_params(ffn) + self.hidden_size  # + its norm

    def block_params(self, i: int) -> int:
        return self.attention_params(i) + self.ffn_params(i)

    def embedding_params(self) -> int:
        """Input embedding + final norm + (untied) output head."""
        emb = self.vocab_size * self.hidden_size
        return emb + self.hidden_size + (0 if self.tie_word_embeddings else emb)

    def num_params(self) -> int:
        return self.embedding_params() + sum(self.block_params(i) for i in range(self.num_layers))

    def non_embedding_params(self) -> int:
        return sum(self.block_params(i) for i in range(self.num_layers))

    def kv_heads(self, i: int) -> int:
        return self.blocks[i].attention.num_kv_heads or 0

    def kv_cache_bytes_per_token(self, bytes_per_element: float = 2.0, layer: int | None = None) -> float:
        """K and V bytes one token occupies in the cache (one layer, or all layers)."""
        layers = range(self.num_layers) if layer is None else (layer,)
        return sum(2 * self.kv_heads(i) * self.head_dim * bytes_per_element for i in layers)

    def layer_rows(self, kv_bytes: float = 2.0) -> list[dict[str, Any]]:
        """One row per layer: attention and FFN kind, KV heads, FFN width, parameters, KV bytes per token."""
        return [{"layer": i, "attention": b.attention.kind, "kv_heads": self.kv_heads(i), "ffn": b.ffn.kind,
                 "ffn_width": b.ffn.intermediate_size or 0, "params": self.block_params(i),
                 "kv_bytes_per_token": self.kv_cache_bytes_per_token(kv_bytes, layer=i)}
                for i, b in enumerate(self.blocks)]

    def summary(self) -> dict[str, Any]:
        return {"layers": self.num_layers, "params": self.num_params(), "homogeneous": self.is_homogeneous,
                "blocks": [asdict(b) for b in self.blocks]}


def llama3_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None):
    """RoPE inverse frequencies, with llama3 scaling applied (same maths as transformers)."""
    import torch

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)
