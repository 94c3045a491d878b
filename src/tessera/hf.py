"""transformers integration: `AutoModelForCausalLM.from_pretrained(child_dir)` for nemotron-nas children.

NVIDIA's DeciLM checkpoints ship remote code for transformers 4.44 that breaks on 5.x, and transformers has no
built-in `nemotron-nas` type. After `import tessera` these classes fill that gap without `trust_remote_code`:
the wrapper owns the same `model.*` / `lm_head` module tree as tessera's `Transformer` and borrows its
forward code, so parameter names are the DeciLM ones and the numbers are tessera's.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from tessera.arch import ArchSpec, llama3_inv_freq
from tessera.formats import from_hf_config
from tessera.model import Transformer


class NemotronNASConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, max_position_embeddings=2048, **kwargs):
        self.block_configs = block_configs or []
        self.max_position_embeddings = max_position_embeddings  # transformers' RoPE checks read it in __init__
        super().__init__(**kwargs)

    def arch(self) -> ArchSpec:
        return from_hf_config(self.to_dict(), source="nemotron-nas config")


class DeciLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NemotronNASConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    # tessera's forward code works on any module with these attributes.
    hidden = Transformer.hidden
    _rope = Transformer._rope
    setup_cache = Transformer.setup_cache
    reset_cache = Transformer.reset_cache

    def __init__(self, config: NemotronNASConfig):
        super().__init__(config)
        self.arch = config.arch()
        core = Transformer(self.arch)
        self.model, self.lm_head = core.model, core.lm_head
        self.register_buffer("inv_freq", core.inv_freq, persistent=False)
        self.cache = None
        if self.arch.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    def _init_weights(self, module):
        if module is self:  # the non-persistent RoPE buffer is rebuilt, never loaded
            arch = self.arch
            init.copy_(self.inv_freq, llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling))
        else:
            super()._init_weights(module)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_unused) -> CausalLMOutputWithPast:
        logits = self.lm_head(self.hidden(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    AutoConfig.register("nemotron-nas", NemotronNASConfig, exist_ok=True)
    AutoModelForCausalLM.register(NemotronNASConfig, DeciLMForCausalLM, exist_ok=True)
    _registered = True
