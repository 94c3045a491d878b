"""Puzzle's variant costs and MIP search (tessera.puzzle.costs, tessera.puzzle.mip): exact against brute force on
small random instances, every constraint respected, diverse solutions, infeasibility explained with numbers."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from helpers import tiny_arch
from tessera.arch import AttentionSpec, FFNSpec
from tessera.cost import Scenario, predict
from tessera.errors import TesseraError
from tessera.hardware import GPUS
from tessera.puzzle.costs import Cost, CostTable, Target, measured_costs, parent_variants, predicted_costs
from tessera.puzzle.library import Variant
from tessera.puzzle.mip import Constraint, solve

ATT = [Variant("attention", AttentionSpec("gqa", k)) for k in (4, 2, 1)] + [
    Variant("attention", AttentionSpec("linear")), Variant("attention", AttentionSpec("no_op"))]
FFN = [Variant("ffn", FFNSpec("swiglu", w)) for w in (64, 48, 32, 16)] + [
    Variant("ffn", FFNSpec("linear")), Variant("ffn", FFNSpec("no_op"))]


# ---------------------------------------------------------------------------- predicted costs
@pytest.mark.parametrize("gpu,dtype,kv,batch,tp", [("h100", "bf16", None, 1, 1), ("h100", "fp8", "fp8", 64, 1),
                                                 ("a100", "bf16", None, 16, 2), ("b200", "nvfp4", None, 256, 1)])
def test_parent_variants_reproduce_the_parents_predicted_totals(gpu, dtype, kv, batch, tp):
    parent = tiny_arch(layers=3, hidden=64, heads=4, kv_heads=2, ffn=128)
    target = Target(gpu, dtype, ("128/128", "2048/64"), batch, kv, tp)
    table = predicted_costs(parent, [*ATT, *FFN], target)
    total = table.total((a.key, f.key) for a, f in parent_variants(parent))
    assert total == table.parent and total.params == parent.num_params()
    for i, s in enumerate(target.scenarios):
        p = predict(parent, GPUS[gpu], s, dtype=dtype, batch=batch, tp=tp, kv_dtype=target.kv)
        assert math.isclose(total.prefill_s[i], p.prefill_s, rel_tol=1e-12)
        assert math.isclose(total.decode_s[i], p.decode_s, rel_tol=1e-12)
        assert math.isclose(total.weight_bytes, p.weight_bytes, rel_tol=1e-12)
        assert math.isclose(batch * (s.input_len + s.output_len) * total.kv_bytes_per_token, p.kv_bytes, rel_tol=1e-12)
        m = table.metrics(total)
        assert math.isclose(m[f"tokens_per_s[{s},e2e]"], p.output_tokens_per_s, rel_tol=1e-12)
        assert m[f"speedup[{s},decode]"] == 1.0


def test_precision_variants_cost_less_and_pairs_are_blocks():
    parent = tiny_arch(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128)
    w = Variant("ffn", FFNSpec("swiglu", 128))
    q8, q4 = Variant("ffn", FFNSpec("swiglu", 128), "fp8"), Variant("ffn", FFNSpec("swiglu", 128), "nvfp4")
    t = predicted_costs(parent, [w, q8, q4, *ATT], Target("b200", "bf16", "128/1024", 8))
    assert t.sub[q8.key].weight_bytes == pytest.approx(t.sub[w.key].weight_bytes / 2)
    assert t.sub[q4.key].weight_bytes < t.sub[q8.key].weight_bytes
    assert t.sub[q4.key].params == t.sub[w.key].params
    assert t.sub[q8.key].decode_s[0] < t.sub[w.key].decode_s[0]
    gqa = ATT[1].key
    assert t.pair(gqa, q8.key) == t.sub[gqa] + t.sub[q8.key]  # mixed precision: the sum of its halves
    assert t.pair(ATT[4].key, w.key) == t.sub[w.key]


def test_cost_table_json_round_trip():
    parent = tiny_arch(layers=2)
    t = predicted_costs(parent, ATT[1:] + FFN[:2], Target("h100", "fp8", "128/128,128/1024", 4))
    back = CostTable.from_json(t.to_json())
    assert back == t and back.pairs == t.pairs and back.sub == t.sub and back.target.scenarios == t.target.scenarios
    with pytest.raises(TesseraError, match="malformed"):
        CostTable.from_json('{"source": 1}')


def test_measured_costs_add_up_and_agree_with_the_parameter_count():
    parent = tiny_arch(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64)
    target = Target("cpu", "fp32", "8/4", 2)
    t = measured_costs(parent, [ATT[0], FFN[1], FFN[4]], target, reps=1, warmup=0)
    assert t.source.startswith("measured")
    pred = predicted_costs(parent, t.variants, Target("h100", "fp32", "8/4", 2))
    for v in t.variants:
        assert (t.sub[v.key].params, t.sub[v.key].weight_bytes, t.sub[v.key].kv_bytes_per_token) == (
            pred.sub[v.key].params, pred.sub[v.key].weight_bytes, pred.sub[v.key].kv_bytes_per_token)
        assert t.sub[v.key].decode_s[0] >= 0 and (not v.has_weights or t.sub[v.key].params > 0)
    assert t.pair(ATT[0].key, FFN[1].key) == t.sub[ATT[0].key] + t.sub[FFN[1].key]
    assert t.parent.params == parent.num_params() and t.fixed.decode_s[0] > 0
    with pytest.raises(TesseraError, match="tp 1"):
        measured_costs(parent, [], Target("cpu", "fp32", "8/4", 1, tp=2))


# ---------------------------------------------------------------------------- MIP vs brute force
def part(key: str) -> str:
    return Variant.from_key(key).part


def random_table(rng: random.Random, layers: int, scenarios=("16/8", "64/32")) -> CostTable:
    """Random costs for every variant, pairs deliberately not the sum of their halves (as block rooflines are)."""
    parent = tiny_arch(layers=layers, hidden=32, heads=4, kv_heads=4, ffn=64)
    target = Target("h100", "bf16", scenarios, rng.choice([1, 4]))
    variants = [*ATT, *FFN]
    n = len(target.scenarios)

    def rand_cost(v: Variant) -> Cost:
        if not v.has_weights:
            return Cost.zero(n)
        p = rng.randint(100, 5000)
        kv = float(2 * v.spec.num_kv_heads * 8 * 2) if v.spec.kind == "gqa" else 0.0
        return Cost(p, 2.0 * p, kv, tuple(rng.uniform(1, 5) * p * 1e-6 for _ in range(n)),
                    tuple(rng.uniform(1, 5) * p * 1e-5 for _ in range(n)))

    sub = {v.key: rand_cost(v) for v in variants}
    pairs = {}
    for a, f in itertools.product(ATT, FFN):
        s, k = sub[a.key] + sub[f.key], rng.uniform(0.8, 1.1)
        pairs[(a.key, f.key)] = Cost(s.params, s.weight_bytes, s.kv_bytes_per_token,
                                     tuple(x * k for x in s.prefill_s), tuple(x * k for x in s.decode_s))
    fixed = Cost(3000, 6000.0, 0.0, tuple(rng.uniform(0.5, 2) * 1e-3 for _ in range(n)),
                 tuple(rng.uniform(0.5, 2) * 1e-2 for _ in range(n)))
    table = CostTable(parent, target, "random", tuple(variants), sub, pairs, fixed, Cost.zero(n))
    from dataclasses import replace
    return replace(table, parent=table.total((ATT[0].key, FFN[0].key) for _ in range(layers)))


def random_scores(rng: random.Random, layers: int) -> dict:
    scores = {}
    for layer in range(layers):
        for v in rng.sample(ATT, 3) + rng.sample(FFN, 4):  # not every variant at every layer
            scores[(layer, v.key)] = rng.uniform(0, 1)
    return scores


def check(table: CostTable, layers, c: Constraint, m: dict | None = None) -> list[float] | None:
    """The constraint's values for a child, recomputed from the metrics; None when it is violated."""
    m = m or table.metrics(table.total(layers))
    scen = [str(s) for s in table.target.scenarios if c.scenario in (None, str(s))]
    if c.kind == "params":
        vals = [m["params"]]
    elif c.kind in ("memory", "kv_cache"):
        key = {"memory": "memory_bytes", "kv_cache": "kv_cache_bytes"}[c.kind]
        vals = [m[f"{key}[{s}]"] for s in scen]
    elif c.kind == "latency":
        vals = [m[f"seconds[{s},{c.phase}]"] / (Scenario.parse(s).output_len if c.phase == "decode" else 1) for s in scen]
    else:
        key = "tokens_per_s" if c.kind == "throughput" else "speedup"
        vals = [m[f"{key}[{s},{c.phase}]"] for s in scen]
    ok = all(v >= c.bound * (1 - 1e-9) for v in vals) if c.sense == ">=" else all(v <= c.bound * (1 + 1e-9) for v in vals)
    return vals if ok else None


