"""One place that builds tiny seeded models and tokenizers for tests (modelopt's get_tiny_llama spirit)."""

from __future__ import annotations

import torch

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec, RopeScaling
from tessera.checkpoint import _finish
from tessera.model import Transformer

TINY_VOCAB = 96


def tiny_arch(*, layers: int = 2, hidden: int = 32, heads: int = 4, kv_heads: int = 2, ffn: int = 64,
              tied: bool = False, rope_scaling: bool = False, vocab: int = TINY_VOCAB) -> ArchSpec:
    return ArchSpec.llama(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
        num_kv_heads=kv_heads, intermediate_size=ffn, tie_word_embeddings=tied, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16) if rope_scaling else None,
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def mixed_arch(hidden: int = 32, heads: int = 4) -> ArchSpec:
    """A heterogeneous child: mixed KV heads, linear and no-op sub-blocks, odd FFN widths."""
    blocks = (
        BlockSpec(AttentionSpec("gqa", 4), FFNSpec("swiglu", 64)),
        BlockSpec(AttentionSpec("gqa", 1), FFNSpec("swiglu", 24)),
        BlockSpec(AttentionSpec("linear"), FFNSpec("linear")),
        BlockSpec(AttentionSpec("no_op"), FFNSpec("swiglu", 40)),
        BlockSpec(AttentionSpec("gqa", 2), FFNSpec("no_op")),
    )
    return tiny_arch(hidden=hidden, heads=heads).with_blocks(blocks)


def random_model(arch: ArchSpec, seed: int = 0) -> Transformer:
    """A seeded model whose weights are large enough that every layer changes the output."""
    torch.manual_seed(seed)
    model = Transformer(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if "embed" in name else 0.1)
    model = _finish(model)
    return model.eval()


def tiny_tokenizer(vocab: int = TINY_VOCAB):
    """An in-memory word-level tokenizer over `vocab` ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def skip_or_fail(reason: str):
    """Skip a test whose data or real parent is missing on a laptop; under CI=true that is a failure instead."""
    import os

    import pytest

    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason} (CI=true: a test that needs it must not be skipped)", pytrace=False)
    pytest.skip(reason)


def cli(*args):
    """Run the tessera CLI in-process; exceptions propagate (a traceback is a test failure, not an exit code)."""
    from typer.testing import CliRunner

    from tessera.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, needle):
    """The CLI's contract for bad input: exit code 2 and one line starting with 'error:' that names the problem."""
    lines = [line for line in result.output.strip().splitlines() if line]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
