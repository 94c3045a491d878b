from helpers import mixed_arch, tiny_arch
from tessera.arch import AttentionSpec, BlockSpec, FFNSpec
from tessera.formats.engines import ffn_width_expressible, incompatibilities, round_ffn_width, round_hidden


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


def test_hidden_not_a_multiple_of_heads_is_refused_by_vllm_and_transformers_only():
    """A Minitron child that prunes the hidden size but keeps the heads (hidden 30, 4 heads x head_dim 8): transformers
    5.x's LlamaConfig refuses hidden % heads != 0 even with head_dim, and vLLM reads configs through it."""
    from dataclasses import replace

    arch = replace(tiny_arch(), hidden_size=30)  # head_dim stays 8
    for engine in ("vllm", "transformers"):
        (problem,) = incompatibilities(arch, engine)
        assert problem.layer is None and problem.part == "model" and "use a hidden size of 28" in problem.reason
    assert incompatibilities(arch, "llamacpp") == []  # llama.cpp reads head_dim from attention.key_length
    assert incompatibilities(tiny_arch(hidden=28, heads=4), "vllm") == []
    assert round_hidden(30, 4, "vllm") == 28 and round_hidden(28, 4, "vllm") == 28
    assert round_hidden(30, 4, None) == 30 and round_hidden(600, 9, "llamacpp") == 576  # q8_0 rows: multiples of 32


def test_round_ffn_width_for_each_engine():
    assert round_ffn_width(1100, 576, "vllm") == 1024
    assert ffn_width_expressible(1024, 576) and not ffn_width_expressible(1100, 576)
    assert round_ffn_width(100, 576, "vllm") == 256
    assert round_ffn_width(1100, 576, "llamacpp") == 1088  # a multiple of 32: q8_0 quantizes the down projection
    assert round_ffn_width(20, 576, "llamacpp") == 20 and round_ffn_width(1100, 576, "transformers") == 1100


# ---------------------------------------------------------------------------- the DeciLM config shim
_SHIM_CHECK = r"""
import json, sys
from transformers import AutoConfig
d, again = sys.argv[1], sys.argv[2]
c = AutoConfig.from_pretrained(d, trust_remote_code=True)
assert type(c).__name__ == "DeciLMConfig" and "tessera" not in sys.modules, type(c)
blocks = [{part: {k: getattr(getattr(b, part), k) for k in sorted(getattr(b, part))} for part in ("attention", "ffn")}
          for b in c.block_configs]
assert not hasattr(c.block_configs[0].ffn, "hidden_act")  # unset stays unset: vLLM then takes config.hidden_act
c.save_pretrained(again)
c2 = AutoConfig.from_pretrained(again, trust_remote_code=True)
print(json.dumps({"blocks": blocks, "intermediate_size": c.intermediate_size,
                  "num_key_value_heads": c.num_key_value_heads, "again": c2.to_dict()["block_configs"]}))
"""


