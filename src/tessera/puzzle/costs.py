"""What every block variant costs: the MIP's resource coefficients.

For a parent and its block library, a `CostTable` holds, per sub-block variant (`Variant.key`) and per layer
choice (an attention variant paired with an FFN variant):

* `params`             parameters (its layernorm included);
* `weight_bytes`       those parameters stored at the variant's precision (`native` = the target's dtype;
                       `fp8` / `nvfp4` for quantization-aware search);
* `kv_bytes_per_token` the K/V cache one token occupies in this layer (GQA only), in the target's KV dtype;
* `prefill_s[i]`, `decode_s[i]` for each serving scenario i of the target: the prefill of batch x IN tokens and
  all OUT decode steps of the batch, summed.

plus `fixed` (embedding, final norm, output head and per-step overhead: what a child with every layer empty
costs) and `parent` (the parent's totals). A child's totals are `fixed + sum over layers of pair(attn, ffn)`.

Two sources:

* `predicted_costs(parent, variants, target)`: the roofline cost model (`tessera.cost.block_cost` of the block
  a pair forms; `head_cost` and `weight_bytes` for the fixed part) for a target GPU, dtype, batch and scenarios.
  A pair's cost is the cost of the block it forms, so the parent's own pair summed over its layers plus `fixed`
  reproduces `tessera.cost.predict` exactly. A pair whose two halves have different precisions is costed as
  the sum of its halves, each a block alone.
* `measured_costs(parent, variants, target)`: timed on this machine, the same code path as `tessera bench`.
  For each sub-block variant a probe model of `L` layers (the parent's depth) holding only that sub-block is
  run (`tessera.bench.run_once`: prefill, then decode over the KV cache) alternately with a probe of `L` empty
  layers; the variant's per-layer time is the median difference divided by `L`, and the empty probe is the
  fixed part. Measured time is additive within a layer (the two sub-blocks run one after the other), so a
  pair costs the sum of its halves. A quantized variant's measured time is its native module's (this CPU has no
  FP8/FP4 kernels); its bytes follow its precision.

Times are the wall time of a batch on the `tp` tensor-parallel GPUs (each GPU does 1/tp of the work and the
sub-blocks' all-reduces are on the critical path, as in `predict`); memory is per GPU. The KV dtype is the
target's (`kv_dtype`; default fp8 for fp8 / nvfp4 weights, as FP8 serving recipes do).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tessera.arch import ArchSpec, AttentionSpec, BlockSpec, FFNSpec
from tessera.cost import DTYPE_BYTES, Scenario, block_cost, check_tp, head_cost, weight_bytes
from tessera.errors import TesseraError
from tessera.puzzle.library import Variant, block_of
from tessera.puzzle.library import parent_variants as layer_variants
from tessera.serving import KV_DTYPES, default_kv_dtype

NO_OP_ATTENTION = Variant("attention", AttentionSpec("no_op"))
NO_OP_FFN = Variant("ffn", FFNSpec("no_op"))


# ---------------------------------------------------------------------------- the target
@dataclass(frozen=True)
class Target:
    """Where and how the child will be served: a cost-model profile (`h100`, ..., `cpu`) or, for measured
    costs, the local device (`cpu`, `cuda`); the dtype of `native` weights; batch; scenarios; KV dtype; TP."""

    hardware: str = "h100"
    dtype: str = "bf16"
    scenarios: tuple[Scenario, ...] = (Scenario(128, 1024),)
    batch: int = 1
    kv_dtype: str | None = None  # None: the cost model's choice for `dtype`
    tp: int = 1

    def __post_init__(self):
        scen = self.scenarios
        if isinstance(scen, str):  # "128/128,128/1024"
            scen = [s.strip() for s in scen.split(",") if s.strip()]
        scen = (scen,) if isinstance(scen, Scenario) else scen
        scen = tuple(Scenario.parse(s) if isinstance(s, str) else s for s in scen)
        if not scen:
            raise TesseraError("a target needs at least one scenario (e.g. --scenario 128/1024)")
        if len(set(scen)) != len(scen):
            raise TesseraError(f"scenario listed twice in {', '.join(map(str, scen))}")
        object.__setattr__(self, "scenarios", scen)
        object.__setattr__(self, "hardware", self.hardware.lower())
        for name, value, allowed in (("dtype", self.dtype, tuple(DTYPE_BYTES)), ("kv_dtype", self.kv_dtype, KV_DTYPES)):
            if value is not None and value not in allowed:
                raise TesseraError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
        if self.kv_dtype is None:  # the cost model's default for these weights (fp8 KV for fp8 / nvfp4 weights)
            object.__setattr__(self, "kv_dtype", default_kv_dtype(self.dtype))
        if int(self.batch) < 1 or int(self.tp) < 1:
            raise TesseraError(f"batch and tp must be >= 1, got batch {self.batch}, tp {self.tp}")

    @staticmethod
    def parse(hardware: str, dtype: str, scenarios: str, batch: int, *, kv_dtype: str | None = None,
              tp: int = 1) -> Target:
        """From CLI text: `--gpu h100 --dtype fp8 --scenario 128/128,128/1024 --batch 64`."""
        return Target(hardware, dtype, scenarios, batch, kv_dtype, tp)

    @property
    def kv(self) -> str:
        """The KV-cache dtype, model-wide (a variant's weight precision does not change it)."""
        return self.kv_dtype

    def precision_dtype(self, precision: str) -> str:
        return self.dtype if precision == "native" else precision

    def as_dict(self) -> dict[str, Any]:
        return {"hardware": self.hardware, "dtype": self.dtype, "scenarios": [str(s) for s in self.scenarios],
                "batch": self.batch, "kv_dtype": self.kv, "tp": self.tp}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Target:
        return Target(d["hardware"], d["dtype"], tuple(d["scenarios"]), d["batch"], d.get("kv_dtype"), d.get("tp", 1))

    def __str__(self) -> str:
        tp = f" x{self.tp}" if self.tp > 1 else ""
        return (f"{self.hardware}{tp} {self.dtype} (KV {self.kv}), batch {self.batch}, "
                f"scenarios {', '.join(map(str, self.scenarios))}")


# ---------------------------------------------------------------------------- one cost record
@dataclass(frozen=True)
class Cost:
    """The cost of a sub-block variant, of one layer's pair, of the fixed part or of a whole model."""

    params: int
    weight_bytes: float
    kv_bytes_per_token: float
    prefill_s: tuple[float, ...]  # per scenario of the target
    decode_s: tuple[float, ...]

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.weight_bytes + other.weight_bytes,
                    self.kv_bytes_per_token + other.kv_bytes_per_token,
                    tuple(a + b for a, b in zip(self.prefill_s, other.prefill_s)),
                    tuple(a + b for a, b in zip(self.decode_s, other.decode_s)))

    @staticmethod
    def zero(n_scenarios: int) -> Cost:
        return Cost(0, 0.0, 0.0, (0.0,) * n_scenarios, (0.0,) * n_scenarios)

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "prefill_s": list(self.prefill_s), "decode_s": list(self.decode_s)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Cost:
        return Cost(int(d["params"]), float(d["weight_bytes"]), float(d["kv_bytes_per_token"]),
                    tuple(map(float, d["prefill_s"])), tuple(map(float, d["decode_s"])))


