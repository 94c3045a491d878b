"""DeciLM (nemotron-nas) configuration for `trust_remote_code` loaders: vLLM, `AutoConfig`, TensorRT-LLM.

Written by tessera beside the config.json of every heterogeneous checkpoint, named by its
`auto_map: {"AutoConfig": "configuration_decilm.DeciLMConfig"}`. Configuration only: no model code, no imports
beyond transformers. It derives from `PretrainedConfig` (not `LlamaConfig`, whose validation rejects the null
`intermediate_size` / `num_key_value_heads` of a heterogeneous model), keeps those two null, and gives every
`block_configs` entry attribute access (`config.block_configs[i].attention.no_op`), which is how vLLM reads them.
`import tessera` does not use this file: tessera registers its own classes and never runs code from a model dir.
"""

from transformers import PretrainedConfig


class _Fields(dict):
    """A dict whose keys are also attributes. A missing key is a missing attribute, so `hasattr` tells what the
    config sets (vLLM falls back to the model's `hidden_act` when a block has none)."""

    def __getattr__(self, name):
        if name not in self:
            raise AttributeError(name)
        value = self[name]
        return _Fields(value) if isinstance(value, dict) and not isinstance(value, _Fields) else value

    def __setattr__(self, name, value):
        self[name] = value

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, _Fields) else v for k, v in self.items()}


class BlockConfig(_Fields):
    """One layer: `attention` (n_heads_in_group, no_op, replace_with_linear) and `ffn` (ffn_mult, no_op,
    replace_with_linear, optional intermediate_size)."""

    def __init__(self, attention=None, ffn=None, **rest):
        super().__init__(attention=_Fields(attention or {}), ffn=_Fields(ffn or {}), **rest)


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, intermediate_size=None, num_key_value_heads=None,
                 max_position_embeddings=2048, **kwargs):
        self.max_position_embeddings = max_position_embeddings  # read by transformers' llama3 RoPE checks
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]
        self.intermediate_size = intermediate_size
        self.num_key_value_heads = num_key_value_heads
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [BlockConfig(**b).to_dict() if isinstance(b, dict) else b
                                for b in out.get("block_configs", [])]
        return out
