"""Puzzle, after the MIP: refine its choice with the child's own measured costs.

Replace-1-block scores measure one block at a time in the parent, and the MIP adds them up. On a small parent
that sum misjudges a child once many blocks change, because removals interact: at 1.5x decode speed-up on
SmolLM2-135M the MIP's child (summed text + answer score 4.39) measures 5.01 on the same scoring data, and
ShortGPT's child of the same speed, whose dropped layers' scores add up to more, measures 4.53 (docs/results.md,
`benchmarks/puzzle_probe.py --part scoring`). `refine` closes the loop:

    round r:  solve the MIP on the scores, every variant's score in layer l scaled by the layer's factor f_l
              (1 to begin with), and each pair measured in an earlier round scored at its measured cost;
              assemble that child and measure its KL to the parent on the scoring data, and for each layer it
              changes, the in-context cost c_l of that layer's choice (the KL it loses when that layer alone gets
              the parent's block back: `tessera.puzzle.scoring.in_context_costs`);
              pair cost of (l, choice) <- c_l;  f_l <- clip(c_l / (the layer's summed score of that choice), lo, hi)
    until `rounds` rounds have run or a choice repeats; the child with the lowest measured KL is kept. The last
    round measures only the child's KL: no round follows to use its in-context costs (they are ~80 % of a round).

A layer whose change costs more among the child's other changes than alone in the parent gets its row scaled up,
so the next MIP changes it less. The factor multiplies every variant of the layer (the parent's own sub-blocks
score 0 either way), so one measurement per layer corrects the layer's whole row; by default it only ever raises
a row (lo = 1): a mild change that costs less in context says little about a drastic one in the same layer, and
scaling such rows down made the rounds oscillate in a trial on the default parent. The measured pair itself keeps
its measured cost, lower or higher. Costs, constraints, exclusions and engine rules are the MIP's own: every
round's child meets them.

Public API:

    refine(scores, solve_with, measure, rounds=3) -> (Solution, [Round])   the loop, on any solver and measurement
                                        (`solve_with(scores, pair_scores)`: the MIP, e.g. `tessera.puzzle.mip.solve`;
                                        `measure(solution, layers)`: the child's KL and, if `layers`, the in-context
                                        cost of each layer it changes)
    child_measure(parent, library, data) -> measure                        the measurement of a library's child
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tessera.errors import TesseraError
from tessera.puzzle.mip import Solution

Measure = Callable[[Solution, bool], tuple[float, dict[int, float]]]


@dataclass(frozen=True)
class Round:
    solution: Solution  # its objective is the MIP's, on the scaled scores
    summed: float  # the child's summed replace-1-block score (unscaled)
    measured: float  # the child's KL to the parent on the scoring data
    costs: dict[int, float]  # in-context cost of each changed layer's choice (the last round: none measured)
    factors: dict[int, float]  # the layer factors this round's MIP solved with (layers not listed: 1)

    def as_dict(self) -> dict[str, Any]:
        return {"chosen": [{"layer": i, "attention": a, "ffn": f} for i, (a, f) in enumerate(self.solution.keys)],
                "summed": self.summed, "objective": self.solution.objective, "measured": self.measured,
                "in_context": {str(k): v for k, v in sorted(self.costs.items())},
                "factors": {str(k): v for k, v in sorted(self.factors.items())}}


def scaled(scores: Mapping[tuple[int, str], float], factors: Mapping[int, float]) -> dict[tuple[int, str], float]:
    return {(layer, key): v * factors.get(layer, 1.0) for (layer, key), v in scores.items()}


def refine(scores: Mapping[tuple[int, str], float], solve_with: Callable[[Mapping, Mapping], Solution],
           measure: Measure, *, rounds: int = 3, clip: tuple[float, float] = (1.0, 4.0)) -> tuple[Solution, list[Round]]:
    """The best measured child over up to `rounds` MIP solutions, each solved on the scores rescaled by the
    previous children's in-context costs (module doc). `solve_with(scores, pair_scores)` is the MIP (constraints
    and all; `pair_scores` as `tessera.puzzle.mip.solve` takes them), `measure(solution, layers)` gives (the
    child's KL, {changed layer: in-context cost} or, when `layers` is false, {})."""
    if rounds < 1:
        raise TesseraError(f"refinement rounds must be >= 1, got {rounds}")
    lo, hi = clip
    if not 0 < lo <= 1 <= hi:
        raise TesseraError(f"factor clip must satisfy 0 < lo <= 1 <= hi, got {clip}")
    factors: dict[int, float] = {}
    pairs: dict[tuple[int, str, str], float] = {}
    history: list[Round] = []
    seen: set[tuple] = set()
    for r in range(rounds):
        solution = solve_with(scaled(scores, factors), dict(pairs))
        keys = tuple(solution.keys)
        if keys in seen:
            break
        seen.add(keys)
        measured, costs = measure(solution, r < rounds - 1)  # the last round's costs would go unused
        summed = sum(scores[(i, a)] + scores[(i, f)] for i, (a, f) in enumerate(keys))
        history.append(Round(solution, summed, measured, dict(costs), dict(factors)))
        for layer, cost in costs.items():
            a, f = keys[layer]
            pairs[(layer, a, f)] = max(cost, 0.0)
            factors[layer] = min(max(cost / max(scores[(layer, a)] + scores[(layer, f)], 1e-3), lo), hi)
    best = min(history, key=lambda r: r.measured)
    return best.solution, history


def child_measure(parent, library, data: Sequence, *, batch_size: int = 8) -> Measure:
    """`measure` for `refine`: assemble the solution's child from the library's trained variants and sum its KL
    and its layers' in-context costs over the data sets (e.g. the selection split and the answers of held-out task
    items, the data the scores were measured on). Layers where the child keeps the parent's block are not
    measured (they cost nothing); with `layers` false, none are (the child's KL only)."""
    from tessera.puzzle.assemble import assemble
    from tessera.puzzle.bld import variant_state
    from tessera.puzzle.library import parent_variants
    from tessera.puzzle.scoring import in_context_costs

    own = [tuple(v.key for v in parent_variants(library.arch, i)) for i in range(library.arch.num_layers)]

    def measure(solution: Solution, layers: bool = True) -> tuple[float, dict[int, float]]:
        child = assemble(parent, library, solution.layers,
                         weights=lambda i, v: variant_state(library, parent, i, v))
        changed = [i for i, k in enumerate(solution.keys) if tuple(k) != own[i]] if layers else []
        total, costs = 0.0, dict.fromkeys(changed, 0.0)
        for d in data:
            kl, per = in_context_costs(parent, child, d, changed, batch_size=batch_size)
            total += kl
            for i, c in per.items():
                costs[i] += c
        return total, costs

    return measure