def choices(scores, layers: int, exclude=()):
    """Every child the score table allows, as per-layer (attention key, FFN key) tuples."""
    options = []
    for layer in range(layers):
        att = [k for (i, k) in scores if i == layer and part(k) == "attention"]
        ffn = [k for (i, k) in scores if i == layer and part(k) == "ffn"]
        options.append([(a, f) for a in att for f in ffn if (a, f) not in exclude])
    return list(itertools.product(*options))


def brute_force(table, scores, constraints, exclude=(), previous=(), min_diff=1, pairs=None):
    """(lowest summed score, its choice) over every allowed child meeting the constraints, or None. `pairs`:
    {(layer, attention key, FFN key): score} in place of the sum of the two halves."""
    L = table.num_layers
    best = None
    at = {e for e in exclude if len(e) == 3}
    for choice in choices(scores, L, {e for e in exclude if len(e) == 2}):
        if any((i, a, f) in at for i, (a, f) in enumerate(choice)):
            continue
        if any(sum(c == p for c, p in zip(choice, prev)) > L - min_diff for prev in previous):
            continue
        m = table.metrics(table.total(choice))
        if all(check(table, choice, c, m) is not None for c in constraints):
            obj = sum((pairs or {}).get((i, a, f), scores[(i, a)] + scores[(i, f)]) for i, (a, f) in enumerate(choice))
            if best is None or obj < best[0] - 1e-12:
                best = (obj, choice)
    return best


