"""Knowledge distillation: KLD goes down, bit-exact resume, data order and schedule, bad input, DDP, CLI."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, cli, random_model, tiny_arch, tiny_tokenizer
from tessera.distill import DistillConfig, batch_indices, correct_teacher, distill, lr_at
from tessera.errors import TesseraError
from tessera.importance import random_importance
from tessera.prune import PruneTarget, prune

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


def test_teacher_correction_fits_the_data_and_leaves_the_original(teacher, chunks):
    import torch.nn.functional as F

    def lm_loss(m):
        with torch.no_grad():
            return F.cross_entropy(m(chunks)[:, :-1].flatten(0, 1), chunks[:, 1:].flatten()).item()

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    corrected = correct_teacher(teacher, chunks, steps=10, lr=1e-2)
    assert lm_loss(corrected) < 0.9 * lm_loss(teacher)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # a new model, not an edit
    assert corrected.provenance[-1] == {"stage": "teacher_correction", "steps": 10, "lr": 1e-2}
    with pytest.raises(TesseraError, match="at least one step"):
        correct_teacher(teacher, chunks[:0], steps=3)


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
@pytest.mark.parametrize("parallel, port", [("ddp", 29533), ("fsdp", 29534)])
def test_two_process_torchrun_matches_one_process(tmp_path, parallel, port):
    """DDP (replicated student) and FSDP2 (`fully_shard`: sharded parameters, gradients and optimizer state) over
    2 gloo processes each give the weights of one process on the same global batch."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_distill_worker import CFG as WCFG
    from ddp_distill_worker import make

    out = tmp_path / f"{parallel}.safetensors"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(Path(__file__).parent / "ddp_distill_worker.py"), str(out), parallel]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher, student, chunks = make()
    single, log = distill(teacher, student, chunks, WCFG, progress=False)
    ddp_log = json.loads(out.with_suffix(".json").read_text())
    assert [e["loss"] for e in ddp_log] == pytest.approx([e["loss"] for e in log], rel=1e-4)  # global, not per-rank
    ddp = load_file(str(out))
    assert set(ddp) == set(single.state_dict())  # whole (gathered) tensors, not shards
    for name, w in single.state_dict().items():
        torch.testing.assert_close(ddp[name], w, atol=2e-5, rtol=1e-4)
    untrained = make()[1].state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(ddp["model.layers.0.mlp.up_proj.weight"], untrained)


def test_parallel_strategy_is_checked(teacher, chunks):
    with pytest.raises(TesseraError, match="--parallel 'zero3': use ddp or fsdp"):
        distill(teacher, student_of(teacher), chunks, CFG, progress=False, parallel="zero3")


# ---------------------------------------------------------------------------- CLI

