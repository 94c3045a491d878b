"""Puzzle block library: variant keys, which variants fit a parent, exact initialisation from the parent, on disk."""

import json

import pytest
import torch

import tessera
from helpers import random_model, tiny_arch
from tessera.arch import AttentionSpec, BlockSpec, FFNSpec
from tessera.errors import TesseraError
from tessera.puzzle.library import (
    Library,
    LibraryConfig,
    Variant,
    build_library,
    calibrate,
    init_variant,
    parent_variants,
    variant_block,
    variant_lists,
)

CFG = LibraryConfig(ffn_fractions=(0.75, 0.5, 0.25), ffn_multiple=8)


def rope(model, T):
    return model._rope(torch.arange(T)[None], torch.float32)


def sub_block_outputs(parent, layer, x):
    """The parent's attention and FFN of `layer` applied to x, each on its own: x + sub(norm(x))."""
    block = parent.model.layers[layer]
    cos, sin = rope(parent, x.shape[1])
    att = x + block.self_attn(block.input_layernorm(x), cos, sin, None, None, 0)
    ffn = x + block.mlp(block.post_attention_layernorm(x))
    return att, ffn


def test_variant_keys_round_trip_and_are_hashable():
    variants = [Variant("attention", AttentionSpec("gqa", 2)), Variant("attention", AttentionSpec("linear")),
                Variant("attention", AttentionSpec("no_op")), Variant("ffn", FFNSpec("swiglu", 768)),
                Variant("ffn", FFNSpec("linear")), Variant("ffn", FFNSpec("no_op")),
                Variant("ffn", FFNSpec("swiglu", 768), "fp8"), Variant("attention", AttentionSpec("gqa", 1), "nvfp4")]
    keys = [v.key for v in variants]
    assert keys == ["attn.gqa-kv2", "attn.linear", "attn.no_op", "ffn.swiglu-768", "ffn.linear", "ffn.no_op",
                    "ffn.swiglu-768@fp8", "attn.gqa-kv1@nvfp4"]
    assert [Variant.from_key(k) for k in keys] == variants
    assert len(set(variants)) == len(variants) and variants[6].native == variants[3]
    with pytest.raises(TesseraError, match="not a variant key"):
        Variant.from_key("ffn.wide")
    with pytest.raises(TesseraError, match="no weights to quantise"):
        Variant("ffn", FFNSpec("no_op"), "fp8")
    with pytest.raises(TesseraError, match="needs a FFNSpec"):
        Variant("ffn", AttentionSpec("no_op"))


def test_variant_lists_fit_the_parent_and_the_engine():
    arch = tiny_arch(layers=2, heads=4, kv_heads=2, ffn=64)
    layers, excluded, pairs = variant_lists(arch, CFG)
    assert [v.key for v in layers[0].attention] == ["attn.gqa-kv2", "attn.gqa-kv1", "attn.linear", "attn.no_op"]
    assert [v.key for v in layers[0].ffn] == ["ffn.swiglu-64", "ffn.swiglu-48", "ffn.swiglu-32", "ffn.swiglu-16",
                                              "ffn.linear", "ffn.no_op"]
    assert excluded == [] and pairs == []
    # llama.cpp: no linear FFN (left out, with the reason), no-op FFN beside real attention (a pair rule for the MIP)
    layers, excluded, pairs = variant_lists(arch, LibraryConfig(ffn_fractions=(0.5,), ffn_multiple=8, engine="llamacpp"))
    assert "ffn.linear" not in [v.key for v in layers[0].ffn] and {e.key for e in excluded} == {"ffn.linear"}
    assert {(p.attention, p.ffn) for p in pairs if p.layer == 0} == {
        ("attn.gqa-kv2", "ffn.no_op"), ("attn.gqa-kv1", "ffn.no_op"), ("attn.linear", "ffn.no_op")}
    # vLLM: no linear blocks; heterogeneous widths rounded to what ffn_mult expresses (here: none below 256)
    big = tiny_arch(layers=1, hidden=64, heads=4, kv_heads=2, ffn=512)
    layers, excluded, _ = variant_lists(big, LibraryConfig(ffn_fractions=(0.75, 0.3), engine="vllm"))
    assert [v.key for v in layers[0].ffn] == ["ffn.swiglu-512", "ffn.swiglu-256", "ffn.no_op"]  # 384 and 128 -> 256
    assert "attn.linear" in {e.key for e in excluded}
    # precision is one more attribute: every native variant with weights gets its quantised twins
    layers, _, _ = variant_lists(arch, LibraryConfig(ffn_fractions=(0.5,), ffn_multiple=8, precisions=("native", "fp8")))
    keys = [v.key for v in layers[0].ffn]
    assert keys == ["ffn.swiglu-64", "ffn.swiglu-32", "ffn.linear", "ffn.no_op",
                    "ffn.swiglu-64@fp8", "ffn.swiglu-32@fp8", "ffn.linear@fp8"]