def random_constraints(rng: random.Random, table: CostTable, mix: int) -> list[Constraint]:
    """Bounds drawn between the all-smallest and the parent's value, so some instances are tight or infeasible."""
    par = table.metrics(table.parent)
    s0, s1 = (str(s) for s in table.target.scenarios)
    f = lambda: rng.uniform(0.3, 1.0)  # noqa: E731
    mixes = [
        [Constraint("speedup", rng.uniform(1.0, 2.5), phase="decode")],
        [Constraint("memory", par[f"memory_bytes[{s1}]"] * f()), Constraint("params", par["params"] * f())],
        [Constraint("throughput", par[f"tokens_per_s[{s0},e2e]"] * rng.uniform(1, 2), scenario=s0),
         Constraint("latency", par[f"seconds[{s1},prefill]"] * f(), scenario=s1, phase="prefill"),
         Constraint("kv_cache", par[f"kv_cache_bytes[{s1}]"] * f())],
        [Constraint("speedup", rng.uniform(1.0, 2.0)), Constraint("latency", par[f"seconds[{s0},decode]"] / 32 * f(),
                                                                  phase="decode"),
         Constraint("memory", par[f"memory_bytes[{s0}]"] * f(), scenario=s0), Constraint("params", par["params"] * f())],
    ]
    return mixes[mix]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mix", range(4))
def test_mip_equals_brute_force_and_respects_every_constraint(seed, mix):
    rng = random.Random(1000 * mix + seed)
    layers = 3
    table, scores = random_table(rng, layers), random_scores(rng, layers)
    constraints = random_constraints(rng, table, mix)
    exclude = {(ATT[0].key, FFN[5].key), (ATT[1].key, FFN[5].key)}  # at every layer
    best = brute_force(table, scores, constraints, exclude | {(2, ATT[2].key, FFN[4].key)})
    if best is None:
        with pytest.raises(TesseraError, match="no child meets|out of reach"):
            solve(scores, table, constraints, exclude=[*exclude, (2, ATT[2].key, FFN[4].key)])
        return
    (sol,) = solve(scores, table, constraints, exclude=[*exclude, (2, ATT[2].key, FFN[4].key)], mip_rel_gap=0)
    assert sol.objective == pytest.approx(best[0], abs=1e-9)
    assert all(check(table, sol.keys, c) is not None for c in constraints)
    assert not set(sol.keys) & exclude and sol.keys[2] != (ATT[2].key, FFN[4].key)
    assert sol.objective == pytest.approx(sum(scores[(i, a)] + scores[(i, f)] for i, (a, f) in enumerate(sol.keys)))
    for label, value in sol.constraints:  # reported values are the recomputed ones
        kind = label.split("[")[0].split(" ")[0]
        c = next(c for c in constraints if c.kind == kind)
        assert value in check(table, sol.keys, c) or kind == "params" and value == sol.totals["params"]


