"""Activation importance: planted dominant units rank first, layer scores, aggregation, saved scores."""

import pytest
import torch

from tessera.errors import TesseraError
from tessera.importance import Importance, activation_importance
from tessera.prune import PruneTarget, prune, shortgpt


def test_planted_neuron_head_and_channel_rank_first(teacher, chunks):
    with torch.no_grad():
        teacher.model.layers[1].mlp.gate_proj.weight[17] *= 40  # neuron 17 of layer 1 fires hardest
        teacher.model.layers[1].mlp.up_proj.weight[17] *= 40
        teacher.model.layers[2].self_attn.v_proj.weight[8:16] *= 30  # KV head 1 of layer 2 ...
        teacher.model.layers[2].self_attn.q_proj.weight[24:32] *= 30  # ... and its query head 3 attends sharply
        teacher.model.embed_tokens.weight[:, 5] *= 25  # embedding channel 5 dominates the residual stream
    imp = activation_importance(teacher, chunks)
    assert int(imp.neurons[1].argmax()) == 17
    assert int(imp.heads[2].argmax()) in (2, 3) and int(imp.kv_groups(2, 2).argmax()) == 1
    assert int(imp.channels.argmax()) == 5
    kept = prune(teacher, imp, PruneTarget(ffn=8, hidden=16))
    assert 5 in torch.topk(imp.channels, 16).indices.tolist() and kept.arch.hidden_size == 16


def test_aggregations_differ_and_validate(teacher, chunks):
    a = activation_importance(teacher, chunks, batch_agg="l2", seq_agg="mean")
    b = activation_importance(teacher, chunks, batch_agg="mean", seq_agg="max")
    assert not torch.allclose(a.neurons[0], b.neurons[0])
    with pytest.raises(TesseraError, match="aggregation"):
        activation_importance(teacher, chunks, batch_agg="median")


def test_block_importance_and_drop_loss(teacher, chunks):
    with torch.no_grad():  # layer 2 becomes an identity: nothing to lose by dropping it
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    imp = activation_importance(teacher, chunks, with_drop_loss=True)
    assert int(imp.block_importance.argmin()) == 2 and imp.block_importance[2] < 1e-6
    assert abs(float(imp.drop_loss[2])) < 1e-5
    assert float(imp.drop_kl[2]) < 1e-6 < float(imp.drop_kl.max())  # KL is zero only for the identity layer
    assert shortgpt(teacher, imp, 3).provenance[-1]["dropped_layers"] == [2]
    by_kl = prune(teacher, imp, PruneTarget(layers=3, layer_metric="drop_kl"))
    assert by_kl.provenance[-1]["dropped_layers"] == [2]
    with pytest.raises(TesseraError, match="layer-metric"):
        prune(teacher, imp, PruneTarget(layers=3, layer_metric="cosine"))


def test_head_drop_kl_ranks_a_loud_but_unused_head_last(teacher, chunks, tmp_path):
    """A head whose output o_proj ignores costs nothing to drop: its drop-KL is 0 whatever its output norm, so
    head_metric="drop_kl" prunes it where the norm (made huge here) keeps it."""
    d = teacher.arch.head_dim
    with torch.no_grad():
        teacher.model.layers[1].self_attn.o_proj.weight[:, :d] = 0  # layer 1, head 0 (KV group 0) is unused
    imp = activation_importance(teacher, chunks, with_head_drop=True)
    kl = imp.head_drop_kl[1]
    assert kl[0] < 1e-7 and bool((kl[1:] > 1e-5).all()) and set(imp.head_drop_kl) == set(range(4))
    imp.heads[1] = imp.heads[1].clone()
    imp.heads[1][0] = 1e9  # the loudest head by norm
    q = teacher.model.layers[1].self_attn.q_proj.weight
    by_norm = prune(teacher, imp, PruneTarget(heads=2))
    by_kl = prune(teacher, imp, PruneTarget(heads=2, head_metric="drop_kl"))
    assert torch.equal(by_norm.model.layers[1].self_attn.q_proj.weight[:d], q[:d])  # kept head 0
    assert torch.equal(by_kl.model.layers[1].self_attn.q_proj.weight[:d], q[d:2 * d])  # kept head 1 instead
    again = Importance.load(imp.save(tmp_path / "imp.safetensors"))
    assert torch.equal(again.head_drop_kl[1], kl)
    with pytest.raises(TesseraError, match="--head-drop-kl"):
        prune(teacher, activation_importance(teacher, chunks), PruneTarget(heads=2, head_metric="drop_kl"))


