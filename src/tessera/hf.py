"""transformers integration: `AutoModelForCausalLM.from_pretrained(child_dir)` for nemotron-nas children.

NVIDIA's DeciLM checkpoints ship remote code for transformers 4.44 that breaks on 5.x; transformers has no
built-in `nemotron-nas` type. After `import tessera` these classes fill that gap, built on tessera's model,
so heterogeneous children load without `trust_remote_code`.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from tessera.arch import ArchSpec
from tessera.model import Transformer


class NemotronNASConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = block_configs or []
        super().__init__(**kwargs)

    def arch(self) -> ArchSpec:
        return ArchSpec.from_hf_config(self.to_dict(), source="nemotron-nas config")


class DeciLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers wrapper over tessera's Transformer; parameter names are the DeciLM ones."""

    config_class = NemotronNASConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: NemotronNASConfig):
        super().__init__(config)
        self.tessera = Transformer(config.arch())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    # Expose the same module tree as transformers' Llama: `model.*` and `lm_head`.
    def __getattr__(self, name):
        if name in ("model", "lm_head"):
            return getattr(self._modules["tessera"], name)
        return super().__getattr__(name)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            yield name.replace("tessera.", "", 1) if name.startswith(prefix + "tessera.") else name, p

    def state_dict(self, *args, **kwargs):
        sd = self.tessera.state_dict(*args, **kwargs)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.tessera.load_state_dict(state_dict, strict=strict, assign=assign)

    def get_input_embeddings(self):
        return self.tessera.model.embed_tokens

    def get_output_embeddings(self):
        return self.tessera.lm_head

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            module.weight.data.normal_(0.0, 0.02)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_unused) -> CausalLMOutputWithPast:
        logits = self.tessera(input_ids, attention_mask=attention_mask)
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
