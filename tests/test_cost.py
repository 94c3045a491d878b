import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import mixed_arch, tiny_arch
from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.cli import app
from tessera.cost import (
    DTYPE_BYTES,
    PARTS,
    Scenario,
    batch_limits,
    block_cost,
    block_cost_table,
    check_tp,
    default_kv_dtype,
    kv_bytes_per_sequence,
    predict,
    weight_bytes,
    weight_bytes_per_gpu,
)
from tessera.engine import engine_profile, gpu_profiles
from tessera.errors import TesseraError
from tessera.formats import config_json
from tessera.hardware import GPUS, Hardware, get_hardware

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
    usable = f"{engine_profile(H100).memory_budget(80 * 2**30, 141.1e9) / 1e9:.1f}"
    with pytest.raises(TesseraError, match=rf"does not fit: 141\.1 GB of bf16 weights per GPU vs {usable} GB usable"):
        predict(llama_70b, H100, Scenario(128, 128))
    assert predict(llama_70b, H100, Scenario(128, 128), tp=2).batch >= 1
    usable = f"{engine_profile(H100).memory_budget(80 * 2**30, weight_bytes(LLAMA_8B, 'bf16')) / 1e9:.1f}"
    with pytest.raises(TesseraError, match=rf"KV cache per GPU > {usable} GB usable"):
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


def test_cost_counts_the_weights_the_model_allocates():
    """One parameter formula (ArchSpec's): the cost model's and the architecture's per-block params are the
    weights the model allocates, for every sub-block kind (GQA with any KV heads, linear, no-op, SwiGLU)."""
    from helpers import random_model

    arch = mixed_arch()
    model = random_model(arch)
    for i, block in enumerate(arch.blocks):
        linears = sum(m.weight.numel() for m in model.model.layers[i].modules() if isinstance(m, torch.nn.Linear))
        norms = sum(p.numel() for n, p in model.model.layers[i].named_parameters() if "norm" in n)
        assert arch.block_params(i) == linears + norms
        assert block_cost(arch, block, H100, SC).params == linears + norms


def test_cost_takes_the_dtype_aliases_every_other_command_takes(tmp_path):
    """One dtype vocabulary (issue 13): `cost --dtype float16` is `fp16`, as in bench / kld / distill; the
    library functions canonicalise too, and an unknown name is still one line naming what is allowed."""
    (tmp_path / "config.json").write_text(config_json(LLAMA_8B))
    run = lambda *a: CliRunner().invoke(app, ["cost", str(tmp_path), "--scenario", "128/128", "--json", *a])
    canonical = json.loads(run("--dtype", "fp16", "--kv-dtype", "fp16").output)
    for alias, kv in (("float16", "float16"), ("half", "fp16"), ("FP16", "Float16")):
        out = run("--dtype", alias, "--kv-dtype", kv)
        assert out.exit_code == 0, out.output
        assert json.loads(out.output) == canonical
    assert predict(LLAMA_8B, H100, Scenario(128, 128), dtype="bfloat16").kv_dtype == "bf16"
    assert cost(LLAMA_8B.blocks[0], dtype="float32") == cost(LLAMA_8B.blocks[0], dtype="fp32")
    assert batch_limits(LLAMA_8B, H100, SC, "bfloat16") == batch_limits(LLAMA_8B, H100, SC, "bf16")
    out = run("--dtype", "int3")
    assert out.exit_code == 2
    assert out.output.strip() == "error: unknown dtype 'int3'; choose from fp32, bf16, fp16, fp8, nvfp4"


# ---------------------------------------------------------------------------- issue 15: memory, KV dtype, TP, engine
LLAMA_70B = ArchSpec.llama(vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64,
                           num_kv_heads=8, intermediate_size=28672)
DATASHEET_GB = {"h100": 80, "h200": 141, "a100": 80, "b200": 180, "l40s": 48}  # the vendors' "NN GB" figures


