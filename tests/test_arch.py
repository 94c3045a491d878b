import json

import pytest

from helpers import mixed_arch, tiny_arch
from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.errors import TesseraError
from tessera.formats import ffn_mult_for, from_hf_config, nas_ffn_width, to_hf_config


def test_homogeneous_round_trips_as_plain_llama():
    arch = tiny_arch(rope_scaling=True, tied=True)
    cfg = to_hf_config(arch)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "block_configs" not in cfg and cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == 64
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert from_hf_config(json.loads(json.dumps(cfg))) == arch


def test_heterogeneous_round_trips_as_nemotron_nas():
    arch = mixed_arch()
    cfg = to_hf_config(arch)
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["intermediate_size"] is None and cfg["num_key_value_heads"] is None
    blocks = cfg["block_configs"]
    assert len(blocks) == arch.num_layers
    assert blocks[1]["attention"] == {"n_heads_in_group": 4, "no_op": False, "replace_with_linear": False}
    assert blocks[2]["attention"]["replace_with_linear"] and blocks[2]["attention"]["n_heads_in_group"] is None
    assert blocks[2]["ffn"]["replace_with_linear"] and blocks[3]["attention"]["no_op"] and blocks[4]["ffn"]["no_op"]
    # widths that ffn_mult cannot express (not multiples of 256) also carry intermediate_size
    assert blocks[1]["ffn"]["intermediate_size"] == 24
    assert from_hf_config(json.loads(json.dumps(cfg))) == arch


def test_nas_ffn_width_matches_vllm_rule_for_nemotron_51b():
    # Values from Llama-3.1-Nemotron-51B's config (hidden 8192).
    assert nas_ffn_width(1.3125, 8192) == 7168
    assert nas_ffn_width(2.625, 8192) == 14336
    assert nas_ffn_width(5.25, 8192) == 28672
    for width in (256, 7168, 14336, 28672):
        assert nas_ffn_width(ffn_mult_for(width, 8192), 8192) == width


def test_multiple_of_256_widths_need_no_intermediate_size():
    arch = ArchSpec.llama(vocab_size=10, hidden_size=8192, num_layers=2, num_attention_heads=64, num_kv_heads=8,
                          intermediate_size=28672)
    arch = arch.replace_block(1, BlockSpec(AttentionSpec("gqa", 1), FFNSpec("swiglu", 7168)))
    ffn = to_hf_config(arch)["block_configs"][1]["ffn"]
    assert "intermediate_size" not in ffn and ffn["ffn_mult"] == 1.3125


def test_minimal_three_key_nas_form_is_accepted():
    cfg = to_hf_config(tiny_arch()) | {"model_type": "nemotron-nas", "intermediate_size": None}
    cfg["block_configs"] = [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 48}},
        {"attention": {"no_op": True}, "ffn": {"replace_with_linear": True}},
    ]
    arch = from_hf_config(cfg)
    assert arch.blocks[0] == BlockSpec(AttentionSpec("gqa", 2), FFNSpec("swiglu", 48))
    assert arch.blocks[1] == BlockSpec(AttentionSpec("no_op"), FFNSpec("linear"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(block_configs=c["block_configs"][:-1]), "block_configs has 4 entries but num_hidden_layers=5"),
        (lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=3), "does not divide"),
        (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
        (lambda c: c["block_configs"][0]["ffn"].clear(), "neither ffn_mult nor intermediate_size"),
    ],
)
def test_bad_configs_give_one_clear_line(mutate, message):
    cfg = to_hf_config(mixed_arch())
    mutate(cfg)
    with pytest.raises(TesseraError, match=message) as info:
        from_hf_config(cfg)
    assert "\n" not in str(info.value)


def test_heads_not_divisible_by_kv_heads_in_llama_config():
    cfg = to_hf_config(tiny_arch()) | {"num_key_value_heads": 3}
    with pytest.raises(TesseraError, match="not divisible by num_key_value_heads=3"):
        from_hf_config(cfg)