def test_cli_distill_writes_checkpoint_and_refuses_bad_pairs(teacher, tmp_path):
    import tessera

    tessera.save(teacher, tmp_path / "parent")
    tessera.save(student_of(teacher), tmp_path / "student")
    ids = torch.randint(0, 92, (1500,), generator=torch.Generator().manual_seed(1))
    (tmp_path / "corpus.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    common = ["--data", tmp_path / "corpus.txt", "--seq-len", 16, "--batch", 4, "--lr", 5e-3, "--warmup", 1]
    r = cli("distill", "--teacher", tmp_path / "parent", "--student", tmp_path / "student", "--out", tmp_path / "out",
            "--tokens", 16 * 4 * 4, "--ckpt-every", 2, "--eval-every", 2, *common)
    assert r.exit_code == 0, r.output
    out = tessera.load(tmp_path / "out")
    assert [p["stage"] for p in out.provenance][-2:] == ["prune", "distill"] and out.provenance[-1]["steps"] == 4
    log = json.loads((tmp_path / "out" / "distill_log.json").read_text())
    assert len(log) == 4 and log[-1]["heldout_kld"] < log[1]["heldout_kld"]
    assert json.loads((tmp_path / "out.ckpt" / "last" / "state.json").read_text())["step"] == 4
    assert_one_line_error(cli("distill", "--teacher", tmp_path / "parent", "--student", tmp_path / "student",
                              "--out", tmp_path / "out", *common), "already exists")
    other = random_model(tiny_arch(vocab=80))
    other.tokenizer = tiny_tokenizer(80)
    tessera.save(other, tmp_path / "other")
    assert_one_line_error(cli("distill", "--teacher", tmp_path / "parent", "--student", tmp_path / "other",
                              "--out", tmp_path / "o2", *common), "vocabulary")
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    assert_one_line_error(cli("distill", "--teacher", tmp_path / "parent", "--student", tmp_path / "student",
                              "--out", tmp_path / "o3", *common[2:], "--data", tmp_path / "short.txt"), "too short")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_resume_refuses_other_settings_or_inputs_and_names_them(teacher, chunks, tmp_path):
    distill(teacher, student_of(teacher), chunks, CFG, ckpt_dir=tmp_path, max_steps=2, progress=False)
    cases = [
        (dict(cfg=replace(CFG, lr=1e-3)), "lr 0.005 -> 0.001"),
        (dict(cfg=replace(CFG, batch=4, seed=1)), "batch 8 -> 4; seed 0 -> 1"),
        (dict(train=chunks.flip(0)), "train "),
        (dict(student=prune(teacher, random_importance(teacher, seed=1), PruneTarget(ffn=16, hidden=24))), "student "),
        (dict(cfg=replace(CFG, teacher_correction_steps=2)), "teacher_correction_steps 0 -> 2"),
    ]
    for change, needle in cases:
        args = dict(cfg=CFG, train=chunks, student=student_of(teacher)) | change
        with pytest.raises(TesseraError, match=f"other settings or inputs: .*{needle}") as info:
            distill(teacher, args["student"], args["train"], args["cfg"], ckpt_dir=tmp_path, resume=True,
                    progress=False)
        assert "\n" not in str(info.value)
    # eval / checkpoint frequency do not change the weights: allowed
    _, log = distill(teacher, student_of(teacher), chunks, replace(CFG, eval_every=3, ckpt_every=3),
                     ckpt_dir=tmp_path, resume=True, progress=False)
    assert [e["step"] for e in log] == list(range(1, 9))


def test_corrected_teacher_is_checkpointed_and_a_resumed_run_equals_an_uninterrupted_one(teacher, chunks, tmp_path,
                                                                                       monkeypatch):
    import tessera.distill as D

    cfg = replace(CFG, teacher_correction_steps=3, teacher_correction_lr=1e-2)
    full, _ = distill(teacher, student_of(teacher), chunks, cfg, ckpt_dir=tmp_path / "a", progress=False)
    distill(teacher, student_of(teacher), chunks, cfg, ckpt_dir=tmp_path / "b", max_steps=3, progress=False)
    assert (tmp_path / "b" / "teacher" / "teacher.safetensors").is_file()
    monkeypatch.setattr(D, "correct_teacher", lambda *a, **k: pytest.fail("the corrected teacher was recomputed"))
    resumed, _ = distill(teacher, student_of(teacher), chunks, cfg, ckpt_dir=tmp_path / "b", resume=True,
                         progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    uncorrected, _ = distill(teacher, student_of(teacher), chunks, CFG, progress=False)
    assert not torch.equal(uncorrected.lm_head.weight, full.lm_head.weight)  # the correction mattered
    assert [p["stage"] for p in resumed.provenance][-1] == "distill"


def test_distill_is_made_of_named_steps(teacher, chunks):
    """The loop is start_run -> train_step -> evaluate -> save_checkpoint -> finish; a caller can drive it."""
    from tessera.distill import evaluate, finish, start_run, train_step

    run = start_run(teacher, student_of(teacher), chunks, CFG, heldout=chunks[:4], ckpt_dir=None, compute_dtype=None)
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    entry = train_step(run)
    evaluate(run, entry)
    assert run.step == 1 and entry["loss"] > 0 and "heldout_kld" not in entry  # eval_every 4
    assert any(not torch.equal(before[k], v) for k, v in run.student.state_dict().items())
    assert run.inputs["train"] and finish(run).provenance[-1]["steps"] == 1


def test_cli_refuses_to_overwrite_an_earlier_runs_checkpoint(teacher, tmp_path):
    import tessera

    tessera.save(teacher, tmp_path / "parent")
    tessera.save(student_of(teacher), tmp_path / "student")
    ids = torch.randint(0, 92, (3000,), generator=torch.Generator().manual_seed(1))
    (tmp_path / "corpus.txt").write_text(" ".join(f"w{i}" for i in ids.tolist()))
    args = ["distill", "--teacher", tmp_path / "parent", "--student", tmp_path / "student", "--out", tmp_path / "out",
            "--data", tmp_path / "corpus.txt", "--seq-len", 16, "--batch", 4, "--tokens", 16 * 4 * 4, "--ckpt-every",
            2, "--device", "cpu"]
    (tmp_path / "out.ckpt" / "last").mkdir(parents=True)
    (tmp_path / "out.ckpt" / "last" / "state.json").write_text('{"step": 2}')
    assert_one_line_error(cli(*args), "holds a checkpoint of an earlier run (step 2); pass --resume")
    r = cli(*args, "--force", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["steps"] == 4 and out["data"]["train"]["split"] == "calibration"
    assert out["data"]["heldout"]["split"] == "selection" and out["compute_dtype"] == "fp32"


def test_bf16_on_the_cpu_runs_under_autocast_and_keeps_fp32_master_weights(teacher, chunks):
    """compute_dtype="bf16" on the CPU: the student's linear layers compute in bf16 (autocast), its weights stay
    fp32, and distillation still lowers the held-out KLD; the default (fp32) computes in fp32."""
    from tessera.distill import start_run, train_step
    from tessera.evaluate import mean_kld

    for dtype, expected in ((None, torch.float32), ("bf16", torch.bfloat16)):
        run = start_run(teacher, student_of(teacher), chunks, CFG, heldout=None, ckpt_dir=None, compute_dtype=dtype)
        seen: list[torch.dtype] = []
        down = run.student.model.layers[0].mlp.down_proj
        hook = down.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        train_step(run)
        hook.remove()
        assert seen == [expected] and run.compute_dtype == (dtype or "fp32")
        assert all(p.dtype == torch.float32 for p in run.student.parameters())
    student = student_of(teacher)
    before = mean_kld(teacher, student, chunks[:4]).kld
    student, log = distill(teacher, student, chunks[4:], CFG, heldout=chunks[:4], progress=False, compute_dtype="bf16")
    assert log[-1]["heldout_kld"] < 0.8 * before