def test_every_gpu_capacity_is_its_datasheet_figure_in_gib():
    assert set(GPUS) == set(DATASHEET_GB)
    for name, gb in DATASHEET_GB.items():
        hw = GPUS[name]
        assert hw.mem_bytes == gb * 2**30 and hw.datasheet_gib == gb
        assert hw.link_bw > 0 and hw.link_latency_s > 0 and hw.link  # every GPU can run tensor parallelism
    assert GPUS["h100"].mem_bytes == 85_899_345_920  # > 80e9: what the 72.0 GB "usable" got wrong
    # FP8 Llama-3.1-70B now fits one H100, as the published TP1 column serves it
    assert predict(LLAMA_70B, H100, Scenario(128, 128), dtype="fp8").batch > 1


@pytest.mark.parametrize("arch", [LLAMA_70B, mixed_arch(), tiny_arch(tied=True)], ids=["70b", "mixed", "tied"])
def test_tp_never_lowers_memory_per_gpu_below_weights_over_tp(arch):
    sc = Scenario(128, 1024)
    tps = [t for t in (1, 2, 4, 8) if _tp_ok(arch, t)]
    assert len(tps) >= 2
    for dtype in ("bf16", "fp8"):
        per_gpu = [weight_bytes_per_gpu(arch, dtype, t) for t in tps]
        for t, w in zip(tps, per_gpu):
            assert w >= weight_bytes(arch, dtype) / t
            kv = kv_bytes_per_sequence(arch, sc, "bf16", t)
            assert kv >= kv_bytes_per_sequence(arch, sc, "bf16") / t
        assert per_gpu == sorted(per_gpu, reverse=True)  # more GPUs never need more weights each


def _tp_ok(arch, tp):
    try:
        check_tp(arch, tp)
    except TesseraError:
        return False
    return True


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    one_kv = ArchSpec.llama(vocab_size=1000, hidden_size=512, num_layers=2, num_attention_heads=8, num_kv_heads=1,
                            intermediate_size=1024)
    sc = Scenario(10, 10)
    assert kv_bytes_per_sequence(one_kv, sc, "bf16", 4) == kv_bytes_per_sequence(one_kv, sc, "bf16", 1)
    assert kv_bytes_per_sequence(LLAMA_8B, sc, "bf16", 4) == kv_bytes_per_sequence(LLAMA_8B, sc, "bf16", 1) / 4


def test_communication_grows_with_tp_and_batch():
    block, sc = gqa(8), Scenario(512, 64)

    def comm(tp, batch, phase="decode_parts", b=block):
        return getattr(block_cost(LLAMA_70B, b, H100, sc, batch=batch, tp=tp), phase)["comm"]

    assert comm(1, 64) == 0
    for phase in ("prefill_parts", "decode_parts"):
        by_tp = [comm(t, 64, phase) for t in (2, 4, 8)]
        assert 0 < by_tp[0] < by_tp[1] < by_tp[2]
        by_batch = [comm(4, b, phase) for b in (1, 16, 256)]
        assert by_batch[0] < by_batch[1] < by_batch[2]
    # two all-reduces per full layer, one for a layer with a no-op half, none for an empty layer
    half = BlockSpec(AttentionSpec("no_op"), FFNSpec("swiglu", 28672))
    empty = BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op"))
    assert comm(4, 64, b=half) == pytest.approx(comm(4, 64) / 2)
    assert comm(4, 64, b=empty) == 0
    # all-reduce bytes: batch x tokens x hidden x 2 bytes per sub-block
    assert block_cost(LLAMA_70B, block, H100, sc, batch=8, tp=2).prefill_parts["comm_bytes"] == 2 * 8 * 512 * 8192 * 2
    # and the critical path includes it: same block, TP costs more than 1/tp of the work
    t1 = block_cost(LLAMA_70B, block, H100, sc, batch=64).decode_s
    t4 = block_cost(LLAMA_70B, block, H100, sc, batch=64, tp=4)
    assert t4.decode_s > t1 / 4 and t4.decode_s > t4.decode_parts["comm"] > 0


