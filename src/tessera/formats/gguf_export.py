"""A model as a GGUF file that llama.cpp runs, written with the `gguf` package (the format's own library).

Keys and tensor names are those of llama.cpp's own converter (convert_hf_to_gguf.py, `LlamaModel` / `DeciModel`):

* homogeneous   -> architecture `llama`: scalar head, KV-head and FFN counts;
* heterogeneous -> architecture `deci`: per-layer arrays `deci.attention.head_count` (0 for a no-op attention,
  all heads for a linear one), `deci.attention.head_count_kv` (0 for both) and `deci.feed_forward_length`
  (0 for a no-op FFN). The width written is the layer's real width, not one recomputed from `ffn_mult`.

Q and K are permuted from transformers' rotate-half layout to GGML's interleaved one (`_permute`); llama3 RoPE
scaling becomes the `rope_freqs` tensor. The tokenizer goes in whole, whatever the vocabulary size: every token
(padded to the model's vocab with UNUSED entries), its type, the BPE merges, the pre-tokenizer (recognised the way
llama.cpp's converter does, `gguf_pretokenizers`), special token ids, add-BOS/EOS and the chat template.
Norms and 1-D tensors stay float32; `q8_0` falls back to f16 for a matrix whose rows are not a multiple of 32.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np

from tessera.arch import ArchSpec, llama3_inv_freq
from tessera.errors import TesseraError

OUTTYPES = ("f32", "f16", "q8_0")


@dataclass(frozen=True)
class GGUFExport:
    path: Path
    architecture: str  # "llama" | "deci"
    outtype: str
    tensors: int
    nbytes: int
    pre_tokenizer: str
    vocab_size: int
    f16_fallbacks: tuple[str, ...] = ()  # q8_0: matrices stored f16 (rows not a multiple of 32); llama.cpp runs them slower


def gguf_architecture(arch: ArchSpec) -> str:
    return "llama" if arch.is_homogeneous else "deci"


def export_gguf(model, out: str | Path, outtype: str = "f32", *, pre_tokenizer: str | None = None,
                name: str | None = None) -> GGUFExport:
    """Write `model` (a tessera Transformer with its tokenizer) to `out` as GGUF. Refuses a model llama.cpp cannot
    serve (`incompatibilities(arch, "llamacpp")`), naming the layer and the reason. Atomic (temp file + rename)."""
    import gguf

    from tessera.formats.engines import incompatibilities
    from tessera.io import atomic_path

    if outtype not in OUTTYPES:
        raise TesseraError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    arch: ArchSpec = model.arch
    problems = incompatibilities(arch, "llamacpp")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TesseraError(f"llama.cpp cannot serve this model: {str(problems[0]).removeprefix('llamacpp: ')}{more}; "
                           "see `tessera inspect`")
    if model.tokenizer is None:
        raise TesseraError("the model has no tokenizer; a GGUF carries one: load the model from a directory with "
                           "tokenizer.json")
    arch_name = gguf_architecture(arch)
    out = Path(out).expanduser()
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
        writer.add_name(name or out.stem)
        _write_hparams(writer, arch, file_type)
        pre = _write_vocab(writer, model.tokenizer, arch, pre_tokenizer)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        count, nbytes, fallbacks = 0, 0, []
        for tname, data, qtype in _tensors(model, outtype):
            writer.add_tensor(tname, data, raw_dtype=qtype)
            count, nbytes = count + 1, nbytes + data.nbytes
            if outtype == "q8_0" and qtype == gguf.GGMLQuantizationType.F16:
                fallbacks.append(tname)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFExport(out, arch_name, outtype, count, nbytes, pre, arch.vocab_size, tuple(fallbacks))


# ---------------------------------------------------------------------------- hyper-parameters
def layer_counts(arch: ArchSpec) -> tuple[list[int], list[int], list[int]]:
    """Per-layer (heads, KV heads, FFN width) as llama.cpp's `deci` reads them."""
    heads, kv, ffn = [], [], []
    for block in arch.blocks:
        att = block.attention
        heads.append(0 if att.kind == "no_op" else arch.num_attention_heads)
        kv.append(att.num_kv_heads if att.kind == "gqa" else 0)
        ffn.append(block.ffn.intermediate_size if block.ffn.kind == "swiglu" else 0)
    return heads, kv, ffn


def _write_hparams(w, arch: ArchSpec, file_type) -> None:
    w.add_block_count(arch.num_layers)
    w.add_context_length(arch.max_position_embeddings)
    w.add_embedding_length(arch.hidden_size)
    if arch.is_homogeneous:
        block = arch.blocks[0]
        w.add_feed_forward_length(block.ffn.intermediate_size)
        w.add_head_count(arch.num_attention_heads)
        w.add_head_count_kv(block.attention.num_kv_heads)
    else:
        heads, kv, ffn = layer_counts(arch)
        w.add_head_count(heads)
        w.add_head_count_kv(kv)
        w.add_feed_forward_length(ffn)
    w.add_rope_freq_base(arch.rope_theta)
    w.add_layer_norm_rms_eps(arch.rms_norm_eps)
    w.add_key_length(arch.head_dim)
    w.add_value_length(arch.head_dim)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_vocab_size(arch.vocab_size)
    w.add_file_type(file_type)


