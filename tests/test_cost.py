import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from helpers import mixed_arch, tiny_arch
from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.cli import app
from tessera.cost import DTYPE_BYTES, Scenario, block_cost, block_cost_table, predict, weight_bytes
from tessera.errors import TesseraError
from tessera.formats import config_json
from tessera.hardware import GPUS, get_hardware

LLAMA_8B = ArchSpec.llama(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8,
                          intermediate_size=14336)
H100 = GPUS["h100"]
SC = Scenario(512, 256)


def cost(block, scenario=SC, batch=8, hw=H100, dtype="bf16"):
    return block_cost(LLAMA_8B, block, hw, scenario, batch=batch, dtype=dtype)


def gqa(kv, ffn=14336):
    return BlockSpec(AttentionSpec("gqa", kv), FFNSpec("swiglu", ffn))


@pytest.mark.parametrize("hw", ["h100", "a100", "b200", "l40s"])
@pytest.mark.parametrize("batch", [1, 64])
def test_cost_is_monotone(hw, batch):
    hw = GPUS[hw]
    for a, b in [(gqa(1), gqa(2)), (gqa(2), gqa(8)), (gqa(8), gqa(32))]:
        ca, cb = cost(a, batch=batch, hw=hw), cost(b, batch=batch, hw=hw)
        assert ca.decode_s <= cb.decode_s and ca.prefill_s <= cb.prefill_s and ca.kv_bytes_per_token < cb.kv_bytes_per_token
    for n1, n2 in [(1024, 4096), (4096, 14336), (14336, 28672)]:
        assert cost(gqa(8, n1), batch=batch, hw=hw).decode_s <= cost(gqa(8, n2), batch=batch, hw=hw).decode_s
    short, long = Scenario(128, 128), Scenario(4096, 128)
    assert cost(gqa(8), short, batch, hw).prefill_s < cost(gqa(8), long, batch, hw).prefill_s
    # a longer context makes each decode step at least as slow: compare per-step averages
    assert cost(gqa(8), short, batch, hw).decode_s <= cost(gqa(8), long, batch, hw).decode_s
    # variants are ordered as expected: no-op < linear < full
    noop = BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op"))
    lin = BlockSpec(AttentionSpec("linear"), FFNSpec("linear"))
    times = [cost(b, batch=batch, hw=hw).decode_s for b in (noop, lin, gqa(1))]
    assert times == sorted(times) and len(set(times)) == 3


def test_no_op_block_costs_nothing():
    c = cost(BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op")))
    assert (c.params, c.weight_bytes, c.kv_bytes_per_token, c.prefill_s, c.decode_s) == (0, 0, 0, 0, 0)


@pytest.mark.parametrize("arch", [LLAMA_8B, tiny_arch(tied=True), mixed_arch()], ids=["8b", "tied", "mixed"])
def test_memory_accounting_matches_parameter_counts(arch):
    for i, block in enumerate(arch.blocks):
        assert block_cost(arch, block, H100, SC).params == arch.block_params(i)
    assert weight_bytes(arch, "fp32") == arch.num_params() * 4
    assert weight_bytes(arch, "bf16") == arch.num_params() * 2
    blocks = sum(arch.block_params(i) for i in range(arch.num_layers))
    assert weight_bytes(arch, "fp8") == pytest.approx(arch.num_params() * 2 - (blocks + arch.hidden_size))
    p = predict(arch, H100, SC, batch=4)
    assert p.kv_bytes == 4 * arch.kv_cache_bytes_per_token(2.0) * (SC.input_len + SC.output_len)


def test_auto_batch_fits_and_beats_batch_one():
    auto = predict(LLAMA_8B, H100, Scenario(128, 1024))
    one = predict(LLAMA_8B, H100, Scenario(128, 1024), batch=1)
    assert auto.batch > 1 and auto.output_tokens_per_s > 10 * one.output_tokens_per_s
    assert auto.weight_bytes + auto.kv_bytes <= auto.memory_bytes
    # fp8 weights and more memory both help
    assert predict(LLAMA_8B, H100, Scenario(128, 1024), dtype="fp8").output_tokens_per_s > auto.output_tokens_per_s
    assert predict(LLAMA_8B, GPUS["h200"], Scenario(128, 1024)).output_tokens_per_s > auto.output_tokens_per_s
    assert DTYPE_BYTES["nvfp4"] == 0.5625


def test_impossible_scenario_says_the_numbers():
    llama_70b = ArchSpec.llama(vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64,
                               num_kv_heads=8, intermediate_size=28672)
    with pytest.raises(TesseraError, match=r"does not fit: 141\.1 GB of bf16 weights per GPU vs 72\.0 GB usable"):
        predict(llama_70b, H100, Scenario(128, 128))
    assert predict(llama_70b, H100, Scenario(128, 128), tp=2).batch >= 1
    with pytest.raises(TesseraError, match=r"KV cache per GPU > 72\.0 GB usable"):
        predict(LLAMA_8B, H100, Scenario(128, 1024), batch=100_000)


def test_block_cost_table_rows():
    rows = block_cost_table(LLAMA_8B, [gqa(8), gqa(1, 4096), BlockSpec(AttentionSpec("linear"), FFNSpec("no_op"))],
                            H100, SC)
    assert [r["block"] for r in rows] == ["gqa(kv=8) + swiglu(14336)", "gqa(kv=1) + swiglu(4096)", "linear + no_op"]
    assert rows[0]["decode_s"] > rows[1]["decode_s"] > rows[2]["decode_s"] > 0


def test_unknown_hardware_and_scenario():
    with pytest.raises(TesseraError, match="unknown hardware 'tpu'"):
        get_hardware("tpu")
    with pytest.raises(TesseraError, match="not IN/OUT"):
        Scenario.parse("128x128")


def test_cost_cli_on_config_only_directory(tmp_path):
    (tmp_path / "config.json").write_text(config_json(LLAMA_8B))
    out = CliRunner().invoke(app, ["cost", str(tmp_path), "--gpu", "h100", "--scenario", "128/1024", "--json"])
    assert out.exit_code == 0
    data = json.loads(out.output)
    assert data["hardware"] == "h100" and data["batch"] > 1 and data["output_tokens_per_s"] > 0
    big = replace(LLAMA_8B, blocks=LLAMA_8B.blocks * 10)
    (tmp_path / "config.json").write_text(config_json(big))
    out = CliRunner().invoke(app, ["cost", str(tmp_path), "--gpu", "l40s"])
    assert out.exit_code == 2 and out.output.startswith("error:") and "does not fit" in out.output
