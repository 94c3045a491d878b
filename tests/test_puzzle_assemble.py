"""Puzzle stage 6: the assembled child is the MIP's choice (inspect, transformers), exact where it keeps the parent's
blocks, saved with search.json, and healed by global distillation (KL + every layer's cosine)."""

from __future__ import annotations

import json
import random

import pytest
import torch

import tessera
from helpers import cli, random_model, tiny_arch
from tessera.distill import DistillConfig, distill, layer_cosine_loss, run_model
from tessera.errors import TesseraError
from tessera.evaluate import mean_kld
from tessera.puzzle.assemble import assemble, choice_from_record, gkd_config, heal, save_child, search_record
from tessera.puzzle.costs import Target, predicted_costs
from tessera.puzzle.library import LibraryConfig, Variant, build_library, parent_variants
from tessera.puzzle.mip import Constraint, solve

CFG = LibraryConfig(ffn_fractions=(0.75, 0.5, 0.25), ffn_multiple=8)


@pytest.fixture
def library(teacher, chunks, tmp_path):
    return build_library(teacher, CFG, chunks, tmp_path / "lib", parent_source="mem")


def synthetic_scores(library, seed=0):
    """Replace-1-block-like scores: the parent's own sub-block 0, everything else positive (cheaper = worse)."""
    rng = random.Random(seed)
    scores = {}
    for i in range(library.arch.num_layers):
        own = set(parent_variants(library.arch, i))
        for v in library.variants(i):
            scores[(i, v.key)] = 0.0 if v in own else rng.uniform(0.1, 1.0)
    return scores


def search(library, speedup=1.1):
    costs = predicted_costs(library.arch, [v for lv in library.layers for v in lv.all], Target("h100", "bf16", "64/64"))
    constraints = [Constraint("speedup", speedup, phase="decode")]
    solution = solve(synthetic_scores(library), costs, constraints)[0]
    return costs, constraints, solution


def test_parents_own_variants_assemble_to_the_parent_exactly(teacher, library, chunks):
    child = assemble(teacher, library, [parent_variants(teacher.arch, i) for i in range(teacher.arch.num_layers)])
    assert child.arch == teacher.arch
    assert torch.equal(child(chunks[:2]), teacher(chunks[:2]))


def test_assembled_child_is_the_mips_choice_in_inspect_and_transformers(teacher, library, chunks, tmp_path):
    costs, constraints, solution = search(library)
    assert any(a.kind != "gqa" or f.spec.intermediate_size != 64 for a, f in solution.layers)  # really pruned
    child = assemble(teacher, library, solution.layers)
    assert child.arch == solution.arch(teacher.arch)
    record = search_record(library, synthetic_scores(library), costs, constraints, solution)
    out = save_child(child, tmp_path / "child", record)
    saved = json.loads((out / "search.json").read_text())
    assert choice_from_record(saved) == list(solution.layers)
    assert saved["predicted"] == pytest.approx(dict(solution.totals))
    assert saved["library"]["parent_fingerprint"] == library.parent_fingerprint
    assert saved["costs"]["target"]["hardware"] == "h100" and saved["constraints"][0]["kind"] == "speedup"

    result = cli("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["layers"]
    for row, (a, f) in zip(rows, solution.layers, strict=True):
        assert row["attention"] == a.kind and row["kv_heads"] == (a.spec.num_kv_heads or 0)
        assert row["ffn"] == f.kind and row["ffn_width"] == (f.spec.intermediate_size or 0)
    assert json.loads(result.output)["weights"]["verified"]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.allclose(hf(chunks[:2]).logits, child(chunks[:2]), atol=1e-5)
    again = tessera.load(out)
    assert torch.equal(again(chunks[:2]), child(chunks[:2]))
    assert again.provenance[-1]["stage"] == "puzzle.assemble"


def test_given_weights_are_used_and_a_foreign_choice_is_refused(teacher, library):
    _, _, solution = search(library)
    seen = []

    def weights(layer, v):
        seen.append((layer, v.key))
        return {k: torch.zeros_like(t) if k.endswith("proj.weight") else t
                for k, t in library.init_state(teacher, layer, v).items()}

    child = assemble(teacher, library, solution.layers, weights=weights)
    assert seen == [(i, v.key) for i, (a, f) in enumerate(solution.layers) for v in (a, f) if v.has_weights]
    for block in child.model.layers:
        if block.mlp is not None and hasattr(block.mlp, "down_proj"):
            assert not block.mlp.down_proj.weight.any()
    wide = [(a, Variant.from_key("ffn.swiglu-40")) for a, _ in solution.layers]
    with pytest.raises(TesseraError, match="ffn.swiglu-40 is not in the library"):
        assemble(teacher, library, wide)
    with pytest.raises(TesseraError, match="the choice has 2 layers"):
        assemble(teacher, library, solution.layers[:2])
    with pytest.raises(TesseraError, match="library built from a different parent"):
        assemble(random_model(teacher.arch, seed=9), library, solution.layers)


def test_layer_cosine_is_zero_for_the_teacher_itself_and_positive_otherwise(teacher, chunks):
    out = run_model(teacher, chunks[:2], states=True)
    assert len(out.states) == teacher.arch.num_layers
    assert layer_cosine_loss(out.states, out.states).item() == pytest.approx(0.0, abs=1e-6)
    other = run_model(random_model(teacher.arch, seed=3), chunks[:2], states=True)
    assert layer_cosine_loss(out.states, other.states).item() > 0.01


def test_global_distillation_heals_the_child(teacher, library, chunks):
    _, _, solution = search(library, speedup=1.15)
    child = assemble(teacher, library, solution.layers)
    before = mean_kld(teacher, child, chunks[-4:]).kld
    cfg = gkd_config(20 * 8 * 16, seq_len=16, batch=8, lr=3e-3, warmup_steps=2, eval_every=10**6, ckpt_every=10**6)
    assert cfg.loss == "kl+cosine-layers"
    healed, log = heal(teacher, child, chunks[:20], cfg, progress=False)
    assert log[-1]["loss"] < log[0]["loss"]
    assert mean_kld(teacher, healed, chunks[-4:]).kld < before
    with pytest.raises(TesseraError, match="kl\\+cosine-layers"):
        heal(teacher, child, chunks[:20], DistillConfig(tokens=256, seq_len=16), progress=False)
    shallow = random_model(tiny_arch(layers=2, heads=4, kv_heads=2, ffn=64))
    with pytest.raises(TesseraError, match="the teacher has 4 layers, the student 2"):
        distill(teacher, shallow, chunks, cfg, progress=False)