def test_config_shim_round_trips_through_autoconfig_with_remote_code(tmp_path):
    """vLLM's path: transformers alone (no tessera import), trust_remote_code=True, attribute access to every
    field of every block; saved again by transformers, tessera reads back the same architecture."""
    import json
    import os
    import subprocess
    import sys

    from helpers import random_model
    from tessera.checkpoint import save
    from tessera.formats import read_config, to_hf_config

    arch = mixed_arch()
    save(random_model(arch), tmp_path / "child")
    cfg = json.loads((tmp_path / "child" / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (tmp_path / "child" / "configuration_decilm.py").is_file()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # remote code copied here, not shared
    done = subprocess.run([sys.executable, "-c", _SHIM_CHECK, tmp_path / "child", tmp_path / "again"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["blocks"] == cfg["block_configs"]  # every field, read as an attribute
    assert out["intermediate_size"] is None and out["num_key_value_heads"] is None
    assert out["again"] == cfg["block_configs"]
    assert read_config(tmp_path / "again") == read_config(tmp_path / "child") == arch
    assert to_hf_config(arch)["block_configs"] == out["blocks"]


def test_homogeneous_checkpoint_has_no_shim(tmp_path):
    from helpers import random_model
    from tessera.checkpoint import save

    save(random_model(tiny_arch()), tmp_path / "m")
    assert not (tmp_path / "m" / "configuration_decilm.py").exists()
    assert "auto_map" not in (tmp_path / "m" / "config.json").read_text()


def test_import_tessera_loads_shimmed_child_without_remote_code(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import tessera
    from helpers import random_model

    child = random_model(mixed_arch().replace_block(2, BlockSpec(AttentionSpec("no_op"), FFNSpec("swiglu", 48))))
    tessera.save(child, tmp_path / "child")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "child")  # trust_remote_code unset: tessera's classes
    assert type(hf).__module__ == "tessera.hf"
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(hf(ids).logits, child(ids))


# ---------------------------------------------------------------------------- inspect, save warnings, prune --engine
def test_inspect_lists_incompatibilities_per_engine(tmp_path):
    import json

    from helpers import cli
    from tessera.formats import config_json

    (tmp_path / "config.json").write_text(config_json(mixed_arch()))
    out = json.loads(cli("inspect", tmp_path, "--json").output)["engines"]
    assert out["transformers"] == []
    assert any(line.startswith("layer 2 attention") for line in out["vllm"])
    assert out["llamacpp"] == [str(p).removeprefix("llamacpp: ") for p in incompatibilities(mixed_arch(), "llamacpp")]
    text = cli("inspect", tmp_path).output
    assert "layer 4 block: llama.cpp skips the rest of a layer" in text
    assert "transformers: serves it as written" in text


def test_convert_warns_for_each_engine_that_cannot_serve(tmp_path):
    from typer.testing import CliRunner

    import tessera
    from helpers import random_model, tiny_tokenizer
    from tessera.cli import app

    child = random_model(mixed_arch())
    child.tokenizer = tiny_tokenizer()
    tessera.save(child, tmp_path / "c")
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "c"), str(tmp_path / "d")])
    assert result.exit_code == 0
    assert "warning:" in result.output and "vllm cannot serve this model as written: layer 0 ffn" in result.output
    assert "llamacpp cannot serve this model as written: layer 2 ffn" in result.output


def test_prune_engine_rounds_per_layer_widths_for_vllm():
    from helpers import random_model
    from tessera.importance import magnitude_importance
    from tessera.prune import PruneTarget, fit_engine, prune

    parent = random_model(tiny_arch(layers=3, hidden=576 // 9, heads=4, ffn=1024))
    imp = magnitude_importance(parent)
    target = PruneTarget(ffn=(700, 600, 300))
    child = prune(parent, imp, target, engine="vllm")
    assert [b.ffn.intermediate_size for b in child.arch.blocks] == [512, 512, 256]
    assert incompatibilities(child.arch, "vllm") == []
    assert incompatibilities(prune(parent, imp, target).arch, "vllm")  # without --engine: widths vLLM misreads
    assert fit_engine(PruneTarget(ffn=300), parent.arch, "vllm").ffn == 300  # homogeneous child: any width


def test_prune_engine_vllm_rounds_hidden_to_a_multiple_of_the_heads():
    """The engine check's Minitron child: hidden pruned, every head kept. For vLLM the hidden size is rounded down
    to a multiple of the heads (head_dim unchanged); llama.cpp takes it as asked."""
    from helpers import random_model
    from tessera.importance import magnitude_importance
    from tessera.prune import PruneTarget, fit_engine, prune

    parent = random_model(tiny_arch(layers=2, hidden=36, heads=4, ffn=64))  # head_dim 9
    imp = magnitude_importance(parent)
    child = prune(parent, imp, PruneTarget(hidden=30, ffn=48), engine="vllm")
    assert (child.arch.hidden_size, child.arch.num_attention_heads, child.arch.head_dim) == (28, 4, 9)
    assert incompatibilities(child.arch, "vllm") == [] and incompatibilities(child.arch, "transformers") == []
    assert prune(parent, imp, PruneTarget(hidden=30, ffn=48), engine="llamacpp").arch.hidden_size == 30
    assert fit_engine(PruneTarget(hidden=30, heads=3), parent.arch, "vllm").hidden == 30  # 3 heads divide 30


def test_prune_engine_llamacpp_rounds_to_multiples_of_32_so_q8_0_quantizes_every_matrix(tmp_path):
    from helpers import random_model
    from tessera.formats.gguf_export import export_gguf
    from tessera.importance import magnitude_importance
    from tessera.prune import PruneTarget, prune
    from test_gguf_export import VOCAB, bpe_tokenizer

    parent = random_model(tiny_arch(layers=2, hidden=96, heads=4, ffn=128, vocab=VOCAB))
    parent.tokenizer = bpe_tokenizer()
    imp = magnitude_importance(parent)
    for target in (PruneTarget(hidden=80, ffn=100), PruneTarget(ffn=(100, 70))):  # plain Llama; heterogeneous
        asked, child = prune(parent, imp, target), prune(parent, imp, target, engine="llamacpp")
        asked.tokenizer = child.tokenizer = parent.tokenizer
        sizes = [child.arch.hidden_size] + [b.ffn.intermediate_size for b in child.arch.blocks]
        assert all(n % 32 == 0 for n in sizes) and sizes != [asked.arch.hidden_size] + [
            b.ffn.intermediate_size for b in asked.arch.blocks]
        assert export_gguf(child, tmp_path / "c.gguf", "q8_0", pre_tokenizer="gpt-2").f16_fallbacks == ()
        assert export_gguf(asked, tmp_path / "a.gguf", "q8_0", pre_tokenizer="gpt-2").f16_fallbacks  # as asked: f16


def test_prune_engine_refuses_a_child_the_engine_cannot_serve():
    import pytest

    from helpers import random_model
    from tessera.errors import TesseraError
    from tessera.importance import magnitude_importance
    from tessera.prune import PruneTarget, prune

    parent = random_model(mixed_arch())
    with pytest.raises(TesseraError, match="cannot be served by llamacpp: layer 2 ffn"):
        prune(parent, magnitude_importance(parent), PruneTarget(ffn=(32, 16, 1, 20, 1)), engine="llamacpp")
