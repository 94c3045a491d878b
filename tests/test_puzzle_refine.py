"""Puzzle refinement: a child's in-context block costs are what restoring one layer really gives back, and the
rescaled MIP moves away from choices that cost more in the child than alone in the parent."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_arch
from tessera.data import DataSplit
from tessera.errors import TesseraError
from tessera.puzzle.assemble import assemble
from tessera.puzzle.costs import Target, predicted_costs
from tessera.puzzle.library import LibraryConfig, Variant, build_library, parent_variants
from tessera.puzzle.mip import Constraint, solve
from tessera.puzzle.refine import child_measure, refine, scaled
from tessera.puzzle.scoring import in_context_costs

CFG = LibraryConfig(ffn_fractions=(0.5, 0.25), ffn_multiple=8)


@pytest.fixture
def library(teacher, chunks, tmp_path):
    return build_library(teacher, CFG, chunks, tmp_path / "lib", parent_source="mem")


def kl_mean(parent, child, chunks, mask=None) -> float:
    logp = torch.log_softmax(parent(chunks).float(), -1)
    logq = torch.log_softmax(child(chunks).float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return (kl if mask is None else kl[mask]).mean().item()


def variant(library, layer: int, key: str) -> Variant:
    return next(v for v in library.variants(layer) if v.key == key)


@pytest.mark.parametrize("masked", [False, True])
def test_in_context_cost_is_the_kl_given_back_by_restoring_that_layer(teacher, library, chunks, masked):
    own = [parent_variants(teacher.arch, i) for i in range(teacher.arch.num_layers)]
    choice = list(own)
    choice[1] = (variant(library, 1, "attn.no_op"), own[1][1])
    choice[2] = (own[2][0], variant(library, 2, "ffn.linear"))
    choice[3] = (variant(library, 3, "attn.linear"), variant(library, 3, "ffn.swiglu-16"))
    child = assemble(teacher, library, choice)
    held = chunks[:6]
    mask = None
    data = held
    if masked:
        mask = torch.zeros_like(held, dtype=torch.bool)
        mask[:, 4:10] = True
        data = DataSplit("answers", held, "items", "abc", held.shape[1], mask=mask)
    total, costs = in_context_costs(teacher, child, data, [0, 1, 2, 3], batch_size=4)
    assert total == pytest.approx(kl_mean(teacher, child, held, mask), rel=1e-4)
    assert total > 0.01
    assert costs[0] == pytest.approx(0.0, abs=1e-6)  # layer 0 is the parent's: restoring it changes nothing
    for i in (1, 2, 3):
        restored = list(choice)
        restored[i] = own[i]
        expected = total - kl_mean(teacher, assemble(teacher, library, restored), held, mask)
        assert costs[i] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert any(abs(c) > 1e-3 for c in costs.values())


def test_in_context_costs_refuse_a_child_of_another_depth(teacher, chunks):
    from helpers import random_model

    shallow = random_model(tiny_arch(layers=2, heads=4, kv_heads=2, ffn=64))
    with pytest.raises(TesseraError, match="its layers"):
        in_context_costs(teacher, shallow, chunks[:2], [0])
    total, costs = in_context_costs(teacher, shallow, chunks[:2], [])  # the KL alone: any depth
    assert costs == {} and total == pytest.approx(kl_mean(teacher, shallow, chunks[:2]), rel=1e-4)


def test_in_context_costs_refuse_a_streamed_parent(teacher, chunks, tmp_path):
    import tessera
    from tessera.stream import open_streamed

    streamed = open_streamed(tessera.save(teacher, tmp_path / "m"), with_tokenizer=False)
    with pytest.raises(TesseraError, match="in memory"):
        in_context_costs(streamed, teacher, chunks[:2], [1])


def _problem(library, speedup=1.3):
    costs = predicted_costs(library.arch, [v for lv in library.layers for v in lv.all], Target("h100", "bf16", "64/64"))
    scores = {}
    for i in range(library.arch.num_layers):
        own = set(parent_variants(library.arch, i))
        for k, v in enumerate(library.variants(i)):
            scores[(i, v.key)] = 0.0 if v in own else 0.1 + 0.05 * ((3 * i + k) % 7)
    return costs, scores, lambda s, pairs=None: solve(s, costs, [Constraint("speedup", speedup, phase="decode")],
                                                      pair_scores=pairs)[0]


def _true_measure(scores, weights):
    """A child whose layer l costs weights[l] x its summed score (removals that interact, per layer)."""

    def measure(solution, layers=True):
        costs = {i: weights.get(i, 1.0) * (scores[(i, a)] + scores[(i, f)]) for i, (a, f) in enumerate(solution.keys)
                 if scores[(i, a)] + scores[(i, f)] > 0}
        return sum(costs.values()), costs if layers else {}

    return measure


def test_refinement_moves_away_from_layers_that_cost_more_in_the_child(library):
    costs, scores, mip = _problem(library)
    first = mip(scores)
    changed = [i for i, (a, f) in enumerate(first.keys) if scores[(i, a)] + scores[(i, f)] > 0]
    assert changed and len(changed) < library.arch.num_layers
    weights = dict.fromkeys(changed, 3.0)  # the first choice's layers cost three times their scores in context
    measure = _true_measure(scores, weights)
    asked = []
    best, history = refine(scores, mip, lambda sol, layers: asked.append(layers) or measure(sol, layers), rounds=4)
    # every round but the last measures the changed layers; the last one's costs would go unused
    assert asked == [True] * (len(history) - 1) + [len(history) < 4]
    assert all(r.costs for r in history[:-1]) and (history[-1].costs == {}) == (len(history) == 4)
    assert history[0].solution.keys == first.keys and history[0].factors == {}
    assert history[1].factors == {i: pytest.approx(3.0) for i in changed}  # learnt from round 0's measurement
    assert measure(best)[0] < measure(first)[0] - 1e-6  # strictly better in truth
    assert measure(best)[0] == min(r.measured for r in history)
    # the refined MIP's choice is the best under the truth it has learnt for those layers
    truth = mip(scaled(scores, weights))
    assert measure(best)[0] == pytest.approx(measure(truth)[0])
    assert all(r.solution.constraints[0][1] >= 1.3 - 1e-9 for r in history)  # every round meets the target
    assert [r.as_dict()["measured"] for r in history] == [r.measured for r in history]


def test_refinement_stops_when_the_scores_already_add_up(library):
    _, scores, mip = _problem(library)
    best, history = refine(scores, mip, _true_measure(scores, {}), rounds=5)
    assert len(history) == 1 and best.keys == mip(scores).keys  # factors 1: the same choice again, so it stops


def test_refinement_measures_a_library_child(teacher, library, chunks):
    """child_measure assembles the round's child and sums in-context costs over its data sets."""
    _, scores, mip = _problem(library)
    sol = mip(scores)
    measure = child_measure(teacher, library, [chunks[:4], chunks[4:8]])
    total, costs = measure(sol)
    child = assemble(teacher, library, sol.layers)
    assert total == pytest.approx(kl_mean(teacher, child, chunks[:4]) + kl_mean(teacher, child, chunks[4:8]), rel=1e-4)
    assert measure(sol, False) == (pytest.approx(total, rel=1e-6), {})  # the child's KL alone
    own = [tuple(v.key for v in parent_variants(teacher.arch, i)) for i in range(teacher.arch.num_layers)]
    assert set(costs) == {i for i, k in enumerate(sol.keys) if tuple(k) != own[i]}


def test_bad_refinement_settings_are_refused(library):
    _, scores, mip = _problem(library)
    with pytest.raises(TesseraError, match="rounds must be >= 1"):
        refine(scores, mip, _true_measure(scores, {}), rounds=0)
    with pytest.raises(TesseraError, match="clip"):
        refine(scores, mip, _true_measure(scores, {}), clip=(2.0, 4.0))
