from helpers import mixed_arch, tiny_arch
from tessera.arch import AttentionSpec, BlockSpec, FFNSpec
from tessera.formats.engines import ffn_width_expressible, incompatibilities, round_ffn_width


def test_vllm_rejects_linear_blocks_and_inexpressible_widths():
    found = {(i.layer, i.part) for i in incompatibilities(mixed_arch(), "vllm")}
    # layer 1 has FFN width 24 (not a multiple of 256), layer 2 linear attention, layer 3 width 40
    assert found == {(0, "ffn"), (1, "ffn"), (2, "attention"), (3, "ffn")}


def test_llamacpp_rejects_linear_ffn_and_noop_ffn_beside_attention():
    found = {(i.layer, i.part) for i in incompatibilities(mixed_arch(), "llamacpp")}
    assert found == {(2, "ffn"), (4, "block")}
    empty = mixed_arch().replace_block(4, BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op")))
    assert {(i.layer, i.part) for i in incompatibilities(empty, "llamacpp")} == {(2, "ffn")}


def test_homogeneous_model_any_width_for_vllm_and_transformers_takes_all():
    assert incompatibilities(tiny_arch(ffn=40), "vllm") == []
    assert incompatibilities(mixed_arch(), "transformers") == []


def test_round_ffn_width_for_vllm():
    assert round_ffn_width(1100, 576, "vllm") == 1024
    assert ffn_width_expressible(1024, 576) and not ffn_width_expressible(1100, 576)
    assert round_ffn_width(100, 576, "vllm") == 256
    assert round_ffn_width(1100, 576, "llamacpp") == 1100
