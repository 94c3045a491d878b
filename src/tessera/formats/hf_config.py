"""config.json <-> ArchSpec: plain Llama for homogeneous models, nemotron-nas (DeciLM) `block_configs` otherwise.

* homogeneous   -> `model_type: llama`, loadable by every tool;
* heterogeneous -> `model_type: nemotron-nas`, `architectures: [DeciLMForCausalLM]`, top-level
  `intermediate_size` / `num_key_value_heads` null, one `{"attention": ..., "ffn": ...}` per layer
  (`n_heads_in_group`, `ffn_mult`, `no_op`, `replace_with_linear`), as vLLM, TensorRT-LLM and NVIDIA's
  checkpoints have it. A width that `ffn_mult` cannot express is written as `ffn.intermediate_size` too.

Unknown top-level keys are kept verbatim in `ArchSpec.extra` and written back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec, RopeScaling
from tessera.errors import TesseraError

SUPPORTED_MODEL_TYPES = ("llama", "nemotron-nas")
# DeciLM derives the FFN width from ffn_mult as round_up(int(2 * mult * hidden / 3), 256).
NAS_FFN_MULTIPLE = 256


def to_hf_config(arch: ArchSpec) -> dict[str, Any]:
    """A config.json dict: plain Llama when homogeneous, nemotron-nas (DeciLM) otherwise."""
    cfg: dict[str, Any] = dict(arch.extra)
    common = {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": _rope_scaling_to_dict(arch.rope_scaling),
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": list(arch.eos_token_id) if isinstance(arch.eos_token_id, tuple) else arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if common["rope_scaling"] is None:  # absent, not null: transformers 5 warns on a null legacy key
        del common["rope_scaling"]
    cfg.update(common)
    if arch.is_homogeneous:
        block = arch.blocks[0]
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
            block_configs=[_block_to_nas(arch, b) for b in arch.blocks],
        )
    return dict(sorted(cfg.items()))


def _block_to_nas(arch: ArchSpec, block: BlockSpec) -> dict[str, Any]:
    att, ffn = block.attention, block.ffn
    attention = {
        "n_heads_in_group": arch.num_attention_heads // att.num_kv_heads if att.kind == "gqa" else None,
        "no_op": att.kind == "no_op",
        "replace_with_linear": att.kind == "linear",
    }
    ffn_cfg: dict[str, Any] = {
        "ffn_mult": None, "no_op": ffn.kind == "no_op", "replace_with_linear": ffn.kind == "linear",
    }
    if ffn.kind == "swiglu":
        mult = ffn_mult_for(ffn.intermediate_size, arch.hidden_size)
        ffn_cfg["ffn_mult"] = mult
        if nas_ffn_width(mult, arch.hidden_size) != ffn.intermediate_size:
            ffn_cfg["intermediate_size"] = ffn.intermediate_size
    return {"attention": attention, "ffn": ffn_cfg}


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


def config_json(arch: ArchSpec) -> str:
    """config.json text for `arch`."""
    return json.dumps(to_hf_config(arch), indent=2, sort_keys=True) + "\n"


def read_config(path: str | Path) -> ArchSpec:
    """The ArchSpec of a model directory's config.json (or of a config file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise TesseraError(f"{path}: no such config file; pass a model directory containing config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TesseraError(f"{path}: not valid JSON ({exc}); fix or regenerate the config") from None
    return from_hf_config(cfg, source=str(path))


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
