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

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tessera.errors import TesseraError

AttentionKind = Literal["gqa", "linear", "no_op"]
FFNKind = Literal["swiglu", "linear", "no_op"]

SUPPORTED_MODEL_TYPES = ("llama", "nemotron-nas")
# DeciLM derives the FFN width from ffn_mult as round_up(int(2 * mult * hidden / 3), 256).
NAS_FFN_MULTIPLE = 256


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
    def attention_params(self, i: int) -> int:
        att, h, d = self.blocks[i].attention, self.hidden_size, self.head_dim
        if att.kind == "no_op":
            return 0
        norm = h
        if att.kind == "linear":
            return h * h + norm
        q_and_o = 2 * h * self.num_attention_heads * d
        return q_and_o + 2 * h * att.num_kv_heads * d + norm

    def ffn_params(self, i: int) -> int:
        ffn, h = self.blocks[i].ffn, self.hidden_size
        if ffn.kind == "no_op":
            return 0
        if ffn.kind == "linear":
            return h * h + h
        return 3 * h * ffn.intermediate_size + h

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

    # ------------------------------------------------------------------ config.json round trip
    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict: plain Llama when homogeneous, nemotron-nas (DeciLM) otherwise."""
        cfg: dict[str, Any] = dict(self.extra)
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_layers,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_scaling_to_dict(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }
        if common["rope_scaling"] is None:  # absent, not null: transformers 5 warns on a null legacy key
            del common["rope_scaling"]
        cfg.update(common)
        if self.is_homogeneous:
            block = self.blocks[0]
            cfg.update(
                architectures=["LlamaForCausalLM"],
                model_type="llama",
                intermediate_size=block.ffn.intermediate_size,
                num_key_value_heads=block.attention.num_kv_heads,
            )
        else:
            cfg.update(
                architectures=["DeciLMForCausalLM"],
                model_type="nemotron-nas",
                intermediate_size=None,
                num_key_value_heads=None,
                block_configs=[self._block_to_nas(b) for b in self.blocks],
            )
        return dict(sorted(cfg.items()))

    def _block_to_nas(self, block: BlockSpec) -> dict[str, Any]:
        att, ffn = block.attention, block.ffn
        attention = {
            "n_heads_in_group": self.num_attention_heads // att.num_kv_heads if att.kind == "gqa" else None,
            "no_op": att.kind == "no_op",
            "replace_with_linear": att.kind == "linear",
        }
        ffn_cfg: dict[str, Any] = {
            "ffn_mult": None, "no_op": ffn.kind == "no_op", "replace_with_linear": ffn.kind == "linear",
        }
        if ffn.kind == "swiglu":
            mult = ffn_mult_for(ffn.intermediate_size, self.hidden_size)
            ffn_cfg["ffn_mult"] = mult
            if nas_ffn_width(mult, self.hidden_size) != ffn.intermediate_size:
                ffn_cfg["intermediate_size"] = ffn.intermediate_size
        return {"attention": attention, "ffn": ffn_cfg}

    @staticmethod
    def from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ArchSpec:
        """Parse a transformers / DeciLM config dict; raise TesseraError with a fix on anything unsupported."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or []
            raise TesseraError(
                f"{source}: unsupported architecture model_type={model_type!r} {archs}; tessera loads Llama-family "
                f"models (model_type 'llama' or 'nemotron-nas')"
            )
        try:
            hidden = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TesseraError(f"{source}: missing or invalid key {exc}; a Llama config needs hidden_size, "
                               "num_attention_heads, num_hidden_layers and vocab_size") from None
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise TesseraError(f"{source}: {flag}=true is not supported; tessera models have bias-free projections")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise TesseraError(f"{source}: hidden_act={act!r} is not supported; Llama-family models use 'silu'")
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        if model_type == "llama":
            kv = int(cfg.get("num_key_value_heads") or n_heads)
            if n_heads % kv:
                raise TesseraError(f"{source}: num_attention_heads={n_heads} is not divisible by "
                                   f"num_key_value_heads={kv}; fix num_key_value_heads")
            blocks = (BlockSpec.parent(kv, int(cfg["intermediate_size"])),) * n_layers
        else:
            raw = cfg.get("block_configs")
            if not isinstance(raw, list) or len(raw) != n_layers:
                got = len(raw) if isinstance(raw, list) else type(raw).__name__
                raise TesseraError(f"{source}: block_configs has {got} entries but num_hidden_layers={n_layers}; "
                                   "give exactly one block config per layer")
            blocks = tuple(_block_from_nas(b, i, n_heads, hidden, source) for i, b in enumerate(raw))
        theta, scaling = _parse_rope(cfg, source)
        known = set(_KNOWN_KEYS)
        extra = tuple(sorted((k, v) for k, v in cfg.items() if k not in known and not k.startswith("_")))
        return ArchSpec(
            vocab_size=vocab,
            hidden_size=hidden,
            num_attention_heads=n_heads,
            head_dim=head_dim,
            blocks=blocks,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            extra=extra,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_hf_config(), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_file(path: str | Path) -> ArchSpec:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise TesseraError(f"{path}: no such config file; pass a model directory containing config.json")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TesseraError(f"{path}: not valid JSON ({exc}); fix or regenerate the config") from None
        return ArchSpec.from_hf_config(cfg, source=str(path))

    def summary(self) -> dict[str, Any]:
        return {"layers": self.num_layers, "params": self.num_params(), "homogeneous": self.is_homogeneous,
                "blocks": [asdict(b) for b in self.blocks]}


# ---------------------------------------------------------------------- helpers
_KNOWN_KEYS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "head_dim", "hidden_act",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias",
    "architectures", "model_type", "intermediate_size", "num_key_value_heads", "block_configs",
    "transformers_version", "torch_dtype", "dtype", "auto_map", "quantization_config", "use_cache",
    "pretraining_tp", "initializer_range", "attention_dropout", "unk_token_id",
)