def test_importance_round_trips(tmp_path, teacher, chunks):
    imp = activation_importance(teacher, chunks, with_drop_loss=True)
    again = Importance.load(imp.save(tmp_path / "imp.safetensors"))
    assert torch.equal(again.neurons[3], imp.neurons[3]) and torch.equal(again.drop_loss, imp.drop_loss)
    assert torch.equal(again.drop_kl, imp.drop_kl)
    assert again.meta["batch_agg"] == "l2"


def test_scores_do_not_depend_on_the_batch_size(teacher, chunks):
    """Per-sample statistics are reduced per sample before the batch reduction, whatever the batch size (channel
    scores once summed the layernorm outputs of different samples when the batch held more than one)."""
    one = activation_importance(teacher, chunks, batch_size=1)
    eight = activation_importance(teacher, chunks, batch_size=8)
    odd = activation_importance(teacher, chunks, batch_size=5)  # a last batch of 4
    for other in (eight, odd):
        torch.testing.assert_close(other.channels, one.channels, rtol=1e-5, atol=0)
        torch.testing.assert_close(other.neurons[2], one.neurons[2], rtol=1e-5, atol=0)
        torch.testing.assert_close(other.heads[1], one.heads[1], rtol=1e-5, atol=0)
        torch.testing.assert_close(other.block_importance, one.block_importance, rtol=1e-5, atol=0)


def test_magnitude_depth_score_is_the_norm_of_what_a_block_writes(teacher):
    """Data-free layer score: the output projections' norms. A layer whose o_proj and down_proj are scaled down
    ranks last and is the one depth pruning drops (once every layer tied at its parameter count)."""
    from tessera.importance import magnitude_importance

    with torch.no_grad():
        teacher.model.layers[2].self_attn.o_proj.weight.mul_(0.05)
        teacher.model.layers[2].mlp.down_proj.weight.mul_(0.05)
    imp = magnitude_importance(teacher)
    block = teacher.model.layers[0]
    o, down = block.self_attn.o_proj.weight.detach(), block.mlp.down_proj.weight.detach()
    assert float(imp.block_importance[0]) == pytest.approx(float(o.norm() + down.norm()), rel=1e-6)
    assert int(imp.block_importance.argmin()) == 2 and len(set(imp.block_importance.tolist())) == 4
    assert prune(teacher, imp, PruneTarget(layers=3)).provenance[-1]["dropped_layers"] == [2]


def test_drop_scores_use_drop_samples_chunks_and_say_so(teacher, chunks):
    from tessera.importance import drop_layer_scores

    imp = activation_importance(teacher, chunks, with_drop_loss=True, drop_samples=6)
    loss, kl = drop_layer_scores(teacher, chunks[:6])
    assert imp.meta["drop_samples"] == 6 and torch.equal(imp.drop_kl, kl) and torch.equal(imp.drop_loss, loss)
    assert not torch.equal(activation_importance(teacher, chunks, with_drop_loss=True).drop_kl, kl)  # default 4
    with pytest.raises(TesseraError, match="--drop-samples"):
        activation_importance(teacher, chunks, with_drop_loss=True, drop_samples=0)


def test_scores_carry_the_model_fingerprint_and_their_data(teacher, chunks, tmp_path):
    from tessera.checkpoint import fingerprint
    from tessera.data import DataSplit

    split = DataSplit("calibration", chunks[:8], "mem", "abc", 16)
    imp = activation_importance(teacher, split)
    assert imp.meta["fingerprint"] == fingerprint(teacher) and imp.meta["data"] == split.record()
    again = Importance.load(imp.save(tmp_path / "s.safetensors"))
    again.check(teacher)
    del again.meta["fingerprint"]
    with pytest.raises(TesseraError, match="no model fingerprint"):
        again.check(teacher)