@pytest.mark.parametrize("seed", range(6))
def test_a_pairs_own_score_replaces_the_sum_of_its_halves(seed):
    """pair_scores (e.g. a pair measured in a child's context, tessera.puzzle.refine) price one pair at one layer."""
    rng = random.Random(50 + seed)
    layers = 3
    table, scores = random_table(rng, layers), random_scores(rng, layers)
    constraints = [Constraint("speedup", 1.2, phase="decode")]
    (plain,) = solve(scores, table, constraints, mip_rel_gap=0)
    pairs = {(i, a, f): 5.0 for i, (a, f) in enumerate(plain.keys)}  # the plain optimum's pairs made dear ...
    options = choices(scores, layers)
    for _ in range(6):  # ... and some others cheap
        i = rng.randrange(layers)
        a, f = rng.choice(options)[i]
        pairs.setdefault((i, a, f), rng.uniform(0, 0.2))
    best = brute_force(table, scores, constraints, pairs=pairs)
    (sol,) = solve(scores, table, constraints, pair_scores=pairs, mip_rel_gap=0)
    assert sol.objective == pytest.approx(best[0], abs=1e-9)
    assert sol.keys != plain.keys
    with pytest.raises(TesseraError, match="pair score"):
        solve(scores, table, constraints, pair_scores={(0, "attn.no_op"): 1.0})


@pytest.mark.parametrize("seed", range(4))
def test_diverse_solutions_really_differ_and_are_each_the_best_left(seed):
    rng = random.Random(seed)
    layers = 3
    table, scores = random_table(rng, layers), random_scores(rng, layers)
    constraints = [Constraint("speedup", 1.2, phase="decode")]
    alpha = 0.5  # each new child differs from every earlier one in >= ceil(1.5) = 2 of 3 layers
    sols = solve(scores, table, constraints, num_solutions=4, alpha=alpha, mip_rel_gap=0)
    assert len(sols) >= 2
    previous = []
    for s in sols:
        best = brute_force(table, scores, constraints, previous=previous, min_diff=2)
        assert s.objective == pytest.approx(best[0], abs=1e-9)
        for prev in previous:
            assert sum(a != b for a, b in zip(s.keys, prev)) >= 2
        previous.append(s.keys)
    assert [s.objective for s in sols] == sorted(s.objective for s in sols)
    unreduced = solve(scores, table, constraints, num_solutions=4, alpha=alpha, mip_rel_gap=0, reduce=False)
    assert [s.objective for s in unreduced] == pytest.approx([s.objective for s in sols], abs=1e-9)


# ---------------------------------------------------------------------------- infeasibility, exclusions, bad input
def test_infeasible_alone_names_the_constraint_and_the_best_value():
    rng = random.Random(7)
    table, scores = random_table(rng, 3), random_scores(rng, 3)
    # the fastest this library reaches at 16/8 decode, computed by hand: the cheapest allowed pair per layer
    fastest = table.fixed.decode_s[0] + sum(
        min(table.pair(a, f).decode_s[0] for (i, a) in scores if i == layer and part(a) == "attention"
            for (j, f) in scores if j == layer and part(f) == "ffn")
        for layer in range(3))
    best = table.parent.decode_s[0] / fastest
    empty = table.parent.decode_s[0] / table.fixed.decode_s[0]
    asked = (best + empty) / 2 if empty > best else None
    if asked is None:
        pytest.skip("this draw's library holds the empty layer everywhere")
    with pytest.raises(TesseraError) as err:
        solve(scores, table, [Constraint("speedup", asked, scenario="16/8", phase="decode")])
    msg = str(err.value)
    assert "speedup[16/8,decode]" in msg and "cannot be met" in msg and f"{best:.3f}x" in msg


def test_target_beyond_the_empty_model_is_refused_with_its_number():
    rng = random.Random(3)
    table, scores = random_table(rng, 3), random_scores(rng, 3)
    empty = table.parent.decode_s[1] / table.fixed.decode_s[1]
    with pytest.raises(TesseraError) as err:
        solve(scores, table, [Constraint("speedup", empty * 1.01, scenario="64/32", phase="decode")])
    assert "every layer empty" in str(err.value) and f"{empty:.3f}x" in str(err.value)
    with pytest.raises(TesseraError, match="every layer empty"):
        solve(scores, table, [Constraint("params", table.fixed.params - 1)])


