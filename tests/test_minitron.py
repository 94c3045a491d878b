import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tessera
from helpers import random_model, tiny_arch, tiny_tokenizer
from tessera.distill import DistillConfig, batch_indices, distill, lr_at
from tessera.errors import TesseraError
from tessera.importance import Importance, activation_importance, magnitude_importance, random_importance
from tessera.prune import PruneTarget, prune, search_target, shortgpt


@pytest.fixture
def teacher():
    m = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64))
    m.tokenizer = tiny_tokenizer()
    return m


@pytest.fixture
def chunks():
    return torch.randint(0, 96, (24, 16), generator=torch.Generator().manual_seed(0))


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
    assert shortgpt(teacher, imp, 3).provenance[-1]["dropped_layers"] == [2]


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


def test_importance_round_trips(tmp_path, teacher, chunks):
    imp = activation_importance(teacher, chunks, with_drop_loss=True)
    again = Importance.load(imp.save(tmp_path / "imp.safetensors"))
    assert torch.equal(again.neurons[3], imp.neurons[3]) and torch.equal(again.drop_loss, imp.drop_loss)
    assert again.meta["batch_agg"] == "l2"


CFG = DistillConfig(tokens=16 * 8 * 8, seq_len=16, batch=8, lr=5e-3, warmup_steps=2, eval_every=4, ckpt_every=2)


def student_of(teacher):
    return prune(teacher, random_importance(teacher), PruneTarget(ffn=16, hidden=24))


def test_distillation_lowers_heldout_kld(teacher, chunks):
    from tessera.evaluate import mean_kld

    student = student_of(teacher)
    before = mean_kld(teacher, student, chunks[:4]).kld
    student, log = distill(teacher, student, chunks[4:], CFG, heldout=chunks[:4], progress=False)
    assert log[-1]["heldout_kld"] < 0.8 * before and len(log) == CFG.steps == 8
    assert student.provenance[-1]["stage"] == "distill"


def test_resume_after_interruption_is_bit_identical(teacher, chunks, tmp_path):
    full, _ = distill(teacher, student_of(teacher), chunks, CFG, ckpt_dir=tmp_path / "a", progress=False)
    distill(teacher, student_of(teacher), chunks, CFG, ckpt_dir=tmp_path / "b", max_steps=3, progress=False)
    state = json.loads((tmp_path / "b" / "last" / "state.json").read_text())
    assert state["step"] == 2  # checkpoints every 2 steps: the 3rd step's work is lost, as after a kill
    resumed, log = distill(teacher, student_of(teacher), chunks, CFG, ckpt_dir=tmp_path / "b", resume=True,
                           progress=False)
    assert [e["step"] for e in log] == list(range(1, 9))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_data_order_and_schedule():
    assert torch.equal(batch_indices(CFG, 24, 5), batch_indices(CFG, 24, 5))
    first_epoch = torch.cat([batch_indices(CFG, 24, s) for s in range(3)])
    assert sorted(first_epoch.tolist()) == list(range(24))
    assert lr_at(CFG, 0) < lr_at(CFG, 1) == pytest.approx(CFG.lr) and lr_at(CFG, 7) < CFG.lr


def test_bad_distillation_inputs(teacher, chunks):
    other = random_model(tiny_arch(vocab=80))
    with pytest.raises(TesseraError, match="vocabulary"):
        distill(teacher, other, chunks, CFG, progress=False)
    with pytest.raises(TesseraError, match="only 3 training chunks"):
        distill(teacher, student_of(teacher), chunks[:3], CFG, progress=False)
    with pytest.raises(TesseraError, match="no checkpoint"):
        distill(teacher, student_of(teacher), chunks, CFG, resume=True, progress=False)
    with pytest.raises(TesseraError, match="kl\\+cosine needs equal hidden sizes"):
        distill(teacher, student_of(teacher), chunks, DistillConfig(loss="kl+cosine"), progress=False)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_distill_worker import CFG as WCFG
    from ddp_distill_worker import make

    out = tmp_path / "ddp.safetensors"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(Path(__file__).parent / "ddp_distill_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher, student, chunks = make()
    single, _ = distill(teacher, student, chunks, WCFG, progress=False)
    ddp = load_file(str(out))
    for name, w in single.state_dict().items():
        torch.testing.assert_close(ddp[name], w, atol=2e-5, rtol=1e-4)
    untrained = make()[1].state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(ddp["model.layers.0.mlp.up_proj.weight"], untrained)