@pytest.mark.parametrize("cfg, needle", [
    (LibraryConfig(kv_heads=(3,)), "--kv-heads 3 does not fit the parent (4 query heads, 2 KV heads); choose from 1, 2"),
    (LibraryConfig(kv_heads=(4,)), "--kv-heads 4 does not fit"),
    (LibraryConfig(ffn_widths=(100,)), "--ffn-widths 100 does not fit the parent (its widest FFN is 64)"),
])
def test_variant_list_that_does_not_fit_the_parent_is_refused(cfg, needle):
    with pytest.raises(TesseraError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        variant_lists(tiny_arch(layers=2, heads=4, kv_heads=2, ffn=64), cfg)


def test_bad_config_values_are_refused():
    with pytest.raises(TesseraError, match=r"must be in \(0, 1\]"):
        LibraryConfig(ffn_fractions=(1.5,))
    with pytest.raises(TesseraError, match="must include 'native'"):
        LibraryConfig(precisions=("fp8",))
    with pytest.raises(TesseraError, match="unknown engine"):
        LibraryConfig(engine="tgi")


def test_parent_variant_equals_the_parent_sub_block_exactly(teacher, chunks):
    stats = calibrate(teacher, chunks)
    x = torch.randn(2, 16, 32)
    cos, sin = rope(teacher, 16)
    for layer in range(teacher.arch.num_layers):
        pa, pf = parent_variants(teacher.arch, layer)
        want_att, want_ffn = sub_block_outputs(teacher, layer, x)
        for v, want in ((pa, want_att), (pf, want_ffn)):
            block = variant_block(teacher.arch, v, init_variant(teacher, layer, v, stats))
            assert torch.equal(block(x, cos, sin, None, None, 0), want)
    # the widest FFN chosen by contribution is the parent's, channel for channel
    full = init_variant(teacher, 0, Variant("ffn", FFNSpec("swiglu", 64)), stats)
    assert torch.equal(full["mlp.down_proj.weight"], teacher.model.layers[0].mlp.down_proj.weight)


def test_ffn_channels_are_kept_by_contribution_not_activation_alone(teacher, chunks):
    stats = calibrate(teacher, chunks)
    mlp = teacher.model.layers[1].mlp
    acts = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda _m, a: acts.append(a[0].abs().reshape(-1, 64)))
    with torch.no_grad():
        teacher(chunks)
    hook.remove()
    mean_act = torch.cat(acts).mean(0)
    contribution = mean_act * mlp.down_proj.weight.norm(dim=0)
    assert torch.allclose(stats["ffn_contribution.1"], contribution, rtol=1e-5)
    # make the most active channel write almost nothing: contribution drops it, activation alone would keep it
    top = int(mean_act.argmax())
    with torch.no_grad():
        mlp.down_proj.weight[:, top] *= 1e-4
    stats = calibrate(teacher, chunks)
    kept = init_variant(teacher, 1, Variant("ffn", FFNSpec("swiglu", 16)), stats)
    keep = torch.topk(stats["ffn_contribution.1"], 16).indices.sort().values
    assert top not in keep.tolist()
    assert torch.equal(kept["mlp.gate_proj.weight"], mlp.gate_proj.weight[keep])
    assert torch.equal(kept["mlp.down_proj.weight"], mlp.down_proj.weight[:, keep])


def test_linear_ffn_fit_is_exact_when_the_block_is_linear(teacher, chunks, monkeypatch):
    # with the gate's activation constant 1, SwiGLU is down(up(z)): a linear map the least-squares fit must recover
    import tessera.model

    monkeypatch.setattr(tessera.model.F, "silu", lambda g: torch.ones_like(g))
    stats = calibrate(teacher, chunks)
    mlp = teacher.model.layers[0].mlp
    exact = mlp.down_proj.weight @ mlp.up_proj.weight
    assert torch.allclose(stats["linear_ffn.0"], exact, atol=1e-4)
    v = Variant("ffn", FFNSpec("linear"))
    block = variant_block(teacher.arch, v, init_variant(teacher, 0, v, stats))
    x = torch.randn(2, 16, 32)
    cos, sin = rope(teacher, 16)
    _, want = sub_block_outputs(teacher, 0, x)
    assert torch.allclose(block(x, cos, sin, None, None, 0), want, atol=1e-4)