def test_jointly_infeasible_gives_each_best_under_the_others():
    rng = random.Random(11)
    table, scores = random_table(rng, 3), random_scores(rng, 3)
    scores = {k: v for k, v in scores.items() if "no_op" not in k[1]}  # the empty layer would be fastest and smallest
    every = choices(scores, 3)
    speed = lambda ch: table.metrics(table.total(ch))["speedup[16/8,decode]"]  # noqa: E731
    # a parameter bound just below the fastest child's, and a speed-up half-way between the best reachable under
    # it and the fastest child's: each can be met alone, not both
    fastest = max(every, key=speed)
    params = Constraint("params", table.total(fastest).params - 1)
    best_speed = max(speed(ch) for ch in every if check(table, ch, params) is not None)
    sp = Constraint("speedup", (best_speed + speed(fastest)) / 2, scenario="16/8", phase="decode")
    least_params = min(table.total(ch).params for ch in every if check(table, ch, sp) is not None)
    assert least_params > params.bound
    with pytest.raises(TesseraError) as err:
        solve(scores, table, [sp, params])
    msg = str(err.value)
    assert "together" in msg
    assert f"speedup[16/8,decode] >= {sp.bound:.3f}x: best {best_speed:.3f}x under the others" in msg
    assert f"best {least_params / 1e6:.4g}M params under the others" in msg


def test_llamacpp_exclusion_removes_no_op_ffn_beside_attention():
    parent = tiny_arch(layers=4, hidden=32, heads=4, kv_heads=2, ffn=64)
    table = predicted_costs(parent, [*ATT, *FFN], Target("h100", "bf16", "128/128", 1))
    # an empty FFN is nearly free in score, so without the rule the search takes it beside real attention
    scores = {(i, v.key): (0.0 if v in (ATT[1], FFN[0]) else 0.5 if v.part == "attention" else 0.01)
              for i in range(4) for v in [*ATT, *FFN]}
    scores.update({(i, FFN[5].key): 0.001 for i in range(4)})
    # 1.3x, or halfway to the most any child reaches (every layer empty) when an engine's per-step overhead
    # bounds what a toy model can gain
    bound = min(1.3, 1 + 0.5 * (table.parent.decode_s[0] / table.fixed.decode_s[0] - 1))
    cons = [Constraint("speedup", bound, phase="decode")]
    (free,) = solve(scores, table, cons)
    assert any(not f.has_weights and a.has_weights for a, f in free.layers)
    (served,) = solve(scores, table, cons, engine="llamacpp")
    assert not any(not f.has_weights and a.has_weights for a, f in served.layers)
    assert not any(f.spec.kind == "linear" for _, f in served.layers)
    assert served.objective >= free.objective
    assert served.constraints[0][1] >= bound


def test_solution_gives_blocks_arch_and_totals():
    parent = tiny_arch(layers=3, hidden=32, heads=4, kv_heads=2, ffn=64)
    table = predicted_costs(parent, [*ATT, *FFN], Target("h100", "bf16", "128/128", 8))
    scores = {(i, v.key): float(v not in (ATT[1], FFN[0])) for i in range(3) for v in [*ATT, *FFN]}
    (sol,) = solve(scores, table)  # no constraint: the parent itself, score 0
    assert sol.arch(parent) == parent and sol.objective == 0 and sol.totals["params"] == parent.num_params()
    assert sol.as_dict()["layers"][0] == {"attention": ATT[1].key, "ffn": FFN[0].key}


def test_bad_requests_get_one_clear_error():
    rng = random.Random(0)
    table, scores = random_table(rng, 2), random_scores(rng, 2)
    with pytest.raises(TesseraError, match="unknown constraint"):
        Constraint("speed", 2)
    with pytest.raises(TesseraError, match="positive"):
        Constraint("speedup", -1)
    with pytest.raises(TesseraError, match="not one of the costed scenarios"):
        solve(scores, table, [Constraint("speedup", 1.1, scenario="1/1")])
    with pytest.raises(TesseraError, match="layers 0..1"):
        solve({**scores, (5, ATT[0].key): 0.1}, table)
    with pytest.raises(TesseraError, match="not costed"):
        solve({**scores, (0, "ffn.swiglu-40"): 0.1}, table)
    with pytest.raises(TesseraError, match="layer 1: no attention"):
        solve({k: v for k, v in scores.items() if not (k[0] == 1 and part(k[1]) == "attention")}, table)
    with pytest.raises(TesseraError, match="alpha"):
        solve(scores, table, num_solutions=2, alpha=1.0)
    with pytest.raises(TesseraError, match="scenario"):
        Target("h100", "bf16", (), 1)