def nas_ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM / vLLM's rule: round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // NAS_FFN_MULTIPLE) * NAS_FFN_MULTIPLE


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float:
    """The ffn_mult that reproduces `intermediate_size` under the DeciLM rule when it can (multiples of 256)."""
    return round(1.5 * intermediate_size / hidden_size, 6)


def _block_from_nas(raw: Any, i: int, n_heads: int, hidden: int, source: str) -> BlockSpec:
    parts_ok = isinstance(raw, dict) and all(isinstance(raw.get(k, {}), dict) for k in ("attention", "ffn"))
    if not parts_ok:
        raise TesseraError(f"{source}: block_configs[{i}] must be an object with 'attention' and 'ffn' objects")
    att, ffn = raw.get("attention", {}), raw.get("ffn", {})
    if att.get("no_op"):
        attention = AttentionSpec("no_op")
    elif att.get("replace_with_linear"):
        attention = AttentionSpec("linear")
    else:
        group = att.get("n_heads_in_group")
        if not isinstance(group, int) or group < 1 or n_heads % group:
            raise TesseraError(f"{source}: block_configs[{i}].attention.n_heads_in_group={group!r} does not divide "
                               f"num_attention_heads={n_heads}; use a divisor of {n_heads}")
        attention = AttentionSpec("gqa", n_heads // group)
    for key in ("sparsify",):
        if att.get(key) or ffn.get(key):
            raise TesseraError(f"{source}: block_configs[{i}] uses '{key}', which tessera does not support")
    if att.get("window_length") not in (None,):
        raise TesseraError(f"{source}: block_configs[{i}].attention.window_length is set; sliding-window "
                           "attention is not supported")
    if ffn.get("no_op"):
        ffn_spec = FFNSpec("no_op")
    elif ffn.get("replace_with_linear"):
        ffn_spec = FFNSpec("linear")
    elif ffn.get("intermediate_size"):
        ffn_spec = FFNSpec("swiglu", int(ffn["intermediate_size"]))
    elif isinstance(ffn.get("ffn_mult"), (int, float)):
        ffn_spec = FFNSpec("swiglu", nas_ffn_width(float(ffn["ffn_mult"]), hidden))
    else:
        raise TesseraError(f"{source}: block_configs[{i}].ffn has neither ffn_mult nor intermediate_size; "
                           "give one, or set no_op / replace_with_linear")
    return BlockSpec(attention, ffn_spec)


def _parse_rope(cfg: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise TesseraError(f"{source}: rope_scaling type {rope_type!r} is not supported; tessera supports "
                           "'llama3' scaling (or none)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _rope_scaling_to_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return {
        "factor": scaling.factor,
        "high_freq_factor": scaling.high_freq_factor,
        "low_freq_factor": scaling.low_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
        "rope_type": "llama3",
    }


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