def test_parameter_and_kv_accounting():
    arch = mixed_arch()
    h, d = 32, 8
    assert arch.attention_params(0) == 2 * h * 4 * d + 2 * h * 4 * d + h
    assert arch.attention_params(1) == 2 * h * 4 * d + 2 * h * 1 * d + h
    assert arch.attention_params(2) == h * h + h and arch.attention_params(3) == 0
    assert arch.ffn_params(1) == 3 * h * 24 + h and arch.ffn_params(2) == h * h + h and arch.ffn_params(4) == 0
    assert arch.kv_cache_bytes_per_token(2.0) == 2 * (4 + 1 + 0 + 0 + 2) * d * 2
    assert not arch.is_homogeneous and tiny_arch().is_homogeneous


def test_unknown_config_keys_survive_round_trip():
    cfg = to_hf_config(tiny_arch()) | {"my_custom_key": [1, 2]}
    assert to_hf_config(from_hf_config(cfg))["my_custom_key"] == [1, 2]


# Malformed edits of a heterogeneous child's config.json: each is refused with one line that names the field.
FUZZ = [
    (lambda c: c.update(rope_theta=-5), "rope_theta: -5 must be a positive number"),
    (lambda c: c.update(rope_theta="big"), "rope_theta: 'big' is not a number"),
    (lambda c: c["block_configs"][0]["ffn"].update(ffn_mult="wide"), "[0].ffn.ffn_mult: 'wide' is not a number"),
    (lambda c: c["block_configs"][1].pop("attention"), "block_configs[1].attention is missing"),
    (lambda c: c["block_configs"][1].pop("ffn"), "block_configs[1].ffn is missing"),
    (lambda c: c["block_configs"].__setitem__(2, [1, 2]), "block_configs[2]: [1, 2] is not an object"),
    (lambda c: c["block_configs"][0].update(attention="gqa"), "block_configs[0].attention: 'gqa' is not an object"),
    (lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=0), "n_heads_in_group: 0 must be >= 1"),
    (lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=None), "n_heads_in_group is missing"),
    (lambda c: c["block_configs"][3]["attention"].update(no_op="true"), "attention.no_op: 'true' is not true or false"),
    (lambda c: c["block_configs"][2]["ffn"].update(no_op=True), "ffn sets both no_op and replace_with_linear"),
    (lambda c: c["block_configs"][1]["ffn"].update(intermediate_size=-24), "ffn.intermediate_size: -24 must be >= 1"),
    (lambda c: c.update(hidden_size="32"), "hidden_size: '32' is not an integer"),
    (lambda c: c.update(hidden_size=None), "hidden_size is missing"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads: 0 must be >= 1"),
    (lambda c: c.update(num_hidden_layers=2.5), "num_hidden_layers: 2.5 is not an integer"),
    (lambda c: c.update(vocab_size=True), "vocab_size: True is not an integer"),
    (lambda c: c.update(head_dim=7), "head_dim: 7 is odd"),
    (lambda c: c.update(rms_norm_eps=0), "rms_norm_eps: 0 must be a positive number"),
    (lambda c: c.update(max_position_embeddings=-1), "max_position_embeddings: -1 must be >= 1"),
    (lambda c: c.update(tie_word_embeddings="yes"), "tie_word_embeddings: 'yes' is not true or false"),
    (lambda c: c.update(eos_token_id=1000), "eos_token_id: 1000 is not a token id"),
    (lambda c: c.update(bos_token_id=-1), "bos_token_id: -1 is not a token id"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": -8}), "rope_scaling.factor: -8 must be a positive"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1}),
     "rope_scaling.high_freq_factor: 1 must exceed low_freq_factor"),
    (lambda c: c.update(rope_scaling="llama3"), "rope_scaling: 'llama3' is not an object"),
]


@pytest.mark.parametrize("mutate, message", FUZZ, ids=[m for _, m in FUZZ])
def test_config_fields_are_validated_by_type_and_range(mutate, message):
    cfg = to_hf_config(mixed_arch())
    mutate(cfg)
    with pytest.raises(TesseraError) as info:
        from_hf_config(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_field_stops_loading_with_one_line(tmp_path):
    import tessera
    from helpers import assert_one_line_error, cli, random_model

    path = tessera.save(random_model(mixed_arch()), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_theta"] = -5
    (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("generate", path, "-p", "w1"), "rope_theta: -5 must be a positive number")
