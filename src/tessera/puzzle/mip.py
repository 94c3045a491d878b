"""The Puzzle search: choose one attention and one FFN variant per layer by mixed-integer programming.

Formulation (Puzzle, arXiv 2411.19146, section 4; solved with `scipy.optimize.milp`, i.e. HiGHS):

    variables   y[l, a, f] in {0, 1}: layer l takes attention variant a and FFN variant f, for every pair whose
                two halves are scored at layer l, are costed, and are not excluded
    minimise    sum  y[l, a, f] * (score[l, a] + score[l, f])        (replace-1-block scores, e.g. KL to the parent;
                                                                       a pair's own score where one is given)
    subject to  sum_(a, f) y[l, a, f] = 1                              for every layer l
                fixed_r + sum y[l, a, f] * r(pair a, f) <= R           for every resource row r below
                sum_l y[l, a_l^k, f_l^k] <= L - ceil((1 - alpha) * L)   for every earlier solution k (diversity)

A layer's choice is a pair, so a pair may cost more or less than its halves (the roofline of a whole block) and
an engine may refuse a pair whose halves it accepts alone (llama.cpp: a no-op FFN beside real attention);
exclusions simply leave the pair's variable out. Every requirement is a `Constraint`, turned into rows of a
resource that is linear in the choice (`fixed` = embedding, head and per-step overhead from the cost table):

    memory     <= M bytes  (per GPU)  weights + KV cache of batch x (IN + OUT) tokens, per scenario
    kv_cache   <= K bytes  (per GPU)  KV cache of batch x (IN + OUT) tokens, per scenario
    params     <= P                   parameters (embedding and head included)
    throughput >= T tok/s  (per GPU)  seconds of the phase <= batch x tokens / (T x tp), per scenario
    speedup    >= S                   seconds of the phase <= parent's seconds / S, per scenario
    latency    <= L s                 seconds of the phase (decode: per output token), per scenario

where the phase is `e2e` (prefill + decode; tokens = OUT), `decode` (tokens = OUT) or `prefill` (tokens = IN),
and a constraint without a scenario holds for every scenario of the target at once. Rows are scaled by their
bound; pairs dominated in score and in every row (by a pair that no earlier solution chose) are dropped before
solving, which leaves the optimum unchanged and makes the paper's scale (80 layers x 54 pairs) solve in well
under a second.

Several solutions: each new one must differ from every earlier one in at least (1 - alpha) x L layers.
An infeasible request raises a `TesseraError` naming each constraint that cannot be met and the best value
reachable (that constraint alone, or with the others when each alone is reachable); a bound beyond even the
child with every layer empty (e.g. a speed-up above the embedding-and-head-only model's) is refused with that
model's number before solving.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.arch import ArchSpec, BlockSpec
from tessera.errors import TesseraError
from tessera.puzzle.costs import Cost, CostTable, phase_seconds
from tessera.puzzle.library import Variant, block_of

KINDS = ("memory", "kv_cache", "params", "throughput", "speedup", "latency")
PHASES = ("e2e", "decode", "prefill")
_AT_LEAST = ("throughput", "speedup")


@dataclass(frozen=True)
class Constraint:
    """One requirement on the child. `scenario` (e.g. "128/1024") picks one scenario of the target; None means
    every scenario. `phase` (e2e | decode | prefill) applies to throughput, speedup and latency."""

    kind: str
    bound: float
    scenario: str | None = None
    phase: str = "e2e"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TesseraError(f"unknown constraint {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.phase not in PHASES:
            raise TesseraError(f"unknown phase {self.phase!r}; use one of {', '.join(PHASES)}")
        if not (isinstance(self.bound, (int, float)) and math.isfinite(self.bound) and self.bound > 0):
            raise TesseraError(f"constraint {self.kind}: the bound must be a positive number, got {self.bound!r}")
        if self.scenario is not None:
            object.__setattr__(self, "scenario", str(self.scenario))

    @property
    def sense(self) -> str:
        return ">=" if self.kind in _AT_LEAST else "<="


@dataclass(frozen=True)
class _Row:
    """One linear row: resource(child) <= limit, with its user-facing value."""

    label: str
    constraint: Constraint
    resource: Callable[[Cost], float]  # linear, zero at Cost.zero
    limit: float
    value: Callable[[float], float]  # resource total -> the constraint's metric (tok/s, x, bytes, s)
    unit: str


def _fmt(kind: str, v: float) -> str:
    if kind in ("memory", "kv_cache"):
        return f"{v / 1e9:.4g} GB"
    if kind == "params":
        return f"{v / 1e9:.4g}B params" if v >= 1e9 else f"{v / 1e6:.4g}M params"
    if kind == "throughput":
        return f"{v:,.1f} tok/s"
    if kind == "speedup":
        return f"{v:.3f}x"
    return f"{v * 1e3:.4g} ms"


def _rows(costs: CostTable, constraints: Sequence[Constraint]) -> list[_Row]:
    t = costs.target
    names = [str(s) for s in t.scenarios]
    rows = []
    for c in constraints:
        if not isinstance(c, Constraint):
            raise TesseraError(f"expected Constraint objects, got {type(c).__name__}")
        if c.scenario is not None and c.scenario not in names:
            raise TesseraError(f"constraint {c.kind}: scenario {c.scenario} is not one of the costed scenarios "
                               f"({', '.join(names)}); cost the library for it")
        if c.kind == "params":
            rows.append(_Row(f"params <= {_fmt('params', c.bound)}", c, lambda x: float(x.params), c.bound,
                             lambda r: r, "params"))
            continue
        for i, s in enumerate(t.scenarios):
            if c.scenario is not None and c.scenario != str(s):
                continue
            seq, B, tp = s.input_len + s.output_len, t.batch, t.tp
            where = f"{s}" if c.kind in ("memory", "kv_cache") else f"{s},{c.phase}"
            label = f"{c.kind}[{where}] {c.sense} {_fmt(c.kind, c.bound)}"
            sec = lambda x, i=i, p=c.phase: phase_seconds(x, i, p)  # noqa: E731
            if c.kind == "memory":
                rows.append(_Row(label, c, lambda x, n=B * seq / tp, tp=tp: x.weight_bytes / tp + n * x.kv_bytes_per_token,
                                 c.bound, lambda r: r, "bytes"))
            elif c.kind == "kv_cache":
                rows.append(_Row(label, c, lambda x, n=B * seq / tp: n * x.kv_bytes_per_token, c.bound,
                                 lambda r: r, "bytes"))
            elif c.kind == "latency":
                per = s.output_len if c.phase == "decode" else 1
                rows.append(_Row(label, c, lambda x, sec=sec, per=per: sec(x) / per, c.bound, lambda r: r, "s"))
            elif c.kind == "throughput":
                tokens = B * (s.input_len if c.phase == "prefill" else s.output_len) / tp
                rows.append(_Row(label, c, sec, tokens / c.bound,
                                 lambda r, tokens=tokens: tokens / r if r > 0 else math.inf, "tok/s"))
            else:  # speedup
                parent = phase_seconds(costs.parent, i, c.phase)
                rows.append(_Row(label, c, sec, parent / c.bound,
                                 lambda r, parent=parent: parent / r if r > 0 else math.inf, "x"))
    return rows


@dataclass(frozen=True)
class Solution:
    """One child: per layer (attention variant, FFN variant), the summed score and every predicted total."""

    layers: tuple[tuple[Variant, Variant], ...]
    objective: float
    constraints: tuple[tuple[str, float], ...]  # (constraint row, predicted value), in the request's order
    totals: Mapping[str, float] = field(compare=False)  # CostTable.metrics of the child
    optimal: bool = True  # False: the time limit stopped HiGHS with a feasible, maybe not optimal, choice

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(a.key, f.key) for a, f in self.layers]

    def blocks(self) -> tuple[BlockSpec, ...]:
        return tuple(block_of(a, f) for a, f in self.layers)

    def arch(self, parent: ArchSpec) -> ArchSpec:
        return parent.with_blocks(self.blocks())

    def as_dict(self) -> dict[str, Any]:
        return {"layers": [{"attention": a.key, "ffn": f.key} for a, f in self.layers], "objective": self.objective,
                "constraints": dict(self.constraints), "totals": dict(self.totals), "optimal": self.optimal}


# ---------------------------------------------------------------------------- building the program
@dataclass
class _Program:
    layer_of: np.ndarray  # (n,) layer of each variable
    pair_of: list[tuple[str, str]]  # (n,) (attention key, FFN key)
    score: np.ndarray  # (n,)
    A: np.ndarray  # (rows, n) resource of each variable
    fixed: np.ndarray  # (rows,) resource of the fixed part
    limit: np.ndarray  # (rows,)


def _options(scores: Mapping[tuple[int, str], float], costs: CostTable, engine: str | None,
             exclude: Collection[tuple]) -> list[list[tuple[str, str]]]:
    """Allowed (attention key, FFN key) pairs per layer."""
    from tessera.formats.engines import block_reason, check_engine

    L = costs.num_layers
    known = {v.key: v for v in costs.variants}
    per_layer: list[dict[str, list[str]]] = [{"attention": [], "ffn": []} for _ in range(L)]
    for key, value in scores.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TesseraError(f"score table keys are (layer, variant key) pairs, got {key!r}")
        layer, vkey = key
        if not (isinstance(layer, (int, np.integer)) and 0 <= layer < L):
            raise TesseraError(f"score for layer {layer!r}: the parent has layers 0..{L - 1}")
        if vkey not in known:
            raise TesseraError(f"variant {vkey} is scored but not costed; cost the library again with it")
        if not (isinstance(value, (int, float, np.floating)) and math.isfinite(value)):
            raise TesseraError(f"score of {vkey} at layer {layer} is {value!r}; scores must be finite numbers")
        per_layer[layer][known[vkey].part].append(vkey)
    if engine is not None:
        check_engine(engine)
    excluded_all = {tuple(e) for e in exclude if len(e) == 2}  # (attention key, FFN key): every layer
    excluded_at = {tuple(e) for e in exclude if len(e) == 3}  # (layer, attention key, FFN key)
    out = []
    for layer, parts in enumerate(per_layer):
        allowed = []
        for a in sorted(parts["attention"]):
            for f in sorted(parts["ffn"]):
                if (a, f) in excluded_all or (layer, a, f) in excluded_at:
                    continue
                if engine is not None and block_reason(engine, costs.parent_arch,
                                                       block_of(known[a], known[f])) is not None:
                    continue
                costs.pair(a, f)  # raises if not costed
                allowed.append((a, f))
        if not allowed:
            missing = [p for p in ("attention", "ffn") if not parts[p]]
            why = f"no {' or '.join(missing)} variant is scored" if missing else "every pair is excluded"
            raise TesseraError(f"layer {layer}: {why}; score at least one attention and one FFN variant it may take")
        out.append(allowed)
    return out


def _program(scores, costs: CostTable, rows: list[_Row], options, pair_scores=None) -> _Program:
    layer_of, pair_of, score = [], [], []
    pair_scores = pair_scores or {}
    for layer, allowed in enumerate(options):
        for a, f in allowed:
            layer_of.append(layer)
            pair_of.append((a, f))
            summed = float(scores[(layer, a)]) + float(scores[(layer, f)])
            score.append(float(pair_scores.get((layer, a, f), summed)))
    A = np.array([[r.resource(costs.pair(a, f)) for a, f in pair_of] for r in rows]).reshape(len(rows), len(pair_of))
    fixed = np.array([r.resource(costs.fixed) for r in rows])
    limit = np.array([r.limit for r in rows])
    return _Program(np.array(layer_of), pair_of, np.array(score), A, fixed, limit)


def _undominated(p: _Program, rows_used: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """Mask of variables to keep: drop a pair when another pair of its layer, not chosen by an earlier solution,
    is no worse in score and in every used row (and better in one, or an exact duplicate listed earlier)."""
    keep = np.ones(len(p.score), bool)
    X = np.column_stack([p.score, p.A[rows_used].T]) if rows_used.any() else p.score[:, None]
    for layer in np.unique(p.layer_of):
        idx = np.flatnonzero(p.layer_of == layer)
        Y = X[idx]
        tol = 1e-12 * (1 + np.abs(Y).max(0))
        no_worse = (Y[None, :, :] <= Y[:, None, :] + tol).all(-1)  # [i, j]: j no worse than i
        better = (Y[None, :, :] < Y[:, None, :] - tol).any(-1)
        same = no_worse & (Y[:, None, :] <= Y[None, :, :] + tol).all(-1)
        earlier = np.arange(len(idx))[None, :] < np.arange(len(idx))[:, None]
        dominated_by = (no_worse & better) | (same & earlier)
        dominated_by &= ~protected[idx][None, :]
        np.fill_diagonal(dominated_by, False)
        keep[idx] = ~dominated_by.any(1)
    return keep


def _solve(p: _Program, row_mask: np.ndarray, objective: np.ndarray, previous: list[np.ndarray], min_diff: int,
           time_limit_s: float, gap: float, reduce: bool = True) -> tuple[np.ndarray | None, bool]:
    """The MIP restricted to rows `row_mask`, minimising `objective`: (chosen mask or None if infeasible, optimal).

    Exact reduced-cost fixing around HiGHS: the LP relaxation gives a bound z_LP and reduced costs d >= 0 with
    objective(x) >= z_LP + sum d_j x_j for every feasible 0/1 choice x. HiGHS first solves the MIP over the
    variables with d_j <= t (and the LP's support); its optimum z is global when z - z_LP <= t, since any choice
    using a variable with d_j > t costs more; otherwise one more MIP over every d_j <= z - z_LP settles it."""
    from scipy.optimize import Bounds, LinearConstraint, linprog, milp
    from scipy.sparse import csr_array

    L = int(p.layer_of.max()) + 1
    protected = np.zeros(len(p.score), bool)
    for prev in previous:
        protected |= prev
    keep = np.flatnonzero(_undominated(_Program(p.layer_of, p.pair_of, objective, p.A, p.fixed, p.limit), row_mask,
                                       protected))
    n = len(keep)
    eq = csr_array((np.ones(n), (p.layer_of[keep], np.arange(n))), shape=(L, n))
    ub_rows, ub_rhs = [], []
    if row_mask.any():
        scale = np.where(p.limit[row_mask] > 0, p.limit[row_mask], 1.0)
        ub_rows.append(p.A[row_mask][:, keep] / scale[:, None])
        ub_rhs.append((p.limit[row_mask] - p.fixed[row_mask]) / scale)
    for prev in previous:
        ub_rows.append(prev[keep].astype(float)[None, :])
        ub_rhs.append(np.array([L - min_diff], float))
    A_ub = np.vstack(ub_rows) if ub_rows else np.zeros((0, n))
    b_ub = np.concatenate(ub_rhs) if ub_rhs else np.zeros(0)
    c = objective[keep]

    lp = linprog(c, A_ub=A_ub if len(b_ub) else None, b_ub=b_ub if len(b_ub) else None, A_eq=eq, b_eq=np.ones(L),
                 bounds=(0, 1), method="highs") if reduce else None
    if lp is not None and lp.status == 2:
        return None, False  # the relaxation is infeasible, so is the MIP
    if lp is None or lp.status != 0:  # no bound to fix with (or numerical trouble): solve everything
        d, z_lp, support = np.zeros(n), -np.inf, np.ones(n, bool)
    else:
        d = c - eq.T @ lp.eqlin.marginals - (A_ub.T @ lp.ineqlin.marginals if len(b_ub) else 0.0)
        z_lp, support = lp.fun, lp.x > 1e-9
    tol = 1e-7 * (1 + abs(z_lp if np.isfinite(z_lp) else 0) + np.abs(c).max(initial=0))
    threshold = 1e-3 * (1 + abs(z_lp)) if np.isfinite(z_lp) else np.inf

    def mip(mask: np.ndarray):
        idx = np.flatnonzero(mask)
        m = len(idx)
        cons = [LinearConstraint(csr_array((np.ones(m), (p.layer_of[keep][idx], np.arange(m))), shape=(L, m)), 1, 1)]
        if len(b_ub):
            cons.append(LinearConstraint(A_ub[:, idx], -np.inf, b_ub))
        res = milp(c[idx], integrality=np.ones(m), bounds=Bounds(0, 1), constraints=cons,
                   options={"time_limit": time_limit_s, "mip_rel_gap": gap, "presolve": True})
        if res.x is None and res.status == 1:
            raise TesseraError(f"HiGHS found no feasible choice within the {time_limit_s:g} s time limit; "
                               "raise the time limit or loosen the constraints")
        return idx, res

    while True:
        mask = (d <= threshold + tol) | support
        idx, res = mip(mask)
        if res.x is not None:
            z = res.fun
            wider = (d <= z - z_lp + tol) | mask
            if z - z_lp > threshold and (wider != mask).any():  # a cheaper choice may use a variable left out
                idx, res = mip(wider)
            break
        if mask.all():
            return None, False
        threshold *= 8
    chosen = np.zeros(len(p.score), bool)
    chosen[keep[idx[res.x > 0.5]]] = True
    return chosen, res.status == 0


# ---------------------------------------------------------------------------- the search
def solve(scores: Mapping[tuple[int, str], float], costs: CostTable, constraints: Sequence[Constraint] = (), *,
          num_solutions: int = 1, alpha: float = 0.9, engine: str | None = None,
          exclude: Collection[tuple] = (), pair_scores: Mapping[tuple[int, str, str], float] | None = None,
          time_limit_s: float = 60.0, mip_rel_gap: float = 1e-6, reduce: bool = True) -> list[Solution]:
    """The best child under `constraints` (lowest summed score), then up to `num_solutions - 1` more, each
    differing from every earlier one in >= (1 - alpha) x layers. Fewer are returned when no further diverse
    child meets the constraints. `engine` (vllm | llamacpp | transformers) leaves out the pairs it cannot
    serve (`tessera.formats.engines.block_reason`); `exclude` leaves out explicit pairs: (attention key, FFN key)
    at every layer, (layer, attention key, FFN key) at one (e.g. the library's `PairExclusion`s). `pair_scores`
    gives a pair's score at one layer, {(layer, attention key, FFN key): score}, in place of the sum of its halves
    (e.g. a pair measured among a child's other choices: `tessera.puzzle.refine`)."""
    if num_solutions < 1:
        raise TesseraError(f"num_solutions must be >= 1, got {num_solutions}")
    if not 0 <= alpha < 1:
        raise TesseraError(f"alpha must be in [0, 1): solutions differ in >= (1 - alpha) x layers; got {alpha}")
    rows = _rows(costs, constraints)
    _refuse_beyond_empty(costs, rows)
    options = _options(scores, costs, engine, exclude)
    for key, value in (pair_scores or {}).items():
        if not (isinstance(key, tuple) and len(key) == 3 and isinstance(value, (int, float, np.floating))
                and math.isfinite(value)):
            raise TesseraError(f"pair score {key!r}: {value!r}; give {{(layer, attention key, FFN key): finite score}}")
    p = _program(scores, costs, rows, options, pair_scores)
    L = costs.num_layers
    min_diff = max(1, math.ceil((1 - alpha) * L - 1e-9))
    all_rows = np.ones(len(rows), bool)
    solutions: list[Solution] = []
    previous: list[np.ndarray] = []
    for k in range(num_solutions):
        chosen, optimal = _solve(p, all_rows, p.score, previous, min_diff, time_limit_s, mip_rel_gap, reduce)
        if chosen is None:
            if k == 0:
                raise TesseraError(_explain_infeasible(p, rows, time_limit_s))
            break
        solutions.append(_solution(p, costs, rows, chosen, optimal, previous, min_diff))
        previous.append(chosen)
    return solutions


def _solution(p: _Program, costs: CostTable, rows: list[_Row], chosen: np.ndarray, optimal: bool,
              previous: list[np.ndarray], min_diff: int) -> Solution:
    L = costs.num_layers
    layers = p.layer_of[chosen]
    if sorted(layers.tolist()) != list(range(L)):
        raise RuntimeError(f"MIP returned layers {sorted(layers.tolist())}, not one pair per layer")
    pairs = [p.pair_of[i] for i in np.flatnonzero(chosen)[np.argsort(layers)]]
    total = costs.total(pairs)
    values = []
    for r in rows:  # verify against the cost table itself, not the solver's arithmetic
        used = r.resource(total)
        if used > r.limit * (1 + 1e-7) + 1e-12:
            raise RuntimeError(f"MIP solution violates {r.label}: {used} > {r.limit}")
        values.append((r.label, r.value(used)))
    for prev in previous:
        if int((prev & chosen).sum()) > L - min_diff:
            raise RuntimeError("MIP solution is not diverse enough from an earlier one")
    layers_v = tuple((costs.variant(a), costs.variant(f)) for a, f in pairs)
    return Solution(layers_v, float(p.score[chosen].sum()), tuple(values), costs.metrics(total), optimal)


def _refuse_beyond_empty(costs: CostTable, rows: list[_Row]) -> None:
    """A bound that even the child with every layer empty (embedding and head only) misses is refused here."""
    for r in rows:
        empty = r.resource(costs.fixed)
        if empty > r.limit * (1 + 1e-12):
            raise TesseraError(
                f"{r.label} is out of reach for any child: even with every layer empty (embedding, head and "
                f"per-step overhead only) it is {_fmt(r.constraint.kind, r.value(empty))}; relax that bound")


def _explain_infeasible(p: _Program, rows: list[_Row], time_limit_s: float) -> str:
    """Which constraints cannot be met and the best value reachable: each alone (a per-layer minimum), else each
    under all the others (one MIP per constraint)."""
    alone = []
    for j, r in enumerate(rows):
        best = p.fixed[j] + sum(p.A[j, p.layer_of == layer].min() for layer in np.unique(p.layer_of))
        if best > r.limit * (1 + 1e-9):
            alone.append(f"{r.label} cannot be met by this library: the best reachable is "
                         f"{_fmt(r.constraint.kind, r.value(best))} (that constraint alone)")
    if alone:
        return "no child meets the constraints: " + "; ".join(alone)
    together = []
    for j, r in enumerate(rows):
        others = np.ones(len(rows), bool)
        others[j] = False
        chosen, _ = _solve(p, others, p.A[j].astype(float), [], 1, time_limit_s, 1e-9)
        if chosen is None:
            continue
        best = p.fixed[j] + p.A[j, chosen].sum()
        together.append(f"{r.label}: best {_fmt(r.constraint.kind, r.value(best))} under the others")
    return ("no child meets all the constraints together (each alone can be met): " + "; ".join(together)
            + "; relax one of them")