# ---------------------------------------------------------------------------- tensors
_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.linear_attn": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_tensor_name(name: str) -> str:
    """tessera's (transformers') tensor name -> llama.cpp's."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    prefix, _, rest = name.partition("model.layers.")
    layer, _, part = rest.partition(".")
    module, _, kind = part.rpartition(".")
    if prefix or not layer.isdigit() or module not in _NAMES:
        raise TesseraError(f"tensor {name} has no GGUF name; only Llama / DeciLM tensors can be exported")
    return f"blk.{layer}.{_NAMES[module]}.{kind}"


def _permute(w, n_head: int):
    """transformers' rotate-half Q/K rows -> GGML's interleaved pairs (llama.cpp's `LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, outtype: str):
    import gguf
    import torch

    arch: ArchSpec = model.arch
    state = model.state_dict()
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when `output` is absent
    items: list[tuple[str, Any]] = []
    if arch.rope_scaling is not None:
        plain = llama3_inv_freq(arch.head_dim, arch.rope_theta, None)
        scaled = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        items.append(("rope_freqs.weight", (plain / scaled).float()))
    for name, tensor in state.items():
        t = tensor.detach().float().cpu()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            layer = int(name.split(".")[2])
            heads = arch.num_attention_heads if name.endswith("q_proj.weight") else arch.kv_heads(layer)
            t = _permute(t, heads)
        items.append((gguf_tensor_name(name), t))
    for tname, t in items:
        data = t.contiguous().numpy() if isinstance(t, torch.Tensor) else t
        if data.ndim <= 1 or tname.endswith("_norm.weight") or outtype == "f32":
            yield tname, data.astype(np.float32), gguf.GGMLQuantizationType.F32
        elif outtype == "f16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
            yield tname, data.astype(np.float16), gguf.GGMLQuantizationType.F16
        else:
            yield tname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


# ---------------------------------------------------------------------------- tokenizer
def vocab_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for this tokenizer's BPE pre-tokenizer, or None when llama.cpp does not know it."""
    from tessera.formats.gguf_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS

    ids = tokenizer.encode(CHECK_TEXT)
    return PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())


def _write_vocab(w, tokenizer, arch: ArchSpec, pre_tokenizer: str | None) -> str:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tj = Path(tmp) / "tokenizer.json"
        model_type = json.loads(tj.read_text()).get("model", {}).get("type") if tj.is_file() else None
        if model_type != "BPE":
            raise TesseraError(f"the tokenizer is {model_type or 'not a tokenizers BPE'}; tessera writes GGUF for "
                               "byte-level BPE tokenizers (Llama 3, SmolLM, GPT-2 style) only")
        pre = pre_tokenizer or vocab_pre_tokenizer(tokenizer)
        if pre is None:
            raise TesseraError("llama.cpp does not recognise this tokenizer's pre-tokenizer; pass --pre-tokenizer "
                               "with llama.cpp's name for it (e.g. llama-bpe, smollm, gpt-2)")
        vocab = tokenizer.get_vocab()
        if max(vocab.values()) >= arch.vocab_size:
            raise TesseraError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                               f"{arch.vocab_size}; the tokenizer does not belong to this model")
        reverse = {i: t for t, i in vocab.items()}
        added = tokenizer.added_tokens_decoder
        tokens, types = [], []
        for i in range(arch.vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(reverse[i])
                types.append(gguf.TokenType.NORMAL)
        tc = Path(tmp) / "tokenizer_config.json"
        prefix_space = json.loads(tc.read_text()).get("add_prefix_space") if tc.is_file() else None
        if prefix_space is None:
            prefix_space = _byte_level_prefix_space(json.loads(tj.read_text()).get("pre_tokenizer"))
        if prefix_space is not None:
            w.add_add_space_prefix(prefix_space)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=arch.vocab_size)
        if not special.merges:
            raise TesseraError("the tokenizer has no BPE merges; llama.cpp needs them")
        if "bos" not in special.add_special_token:  # as transformers does: does encoding prepend BOS?
            bos_id = tokenizer.bos_token_id
            special.add_special_token["bos"] = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
        special.add_to_gguf(w, quiet=True)
    return pre


def _byte_level_prefix_space(pre: Any) -> bool | None:
    """The ByteLevel pre-tokenizer's add_prefix_space, searched through a Sequence; None when there is none."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return bool(pre.get("add_prefix_space", False))
    for sub in pre.get("pretokenizers") or []:
        found = _byte_level_prefix_space(sub)
        if found is not None:
            return found
    return None
