"""Structured pruning: exact shapes and parameter counts, kept indices, KV merging, search, bad targets, CLI."""

import pytest
import torch

import tessera
from helpers import assert_one_line_error, cli, tiny_arch
from tessera.errors import TesseraError
from tessera.importance import activation_importance, magnitude_importance, random_importance
from tessera.prune import PruneTarget, prune, search_target


@pytest.mark.parametrize("target, arch_check", [
    (PruneTarget(ffn=24), lambda a: all(b.ffn.intermediate_size == 24 for b in a.blocks)),
    (PruneTarget(ffn=(8, 16, 24, 32)), lambda a: [b.ffn.intermediate_size for b in a.blocks] == [8, 16, 24, 32]),
    (PruneTarget(hidden=20), lambda a: a.hidden_size == 20),
    (PruneTarget(heads=2), lambda a: a.num_attention_heads == 2 and a.kv_heads(0) == 2),
    (PruneTarget(kv_heads=1), lambda a: a.kv_heads(0) == 1 and a.num_attention_heads == 4),
    (PruneTarget(drop_layers=(1, 3)), lambda a: a.num_layers == 2),
    (PruneTarget(hidden=24, ffn=40, heads=2, kv_heads=1, layers=3), lambda a: (a.hidden_size, a.num_layers) == (24, 3)),
])
def test_pruned_shapes_and_parameter_counts(teacher, chunks, target, arch_check, tmp_path):
    imp = activation_importance(teacher, chunks)
    child = prune(teacher, imp, target)
    assert arch_check(child.arch)
    assert child.num_params() == child.arch.num_params() < teacher.num_params()
    assert child(chunks[:2]).shape == (2, 16, 96)
    assert teacher.arch == tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64)  # the parent is untouched
    tessera.save(child, tmp_path / "child")
    again = tessera.load(tmp_path / "child")
    assert again.arch == child.arch and again.provenance[-1]["stage"] == "prune"


def test_ffn_pruning_keeps_exactly_the_top_neurons(teacher, chunks):
    imp = activation_importance(teacher, chunks)
    child = prune(teacher, imp, PruneTarget(ffn=10))
    keep = torch.topk(imp.neurons[0], 10).indices.sort().values
    assert torch.equal(child.model.layers[0].mlp.gate_proj.weight, teacher.model.layers[0].mlp.gate_proj.weight[keep])


def test_kv_merge_is_mean_pool(teacher, chunks):
    child = prune(teacher, random_importance(teacher), PruneTarget(kv_heads=1))
    k = teacher.model.layers[0].self_attn.k_proj.weight.view(2, 8, -1)
    assert torch.allclose(child.model.layers[0].self_attn.k_proj.weight, k.mean(0))


@pytest.mark.parametrize("target, needle", [
    (PruneTarget(ffn=128), "pruning cannot grow"),
    (PruneTarget(heads=0), "leaves no heads"),
    (PruneTarget(heads=3), "not a multiple"),
    (PruneTarget(layers=9), "between 1 and the parent's 4 layers"),
    (PruneTarget(drop_layers=(0, 1, 2, 3)), "drops every layer"),
])
def test_bad_targets(teacher, target, needle):
    with pytest.raises(TesseraError, match=needle):
        prune(teacher, magnitude_importance(teacher), target)


def test_target_params_search(teacher, chunks):
    imp = activation_importance(teacher, chunks)
    target, report = search_target(teacher, imp, 0.6, chunks[:4], multiple=8)
    child = prune(teacher, imp, target)
    frac = child.arch.non_embedding_params() / teacher.arch.non_embedding_params()
    assert 0.5 < frac < 0.7 and len(report) >= 2
    assert min(r["kld"] for r in report) == pytest.approx(next(r["kld"] for r in report if r["target"]["ffn"] == target.ffn
                                                               and r["target"]["layers"] == target.layers))
    with pytest.raises(TesseraError, match="larger than the parent"):
        search_target(teacher, imp, 1.5, chunks)


# ---------------------------------------------------------------------------- CLI
def write_corpus(path, words=2000, seed=0):
    ids = torch.randint(0, 92, (words,), generator=torch.Generator().manual_seed(seed))
    path.write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return path


