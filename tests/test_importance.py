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
