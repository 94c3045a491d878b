import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import mixed_arch, random_model, tiny_arch, tiny_tokenizer
from tessera.formats import to_hf_config
from tessera.generate import generate, left_pad, sample_next


def hf_llama(model):
    cfg = {k: v for k, v in to_hf_config(model.arch).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys or result.missing_keys == ["lm_head.weight"]
    if model.arch.tie_word_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("kw", [{}, {"rope_scaling": True}, {"tied": True}, {"kv_heads": 4}, {"kv_heads": 1}])
def test_logits_match_transformers_llama(kw):
    model = random_model(tiny_arch(**kw, layers=3))
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_llama(model)(ids).logits, atol=1e-4, rtol=0)


def test_rope_scaling_changes_long_context_logits():
    # Guards the parity test: if scaling were silently ignored, long positions would be identical.
    plain, scaled = random_model(tiny_arch()), random_model(tiny_arch(rope_scaling=True))
    ids = torch.randint(0, 96, (1, 64))
    with torch.no_grad():
        assert (plain(ids)[0, -1] - scaled(ids)[0, -1]).abs().max() > 1e-3


def test_padding_does_not_change_logits():
    model = random_model(tiny_arch())
    ids = torch.randint(3, 96, (1, 9))
    padded, mask = left_pad([ids[0].tolist(), ids[0, :5].tolist()], pad_id=0)
    with torch.no_grad():
        full = model(ids)
        batch = model(padded, attention_mask=mask)
        short = model(ids[:, :5])
    torch.testing.assert_close(batch[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1, -5:], short[0], atol=1e-5, rtol=0)


def reference_forward(model, ids):
    """Straightforward per-layer computation written independently of model.py's code path."""
    arch = model.arch
    x = model.model.embed_tokens.weight[ids]
    T = ids.shape[1]
    pos = torch.arange(T).float()
    freqs = pos[:, None] * model.inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def norm(t, w):
        return w * (t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + arch.rms_norm_eps))

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    for layer, spec in zip(model.model.layers, arch.blocks):
        if spec.attention.kind == "gqa":
            a = layer.self_attn
            h = norm(x, layer.input_layernorm.weight)
            q = (h @ a.q_proj.weight.T).view(1, T, arch.num_attention_heads, -1)
            k = (h @ a.k_proj.weight.T).view(1, T, spec.attention.num_kv_heads, -1)
            v = (h @ a.v_proj.weight.T).view(1, T, spec.attention.num_kv_heads, -1)
            group = arch.num_attention_heads // spec.attention.num_kv_heads
            outs = []
            for head in range(arch.num_attention_heads):
                qh, kh, vh = rope(q[0, :, head]), rope(k[0, :, head // group]), v[0, :, head // group]
                scores = qh @ kh.T / arch.head_dim**0.5
                scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
                outs.append(scores.softmax(-1) @ vh)
            x = x + torch.cat(outs, -1)[None] @ a.o_proj.weight.T
        elif spec.attention.kind == "linear":
            x = x + norm(x, layer.input_layernorm.weight) @ layer.self_attn.linear_attn.weight.T
        if spec.ffn.kind == "swiglu":
            h = norm(x, layer.post_attention_layernorm.weight)
            m = layer.mlp
            x = x + (torch.nn.functional.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
        elif spec.ffn.kind == "linear":
            x = x + norm(x, layer.post_attention_layernorm.weight) @ layer.mlp.linear_mlp.weight.T
    return norm(x, model.model.norm.weight) @ model.lm_head.weight.T


def test_heterogeneous_model_matches_reference():
    model = random_model(mixed_arch())
    names = set(model.state_dict())
    assert "model.layers.2.self_attn.linear_attn.weight" in names and "model.layers.2.mlp.linear_mlp.weight" in names
    assert "model.layers.3.input_layernorm.weight" not in names and "model.layers.4.mlp.down_proj.weight" not in names
    ids = torch.randint(0, 96, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(model, ids), atol=1e-4, rtol=1e-4)
    assert model.num_params() == model.arch.num_params()


@pytest.mark.parametrize("arch", [tiny_arch(), tiny_arch(rope_scaling=True, tied=True), mixed_arch()],
                         ids=["llama", "scaled-tied", "mixed"])
def test_cached_generation_equals_uncached(arch):
    model = random_model(arch)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    cached = generate(model, prompts, 12, stop_tokens=[])
    for prompt, new in zip(prompts, cached):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(prompt):]


def test_kv_cache_only_for_attention_layers():
    model = random_model(mixed_arch())
    cache = model.setup_cache(2, 10)
    assert [c is not None for c in cache.layers] == [True, True, False, False, True]
    assert cache.layers[1].k.shape == (2, 1, 10, 8)


def test_stop_tokens_end_rows_and_sampling_is_seeded():
    model = random_model(tiny_arch())
    greedy = generate(model, [[5, 6, 7]], 8, stop_tokens=[])[0]
    stopped = generate(model, [[5, 6, 7]], 8, stop_tokens=[greedy[2]])[0]
    assert stopped == greedy[: greedy.index(greedy[2])]
    a = generate(model, [[5, 6, 7]] * 2, 8, temperature=1.0, top_k=20, seed=3, stop_tokens=[])
    b = generate(model, [[5, 6, 7]] * 2, 8, temperature=1.0, top_k=20, seed=3, stop_tokens=[])
    assert a == b


def test_stop_strings_end_each_row_at_the_token_that_completes_them():
    model = random_model(tiny_arch())
    model.tokenizer = tiny_tokenizer()
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(model, prompts, 10, stop_tokens=[])
    texts = [model.tokenizer.decode(f) for f in free]
    stop = model.tokenizer.decode(free[0][3:5])  # two words, first seen in row 0 at its 5th new token or before
    stopped = generate(model, prompts, 10, stop_tokens=[], stop_strings=[stop])
    first = next(j for j in range(10) if stop in model.tokenizer.decode(free[0][: j + 1]))
    assert stopped[0] == free[0][: first + 1]
    assert stop not in texts[1] and stopped[1] == free[1]  # the other row is not cut short
    assert generate(model, prompts, 10, stop_tokens=[], stop_strings=["no such words"]) == free


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