def test_fp8_kv_cache_doubles_the_batch_that_fits():
    for arch, dtype, sc in ((LLAMA_8B, "bf16", Scenario(128, 1024)), (LLAMA_70B, "fp8", Scenario(2048, 2048)),
                            (mixed_arch(), "bf16", Scenario(512, 512))):
        bf16 = batch_limits(arch, H100, sc, dtype, kv_dtype="bf16")["memory"]
        fp8 = batch_limits(arch, H100, sc, dtype, kv_dtype="fp8")["memory"]
        assert bf16 >= 1 and 2 * bf16 <= fp8 <= 2 * bf16 + 1


def test_kv_dtype_defaults_to_fp8_for_fp8_and_nvfp4_weights():
    assert [default_kv_dtype(d) for d in ("fp32", "bf16", "fp16", "fp8", "nvfp4")] == ["fp32", "bf16", "bf16", "fp8", "fp8"]
    sc = Scenario(128, 1024)
    p = predict(LLAMA_8B, H100, sc, dtype="fp8", batch=8)
    assert p.kv_dtype == "fp8" and p.kv_bytes == 8 * LLAMA_8B.kv_cache_bytes_per_token(1.0) * 1152
    assert predict(LLAMA_8B, H100, sc, dtype="fp8", batch=8, kv_dtype="bf16").kv_bytes == 2 * p.kv_bytes
    assert predict(LLAMA_8B, H100, sc, batch=8).kv_dtype == "bf16"
    with pytest.raises(TesseraError, match="unknown KV-cache dtype 'nvfp4'"):
        predict(LLAMA_8B, H100, sc, dtype="fp8", kv_dtype="nvfp4")


def test_batch_search_cap_is_a_parameter_and_reported():
    sc = Scenario(128, 128)
    free = predict(LLAMA_8B, H100, sc)
    capped = predict(LLAMA_8B, H100, sc, batch_cap=16)
    assert capped.batch == 16 and capped.batch_limits["cap"] == 16 and capped.batch_bound == "cap"
    assert free.batch_limits == {"memory": free.batch_limits["memory"], "engine": engine_profile(H100).max_batch,
                                 "cap": 4096}
    assert free.batch == min(free.batch_limits.values()) and free.batch > 16
    with pytest.raises(TesseraError, match="batch must be >= 1"):
        predict(LLAMA_8B, H100, sc, batch=0)


def test_tp_that_does_not_divide_the_model_is_refused_with_the_choices():
    with pytest.raises(TesseraError, match=r"--tp 3 does not divide the model's 64 query heads, 8 KV heads, "
                                           r"FFN width 28672; use --tp 1 or 2 or 4 or 8"):
        predict(LLAMA_70B, H100, Scenario(128, 128), dtype="fp8", tp=3)
    check_tp(LLAMA_70B, 16)  # more GPUs than KV heads: the heads are replicated
    with pytest.raises(TesseraError, match="no interconnect"):
        predict(LLAMA_8B, replace(H100, name="x", link_bw=0.0), Scenario(8, 8), tp=2)


def test_explain_parts_add_up_to_the_phase_times():
    p = predict(LLAMA_70B, H100, Scenario(128, 1024), dtype="fp8", tp=4)
    for phase, total in (("prefill", p.prefill_s), ("decode", p.decode_s)):
        assert sum(p.parts[phase][k] for k in PARTS) == pytest.approx(total, rel=1e-9)
        assert p.parts[phase]["comm"] > 0 and p.parts[phase]["flop_count"] > 0
    # decode reads every matrix shard once per step (norms and the input embedding excepted)
    assert p.parts["decode"]["weight_bytes"] == pytest.approx(
        (p.weight_bytes_per_gpu - 161 * 8192 * 1 - LLAMA_70B.vocab_size * 8192 * 2 / 4) * 1024, rel=1e-6)


def test_engine_profiles_are_data_for_every_gpu():
    profiles = gpu_profiles()
    assert set(profiles) == set(GPUS)
    for name, e in profiles.items():
        fr = [f for _, f in e.flop_fraction]
        assert fr == sorted(fr) and 0 < fr[0] and fr[-1] <= 1
        assert e.source and e.max_batch >= 1 and 0.5 < e.memory_budget(80e9, 10e9) / 80e9 <= 1
        assert engine_profile(GPUS[name]) == e
    h = profiles["h100"]
    assert h.flops_at(1e9) == h.flop_fraction[-1][1] and h.flops_at(0.5) == h.flop_fraction[0][1]
    # a bigger matrix never reads faster in total
    sizes = np.geomspace(1e3, 1e10, 200)
    times = sizes / np.array([h.bw_at(x) for x in sizes])
    assert np.all(np.diff(times) > 0)