def test_cli_importance_then_prune_to_several_targets(teacher, tmp_path):
    tessera.save(teacher, tmp_path / "parent")
    corpus = write_corpus(tmp_path / "corpus.txt")
    scores = tmp_path / "scores.safetensors"
    r = cli("importance", tmp_path / "parent", "--out", scores, "--data", corpus, "--seq-len", 16, "--samples", 8)
    assert r.exit_code == 0, r.output
    r = cli("prune", tmp_path / "parent", "--out", tmp_path / "a", "--scores", scores, "--ffn", 16, "--heads", 2,
            "--drop-layers", "1-2")
    assert r.exit_code == 0, r.output
    a = tessera.load(tmp_path / "a")
    assert (a.arch.num_layers, a.arch.num_attention_heads, a.arch.blocks[0].ffn.intermediate_size) == (2, 2, 16)
    assert a.provenance[-1]["dropped_layers"] == [1, 2] and a.tokenizer is not None
    r = cli("prune", tmp_path / "parent", "--out", tmp_path / "b", "--scores", scores, "--ffn", "8,16,24,32",
            "--hidden", 24)
    assert r.exit_code == 0, r.output
    b = tessera.load(tmp_path / "b")
    assert [blk.ffn.intermediate_size for blk in b.arch.blocks] == [8, 16, 24, 32] and b.arch.hidden_size == 24
    assert cli("inspect", tmp_path / "b").exit_code == 0
    assert_one_line_error(cli("prune", tmp_path / "parent", "--out", tmp_path / "a", "--scores", scores, "--ffn", 8),
                          "already exists")
    assert_one_line_error(cli("prune", tmp_path / "parent", "--out", tmp_path / "c", "--scores", scores, "--heads", 0),
                          "leaves no heads")
    assert_one_line_error(cli("prune", tmp_path / "parent", "--out", tmp_path / "c", "--scores", scores,
                              "--target-params", 1.5, "--data", corpus, "--seq-len", 16), "larger than the parent")
    assert_one_line_error(cli("prune", tmp_path / "parent", "--out", tmp_path / "c", "--scores", scores,
                              "--hidden", 64), "between 1 and the parent's 32")
    assert_one_line_error(cli("prune", tmp_path / "parent", "--out", tmp_path / "c", "--scores", scores,
                              "--heads", 2, "--head-metric", "drop_kl"), "--head-drop-kl")
    assert_one_line_error(cli("prune", tmp_path / "parent", "--out", tmp_path / "c", "--heads", 2,
                              "--head-metric", "loudest"), "use norm or drop_kl")
    assert not (tmp_path / "c").exists()
    r = cli("prune", tmp_path / "parent", "--out", tmp_path / "d", "--heads", 2, "--head-metric", "drop_kl",
            "--data", corpus, "--seq-len", 16, "--samples", 8)  # scores computed inline, per-head KL included
    assert r.exit_code == 0, r.output
    assert tessera.load(tmp_path / "d").arch.num_attention_heads == 2


def test_cli_importance_on_empty_data(teacher, tmp_path):
    tessera.save(teacher, tmp_path / "parent")
    (tmp_path / "empty.txt").write_text("")
    r = cli("importance", tmp_path / "parent", "--out", tmp_path / "s.safetensors", "--data", tmp_path / "empty.txt")
    assert_one_line_error(r, "empty.txt")
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.integration
def test_activation_beats_random_on_the_default_parent(default_parent, shared_dir):
    from tessera.data import load_chunks
    from tessera.evaluate import mean_kld, parent_logits_for

    data = load_chunks(default_parent.tokenizer, seq_len=128, max_tokens=12 * 128, heldout_fraction=0.34)
    calib, held = data.train[:8], data.heldout[:4]
    # MLP neurons and embedding channels: where activation importance clearly wins on this parent (head pruning
    # by output norm does not; drop-KL does: see docs/results.md, "Attention heads")
    target = PruneTarget(ffn=768, hidden=448)
    act = prune(default_parent, activation_importance(default_parent, calib), target)
    rnd = prune(default_parent, random_importance(default_parent), target)
    arch = act.arch
    assert (arch.hidden_size, arch.blocks[7].ffn.intermediate_size) == (448, 768)
    assert act.num_params() == arch.num_params() == 448 * (49152 + 1 + 30 * (2 + 3 * 768 + 2 * 9 * 64 + 2 * 3 * 64))
    ref = parent_logits_for(default_parent, held)
    kld_act = mean_kld(default_parent, act, held, parent_logits=ref).kld
    kld_rnd = mean_kld(default_parent, rnd, held, parent_logits=ref).kld
    assert kld_act < 0.5 * kld_rnd, (kld_act, kld_rnd)
