"""config.json <-> ArchSpec: plain Llama for homogeneous models, nemotron-nas (DeciLM) `block_configs` otherwise.

* homogeneous   -> `model_type: llama`, loadable by every tool;
* heterogeneous -> `model_type: nemotron-nas`, `architectures: [DeciLMForCausalLM]`, `auto_map` naming the
  configuration-only `configuration_decilm.py` that tessera's save writes beside it, top-level
  `intermediate_size` / `num_key_value_heads` null, one `{"attention": ..., "ffn": ...}` per layer
  (`n_heads_in_group`, `ffn_mult`, `no_op`, `replace_with_linear`), as vLLM, TensorRT-LLM and NVIDIA's
  checkpoints have it. A width that `ffn_mult` cannot express is written as `ffn.intermediate_size` too.

Unknown top-level keys are kept verbatim in `ArchSpec.extra` and written back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec, RopeScaling
from tessera.errors import TesseraError

SUPPORTED_MODEL_TYPES = ("llama", "nemotron-nas")
# Heterogeneous checkpoints carry this configuration-only file for `trust_remote_code` loaders (vLLM, AutoConfig).
DECILM_CONFIG_FILE = "configuration_decilm.py"
DECILM_AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
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
            auto_map=dict(DECILM_AUTO_MAP),
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


class _Fields:
    """Typed, range-checked reads of config fields; every problem is one line naming the field and its value."""

    def __init__(self, cfg: dict[str, Any], source: str, prefix: str = ""):
        self.cfg, self.source, self.prefix = cfg, source, prefix

    def fail(self, key: str, value: Any, problem: str) -> TesseraError:
        return TesseraError(f"{self.source}: {self.prefix}{key}: {value!r} {problem}; fix that field")

    def _get(self, key: str, required: bool, default: Any) -> Any:
        if key not in self.cfg or self.cfg[key] is None:
            if required:
                raise TesseraError(f"{self.source}: {self.prefix}{key} is missing; a Llama config needs it")
            return default
        return self.cfg[key]

    def int(self, key: str, *, required: bool = False, default: Any = None, minimum: int | None = 1) -> Any:
        value = self._get(key, required, default)
        if value is default and not required:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise self.fail(key, value, "is not an integer")
        if minimum is not None and value < minimum:
            raise self.fail(key, value, f"must be >= {minimum}")
        return int(value)

    def number(self, key: str, *, required: bool = False, default: Any = None, positive: bool = True) -> Any:
        value = self._get(key, required, default)
        if value is default and not required:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, value, "is not a number")
        if positive and value <= 0:
            raise self.fail(key, value, "must be a positive number")
        return float(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self._get(key, False, default)
        if not isinstance(value, bool):
            raise self.fail(key, value, "is not true or false")
        return value

    def object(self, key: str) -> dict[str, Any]:
        if key not in self.cfg:
            raise TesseraError(f"{self.source}: {self.prefix}{key} is missing; give an object (e.g. "
                               f"{_EXAMPLE.get(key, '{}')})")
        value = self.cfg[key]
        if not isinstance(value, dict):
            raise self.fail(key, value, "is not an object")
        return value

    def token_ids(self, key: str, vocab: int) -> Any:
        value = self.cfg.get(key)
        if value is None:
            return None
        ids = value if isinstance(value, list) else [value]
        if not ids or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise self.fail(key, value, f"is not a token id (or list of ids) in 0..{vocab - 1}")
        return value


_EXAMPLE = {"attention": '{"n_heads_in_group": 8} or {"no_op": true}',
            "ffn": '{"ffn_mult": 2.625} or {"no_op": true}'}


def from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ArchSpec:
    """Parse a transformers / DeciLM config dict. Every field tessera reads is checked for type and range; anything
    wrong or unsupported raises a one-line TesseraError naming the field, its value and the fix."""
    if not isinstance(cfg, dict):
        raise TesseraError(f"{source}: not a JSON object; a config.json holds one object of settings")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures") or []
        raise TesseraError(
            f"{source}: unsupported architecture model_type={model_type!r} {archs}; tessera loads Llama-family "
            f"models (model_type 'llama' or 'nemotron-nas')"
        )
    f = _Fields(cfg, source)
    hidden = f.int("hidden_size", required=True)
    n_heads = f.int("num_attention_heads", required=True)
    n_layers = f.int("num_hidden_layers", required=True)
    vocab = f.int("vocab_size", required=True)
    for flag in ("attention_bias", "mlp_bias"):
        if f.bool(flag):
            raise TesseraError(f"{source}: {flag}=true is not supported; tessera models have bias-free projections")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise TesseraError(f"{source}: hidden_act={act!r} is not supported; Llama-family models use 'silu'")
    head_dim = f.int("head_dim")
    if head_dim is None:
        if hidden % n_heads:
            raise TesseraError(f"{source}: hidden_size: {hidden} is not divisible by num_attention_heads={n_heads}; "
                               "give head_dim or fix one of them")
        head_dim = hidden // n_heads
    if head_dim % 2:
        raise f.fail("head_dim", head_dim, "is odd; rotary embeddings rotate pairs of dimensions, so it must be even")
    if model_type == "llama":
        kv = f.int("num_key_value_heads", default=n_heads)
        if n_heads % kv:
            raise TesseraError(f"{source}: num_attention_heads={n_heads} is not divisible by "
                               f"num_key_value_heads={kv}; fix num_key_value_heads")
        blocks = (BlockSpec.parent(kv, f.int("intermediate_size", required=True)),) * n_layers
    else:
        raw = cfg.get("block_configs")
        if not isinstance(raw, list) or len(raw) != n_layers:
            got = len(raw) if isinstance(raw, list) else type(raw).__name__
            raise TesseraError(f"{source}: block_configs has {got} entries but num_hidden_layers={n_layers}; "
                               "give exactly one block config per layer")
        blocks = tuple(_block_from_nas(b, i, n_heads, hidden, source) for i, b in enumerate(raw))
    theta, scaling = _parse_rope(f)
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
        rms_norm_eps=f.number("rms_norm_eps", default=1e-5),
        max_position_embeddings=f.int("max_position_embeddings", default=2048),
        tie_word_embeddings=f.bool("tie_word_embeddings"),
        bos_token_id=f.token_ids("bos_token_id", vocab),
        eos_token_id=f.token_ids("eos_token_id", vocab),
        pad_token_id=f.token_ids("pad_token_id", vocab),
        extra=extra,
    )


def decilm_config_source() -> str:
    """The text of `configuration_decilm.py`, the configuration class a heterogeneous checkpoint carries."""
    return (Path(__file__).with_name(DECILM_CONFIG_FILE)).read_text()


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
    if not isinstance(raw, dict):
        raise TesseraError(f"{source}: block_configs[{i}]: {raw!r} is not an object with 'attention' and 'ffn' "
                           "objects; fix that block")
    block = _Fields(raw, source, f"block_configs[{i}].")
    att = _Fields(block.object("attention"), source, f"block_configs[{i}].attention.")
    ffn = _Fields(block.object("ffn"), source, f"block_configs[{i}].ffn.")
    for part, name in ((att, "attention"), (ffn, "ffn")):
        if part.bool("no_op") and part.bool("replace_with_linear"):
            raise TesseraError(f"{source}: block_configs[{i}].{name} sets both no_op and replace_with_linear; "
                               "choose one")
        if part.cfg.get("sparsify"):
            raise TesseraError(f"{source}: block_configs[{i}] uses 'sparsify', which tessera does not support")
    if att.cfg.get("window_length") is not None:
        raise TesseraError(f"{source}: block_configs[{i}].attention.window_length is set; sliding-window "
                           "attention is not supported")
    if att.bool("no_op"):
        attention = AttentionSpec("no_op")
    elif att.bool("replace_with_linear"):
        attention = AttentionSpec("linear")
    else:
        group = att.int("n_heads_in_group", required=True)
        if n_heads % group:
            raise TesseraError(f"{source}: block_configs[{i}].attention.n_heads_in_group={group!r} does not divide "
                               f"num_attention_heads={n_heads}; use a divisor of {n_heads}")
        attention = AttentionSpec("gqa", n_heads // group)
    width, mult = ffn.int("intermediate_size"), ffn.number("ffn_mult")  # type- and range-checked when present
    if ffn.bool("no_op"):
        ffn_spec = FFNSpec("no_op")
    elif ffn.bool("replace_with_linear"):
        ffn_spec = FFNSpec("linear")
    elif width is not None:
        ffn_spec = FFNSpec("swiglu", width)
    elif mult is not None:
        ffn_spec = FFNSpec("swiglu", nas_ffn_width(mult, hidden))
    else:
        raise TesseraError(f"{source}: block_configs[{i}].ffn has neither ffn_mult nor intermediate_size; "
                           "give one, or set no_op / replace_with_linear")
    return BlockSpec(attention, ffn_spec)


def _parse_rope(f: _Fields) -> tuple[float, RopeScaling | None]:
    cfg, source = f.cfg, f.source
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise f.fail("rope_parameters", params, "is not an object")
    if cfg.get("rope_theta") is not None:
        theta = f.number("rope_theta")
    else:
        theta = _Fields(params, source, "rope_parameters.").number("rope_theta", default=10000.0)
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling, key = params, "rope_parameters"
    else:
        key = "rope_scaling"
    if scaling is None:
        return theta, None
    if not isinstance(scaling, dict):
        raise f.fail(key, scaling, "is not an object")
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise TesseraError(f"{source}: rope_scaling type {rope_type!r} is not supported; tessera supports "
                           "'llama3' scaling (or none)")
    s = _Fields(scaling, source, f"{key}.")
    low, high = s.number("low_freq_factor", default=1.0), s.number("high_freq_factor", default=4.0)
    if high <= low:
        raise s.fail("high_freq_factor", scaling["high_freq_factor"], f"must exceed low_freq_factor={low:g}")
    return theta, RopeScaling(
        factor=s.number("factor", required=True),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_position_embeddings=s.int("original_max_position_embeddings", default=8192),
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