def phase_seconds(cost: Cost, i: int, phase: str) -> float:
    """Seconds of scenario i in one phase: `prefill`, `decode` or `e2e` (both)."""
    if phase == "prefill":
        return cost.prefill_s[i]
    if phase == "decode":
        return cost.decode_s[i]
    return cost.prefill_s[i] + cost.decode_s[i]


# ---------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class CostTable:
    parent_arch: ArchSpec
    target: Target
    source: str  # "predicted: ..." or "measured: ..."
    variants: tuple[Variant, ...]  # every variant costed (the library's, and the parent's own)
    sub: Mapping[str, Cost] = field(compare=False)  # per variant key
    pairs: Mapping[tuple[str, str], Cost] = field(compare=False)  # per (attention key, FFN key)
    fixed: Cost  # embedding + final norm + head + per-step overhead
    parent: Cost  # the parent's totals (fixed included)

    @property
    def num_layers(self) -> int:
        return self.parent_arch.num_layers

    def variant(self, key: str) -> Variant:
        for v in self.variants:
            if v.key == key:
                return v
        raise TesseraError(f"variant {key!r} is not in the cost table; cost the library again with it")

    def pair(self, attention: str, ffn: str) -> Cost:
        try:
            return self.pairs[(attention, ffn)]
        except KeyError:
            raise TesseraError(f"no cost for the pair ({attention}, {ffn}); cost the library again") from None

    def total(self, layers: Iterable[tuple[str, str]]) -> Cost:
        """Totals of a child given its per-layer (attention key, FFN key) choices, fixed part included."""
        out = self.fixed
        for a, f in layers:
            out = out + self.pair(a, f)
        return out

    def metrics(self, total: Cost) -> dict[str, float]:
        """Every predicted total a person reads: parameters, memory per GPU, and per scenario the tokens/s,
        speed-up over the parent and latency of each phase."""
        t, out = self.target, {}
        out["params"] = float(total.params)
        out["weight_bytes"] = total.weight_bytes / t.tp
        for i, s in enumerate(t.scenarios):
            kv = t.batch * (s.input_len + s.output_len) * total.kv_bytes_per_token / t.tp
            out[f"kv_cache_bytes[{s}]"] = kv
            out[f"memory_bytes[{s}]"] = total.weight_bytes / t.tp + kv
            for phase, tokens in (("e2e", s.output_len), ("decode", s.output_len), ("prefill", s.input_len)):
                sec = phase_seconds(total, i, phase)
                out[f"seconds[{s},{phase}]"] = sec
                out[f"tokens_per_s[{s},{phase}]"] = t.batch * tokens / sec / t.tp if sec > 0 else float("inf")
                parent = phase_seconds(self.parent, i, phase)
                out[f"speedup[{s},{phase}]"] = parent / sec if sec > 0 else float("inf")
        return out

    # -------------------------------------------------------------- persistence (a stage directory's costs.json)
    def as_dict(self) -> dict[str, Any]:
        from tessera.formats import to_hf_config

        return {"source": self.source, "target": self.target.as_dict(), "parent_config": to_hf_config(self.parent_arch),
                "variants": [v.key for v in self.variants], "fixed": self.fixed.as_dict(), "parent": self.parent.as_dict(),
                "sub": {k: c.as_dict() for k, c in self.sub.items()},
                "pairs": [{"attention": a, "ffn": f, **c.as_dict()} for (a, f), c in self.pairs.items()]}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> CostTable:
        from tessera.formats import from_hf_config

        try:
            return CostTable(from_hf_config(d["parent_config"], "costs.json"), Target.from_dict(d["target"]), d["source"],
                             tuple(Variant.from_key(k) for k in d["variants"]),
                             {k: Cost.from_dict(c) for k, c in d["sub"].items()},
                             {(p["attention"], p["ffn"]): Cost.from_dict(p) for p in d["pairs"]},
                             Cost.from_dict(d["fixed"]), Cost.from_dict(d["parent"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TesseraError(f"costs.json is malformed ({exc!r}); cost the library again") from None

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    @staticmethod
    def from_json(text: str) -> CostTable:
        try:
            return CostTable.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise TesseraError(f"costs.json is not JSON ({exc}); cost the library again") from None

    def rows(self) -> list[dict[str, Any]]:
        """One row per sub-block variant (for printing): params, bytes, KV bytes/token and times per scenario."""
        rows = []
        for v in self.variants:
            c = self.sub[v.key]
            row = {"variant": v.key, "params": c.params, "weight_bytes": c.weight_bytes,
                   "kv_bytes_per_token": c.kv_bytes_per_token}
            for s, pre, dec in zip(self.target.scenarios, c.prefill_s, c.decode_s):
                row[f"prefill_s[{s}]"], row[f"decode_s[{s}]"] = pre, dec
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------- helpers shared by both sources
def parent_variants(parent: ArchSpec) -> list[tuple[Variant, Variant]]:
    """The parent's own (attention, FFN) variants, layer by layer."""
    return [layer_variants(parent, i) for i in range(parent.num_layers)]


def _all_variants(parent: ArchSpec, variants: Iterable[Variant]) -> tuple[Variant, ...]:
    out: dict[str, Variant] = {}
    for v in variants:
        if not isinstance(v, Variant):
            raise TesseraError(f"expected tessera.puzzle.library.Variant objects, got {type(v).__name__}")
        out.setdefault(v.key, v)
    for a, f in parent_variants(parent):
        out.setdefault(a.key, a)
        out.setdefault(f.key, f)
    for v in (NO_OP_ATTENTION, NO_OP_FFN):  # a pair with one half empty is costed from the other half alone
        out.setdefault(v.key, v)
    _check_shape(parent, out.values())
    return tuple(out.values())


def _check_shape(parent: ArchSpec, variants: Iterable[Variant]) -> None:
    for v in variants:
        kv = getattr(v.spec, "num_kv_heads", None)
        if v.part == "attention" and kv is not None and parent.num_attention_heads % kv:
            raise TesseraError(f"variant {v.key}: {parent.num_attention_heads} query heads are not divisible by {kv} "
                               "KV heads; use a KV-head count that divides them")


def _single(v: Variant) -> BlockSpec:
    return block_of(v, NO_OP_FFN) if v.part == "attention" else block_of(NO_OP_ATTENTION, v)


def _pairs_of(variants: Sequence[Variant]) -> list[tuple[Variant, Variant]]:
    attn = [v for v in variants if v.part == "attention"]
    ffn = [v for v in variants if v.part == "ffn"]
    return [(a, f) for a in attn for f in ffn]


# ---------------------------------------------------------------------------- predicted (cost model)
def predicted_costs(parent: ArchSpec, variants: Iterable[Variant], target: Target) -> CostTable:
    """Costs from the roofline cost model (`tessera.cost`) for `target`; no weights, no timing, milliseconds."""
    from tessera.engine import engine_profile
    from tessera.hardware import get_hardware

    hw = get_hardware(target.hardware)
    allv = _all_variants(parent, variants)
    n = len(target.scenarios)

    check_tp(parent, target.tp)

    def block(spec: BlockSpec, precision: str) -> Cost:
        dtype = target.precision_dtype(precision)
        per = [block_cost(parent, spec, hw, s, batch=target.batch, dtype=dtype, kv_dtype=target.kv, tp=target.tp)
               for s in target.scenarios]
        c0 = per[0]
        return Cost(c0.params, c0.weight_bytes, c0.kv_bytes_per_token,
                    tuple(c.prefill_s for c in per), tuple(c.decode_s for c in per))

    sub = {v.key: block(_single(v), v.precision) for v in allv}
    pairs = {}
    for a, f in _pairs_of(allv):
        pairs[(a.key, f.key)] = (block(block_of(a, f), a.precision) if a.precision == f.precision
                                 else sub[a.key] + sub[f.key])
    heads = [head_cost(parent, hw, s, target.batch, target.dtype, tp=target.tp) for s in target.scenarios]
    parent_blocks = sum((block(b, "native") for b in parent.blocks), Cost.zero(n))
    fixed = Cost(parent.num_params() - parent_blocks.params,
                 weight_bytes(parent, target.dtype) - parent_blocks.weight_bytes, 0.0,
                 tuple(h[0] for h in heads), tuple(h[1] for h in heads))
    source = f"predicted: tessera.cost, {hw.name}, engine {engine_profile(hw).name}"
    table = CostTable(parent, target, source, allv, sub, pairs, fixed, Cost.zero(n))
    return replace(table, parent=table.total((a.key, f.key) for a, f in parent_variants(parent)))


# ---------------------------------------------------------------------------- measured (this machine)
def _sizes(parent: ArchSpec, v: Variant, target: Target) -> tuple[int, float, float]:
    """(params, weight bytes, KV bytes per token) of one sub-block variant, from ArchSpec's parameter count."""
    arch = parent.with_blocks([_single(v)])
    params = arch.block_params(0)
    kv = arch.kv_cache_bytes_per_token(DTYPE_BYTES[target.kv], layer=0)
    return params, params * DTYPE_BYTES[target.precision_dtype(v.precision)], kv


def measured_costs(parent: ArchSpec, variants: Iterable[Variant], target: Target, *, reps: int = 5,
                   warmup: int = 1, seed: int = 0, progress: Callable[[str], None] | None = None) -> CostTable:
    """Per-variant prefill and decode times measured on the local device (`target.hardware`: cpu | cuda | cuda:N)
    at the target's batch and scenarios, each the median of `reps` runs alternating with the empty probe."""
    import torch

    from tessera.bench import run_once
    from tessera.checkpoint import _finish
    from tessera.devices import format_name, resolve_device, torch_dtype
    from tessera.model import Transformer

    device = resolve_device(target.hardware)
    dtype = format_name(target.dtype, ("fp32", "bf16", "fp16"))
    if target.tp != 1:
        raise TesseraError("measured costs run on one local device; use --tp 1 (or predicted costs for TP)")
    target = replace(target, dtype=dtype, kv_dtype=dtype)  # tessera's KV cache is held in the model's dtype
    allv = _all_variants(parent, variants)
    L, n = parent.num_layers, len(target.scenarios)
    # One probe per distinct sub-block shape (precision does not change the CPU's time).
    shapes: dict[BlockSpec, list[Variant]] = {}
    for v in allv:
        if v.has_weights:
            shapes.setdefault(_single(v), []).append(v)
    empty = BlockSpec(AttentionSpec("no_op"), FFNSpec("no_op"))
    gen = torch.Generator().manual_seed(seed)

    def build(block: BlockSpec):
        torch.manual_seed(seed)
        model = _finish(Transformer(parent.with_blocks([block] * L)))
        return model.to(device=device, dtype=torch_dtype(dtype)).eval()

    def runs(model, s: Scenario) -> list[tuple[float, float]]:
        return [run_once(model, target.batch, s, gen) for _ in range(reps)]

    base_model = build(empty)
    time_of: dict[BlockSpec, tuple[list[float], list[float]]] = {b: ([], []) for b in shapes}
    fixed_pre, fixed_dec = [], []
    for s in target.scenarios:
        for _ in range(warmup):
            run_once(base_model, target.batch, s, gen)
        base_runs = []
        for block in shapes:
            model = build(block)
            for _ in range(warmup):
                run_once(model, target.batch, s, gen)
            pre, dec = [], []
            for _ in range(reps):  # alternate, so load on a shared machine hits both sides alike
                b = run_once(base_model, target.batch, s, gen)
                m = run_once(model, target.batch, s, gen)
                base_runs.append(b)
                pre.append(max(m[0] - b[0], 0.0) / L)
                dec.append(max(m[1] - b[1], 0.0) / L)
            time_of[block][0].append(statistics.median(pre))
            time_of[block][1].append(statistics.median(dec))
            del model
            if progress is not None:
                progress(f"{s} {block.describe()}: prefill {time_of[block][0][-1] * 1e3:.3f} ms, "
                         f"decode {time_of[block][1][-1] * 1e3:.3f} ms per layer")
        base_runs = base_runs or runs(base_model, s)
        fixed_pre.append(statistics.median(r[0] for r in base_runs))
        fixed_dec.append(statistics.median(r[1] for r in base_runs))

    sub = {}
    for v in allv:
        params, wbytes, kv = _sizes(parent, v, target)
        pre, dec = time_of[_single(v)] if v.has_weights else ([0.0] * n, [0.0] * n)
        sub[v.key] = Cost(params, wbytes, kv, tuple(pre), tuple(dec))
    pairs = {(a.key, f.key): sub[a.key] + sub[f.key] for a, f in _pairs_of(allv)}
    emb = parent.embedding_params()
    fixed = Cost(emb, emb * DTYPE_BYTES[dtype], 0.0, tuple(fixed_pre), tuple(fixed_dec))
    source = (f"measured: {device} {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"median of {reps}")
    table = CostTable(parent, target, source, allv, sub, pairs, fixed, Cost.zero(n))
    return replace(table, parent=table.total((a.key, f.key) for a, f in parent_variants(parent)))