def test_kv_heads_merge_weighted_by_kv_group_importance(teacher, chunks):
    # Puzzle's KV-head variants merge KV groups the way Minitron does (tessera.prune.merge_kv_heads), weighted by
    # the KV-group importance from the library's calibration (the sum of each group's query-head scores)
    stats = calibrate(teacher, chunks)
    att = teacher.model.layers[0].self_attn
    k, v_ = att.k_proj.weight.view(2, 8, -1), att.v_proj.weight.view(2, 8, -1)
    one = Variant("attention", AttentionSpec("gqa", 1))
    stats["head_importance.0"] = torch.tensor([1.0, 2.0, 0.5, 0.5])  # KV groups 0 and 1 score 3 and 1
    w = init_variant(teacher, 0, one, stats)
    assert torch.allclose(w["self_attn.k_proj.weight"], 0.75 * k[0] + 0.25 * k[1])
    assert torch.allclose(w["self_attn.v_proj.weight"], 0.75 * v_[0] + 0.25 * v_[1])
    stats["head_importance.0"] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # group 0 contributes nothing: group 1 as is
    w = init_variant(teacher, 0, one, stats)
    assert torch.equal(w["self_attn.k_proj.weight"], k[1])
    del stats["head_importance.0"]  # no scores: the plain mean
    w = init_variant(teacher, 0, one, stats)
    assert torch.allclose(w["self_attn.k_proj.weight"], k.mean(0))
    assert torch.equal(w["self_attn.q_proj.weight"], att.q_proj.weight)
    # when the two KV heads are equal, pooling them changes nothing: the 1-KV-head variant equals the parent
    with torch.no_grad():
        for proj in (att.k_proj, att.v_proj):
            proj.weight[8:] = proj.weight[:8]
    v = Variant("attention", AttentionSpec("gqa", 1))
    block = variant_block(teacher.arch, v, init_variant(teacher, 0, v, stats))
    x = torch.randn(2, 16, 32)
    cos, sin = rope(teacher, 16)
    want, _ = sub_block_outputs(teacher, 0, x)
    assert torch.allclose(block(x, cos, sin, None, None, 0), want, atol=1e-5)


def test_linear_attention_is_wo_wv_attention_to_self(teacher, chunks):
    # with one token, attention attends only to itself: softmax = 1 and the output is W_o W_v x exactly
    stats = calibrate(teacher, chunks)
    v = Variant("attention", AttentionSpec("linear"))
    block = variant_block(teacher.arch, v, init_variant(teacher, 2, v, stats))
    x = torch.randn(3, 1, 32)
    cos, sin = rope(teacher, 1)
    want, _ = sub_block_outputs(teacher, 2, x)
    assert torch.allclose(block(x, cos, sin, None, None, 0), want, atol=1e-5)


def test_library_directory_round_trip_and_parent_check(teacher, chunks, tmp_path):
    lib = build_library(teacher, CFG, chunks, tmp_path / "lib", parent_source="mem")
    again = Library.load(tmp_path / "lib")
    assert again.layers == lib.layers and again.arch == teacher.arch and again.parent_fingerprint == lib.parent_fingerprint
    assert set(again.stats) == set(lib.stats)
    again.check_parent(teacher)
    other = random_model(teacher.arch, seed=5)
    with pytest.raises(TesseraError, match="library built from a different parent"):
        again.check_parent(other)
    with pytest.raises(TesseraError, match="already exists"):
        build_library(teacher, CFG, chunks, tmp_path / "lib", parent_source="mem")
    # a library.json whose variants do not fit the parent's shape is refused in one line
    raw = json.loads((tmp_path / "lib" / "library.json").read_text())
    raw["layers"][0]["ffn"].append("ffn.swiglu-999")
    (tmp_path / "lib" / "library.json").write_text(json.dumps(raw))
    with pytest.raises(TesseraError, match="layer 0 variant ffn.swiglu-999 does not fit the parent's shape"):
        Library.load(tmp_path / "lib")
    with pytest.raises(TesseraError, match="not a block library"):
        Library.load(tmp_path)


def test_library_of_a_heterogeneous_parent_offers_only_what_it_can_initialise(chunks):
    arch = tiny_arch(layers=3, heads=4, kv_heads=2, ffn=64).with_blocks((
        BlockSpec(AttentionSpec("gqa", 1), FFNSpec("swiglu", 32)),
        BlockSpec(AttentionSpec("no_op"), FFNSpec("linear")),
        BlockSpec(AttentionSpec("linear"), FFNSpec("no_op")),
    ))
    layers, _, _ = variant_lists(arch, CFG)
    assert [v.key for v in layers[0].attention] == ["attn.gqa-kv1", "attn.linear", "attn.no_op"]
    assert [v.key for v in layers[1].attention] == ["attn.no_op"]
    assert [v.key for v in layers[1].ffn] == ["ffn.linear", "ffn.no_op"]
    assert [v.key for v in layers[2].attention] == ["attn.linear", "attn.no_op"]
    assert [v.key for v in layers[2].ffn] == ["ffn.no_op"]
    parent = random_model(arch)
    stats = calibrate(parent, chunks)
    assert torch.equal(init_variant(parent, 1, Variant("ffn", FFNSpec("linear")), stats)["mlp.linear_mlp.weight"],
                       parent.model.layers[1].mlp.linear_mlp.weight)
    assert tessera.Transformer  # the model class the variants are built from