def test_scenario_lives_with_the_serving_types():
    from tessera import cost, serving

    assert cost.Scenario is serving.Scenario and cost.DTYPE_BYTES is serving.DTYPE_BYTES
    import tessera.bench as bench

    assert bench.Scenario is serving.Scenario


def test_cost_cli_kv_dtype_explain_and_refusals(tmp_path):
    (tmp_path / "config.json").write_text(config_json(LLAMA_70B))
    run = lambda *a: CliRunner().invoke(app, ["cost", str(tmp_path), *a])
    out = run("--dtype", "fp8", "--scenario", "128/1024", "--tp", "4", "--explain")
    assert out.exit_code == 0, out.output
    assert "fp8 KV cache" in out.output and "search cap 4,096 (--batch-cap)" in out.output
    for label in ("weights read", "KV cache read", "FLOPs", "TP communication", "overhead"):
        assert label in out.output
    fp8 = json.loads(run("--dtype", "fp8", "--scenario", "2048/2048", "--json").output)
    bf16 = json.loads(run("--dtype", "fp8", "--scenario", "2048/2048", "--kv-dtype", "bf16", "--json").output)
    assert fp8["kv_dtype"] == "fp8" and bf16["kv_dtype"] == "bf16"
    assert fp8["batch_limits"]["memory"] >= 2 * bf16["batch_limits"]["memory"] and fp8["batch_cap"] == 4096
    for args, msg in ((["--batch", "0"], "--batch must be a positive integer"),
                      (["--tp", "3"], "--tp 3 does not divide"),
                      (["--batch-cap", "0"], "--batch-cap must be >= 1"),
                      (["--recalibrate"], "--recalibrate measures this machine's cpu profile")):
        out = run("--dtype", "fp8", *args)
        assert out.exit_code == 2 and out.output.startswith("error:") and msg in out.output
        assert len(out.output.strip().splitlines()) == 1


def test_recalibrate_records_when_and_where(tmp_path, monkeypatch):
    import tessera.hardware as hwmod

    monkeypatch.setenv("TESSERA_HOME", str(tmp_path))
    calls = []
    fake = Hardware("cpu", {"fp32": 1e11}, 2e10, 1e10, 1.0, 1.0, 5e-6, measured_at="2026-12-07 01:00:00 UTC",
                    measured_on="host, test CPU")
    monkeypatch.setattr(hwmod, "calibrate_cpu", lambda: calls.append(1) or fake)
    (tmp_path / "config.json").write_text(config_json(tiny_arch()))
    out = CliRunner().invoke(app, ["cost", str(tmp_path), "--gpu", "cpu", "--dtype", "fp32", "--scenario", "8/8"])
    assert out.exit_code == 0 and calls == [1] and "measured 2026-12-07 01:00:00 UTC on host, test CPU" in out.output
    CliRunner().invoke(app, ["cost", str(tmp_path), "--gpu", "cpu", "--dtype", "fp32", "--scenario", "8/8"])
    assert calls == [1]  # cached
    out = CliRunner().invoke(app, ["cost", str(tmp_path), "--gpu", "cpu", "--dtype", "fp32", "--scenario", "8/8",
                                   "--recalibrate", "--json"])
    assert calls == [1, 1] and json.loads(out.output)["measured_on"] == "host, test CPU"
    assert json.loads(hwmod.cpu_profile_path().read_text())["measured_at"] == "2026-12-07 01:00:00 UTC"
    # an old cache without the new fields still loads
    hwmod.cpu_profile_path().write_text(json.dumps({"name": "cpu", "flops": {"fp32": 1e11}, "mem_bw": 2e10,
                                                    "mem_bytes": 1e10, "notes": "old", "unknown_key": 1}))
    assert hwmod.cpu_profile().measured_at == ""
