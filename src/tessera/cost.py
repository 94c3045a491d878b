"""Analytic cost model: what a block variant, or a whole model, costs on a given GPU, engine and scenario.

Per block variant (GQA with k KV heads | linear | no-op attention; SwiGLU of width n | linear | no-op FFN), on
each of `tp` tensor-parallel GPUs (every matrix split tp ways, KV heads split or, when tp > k, replicated):
* weight bytes = parameters x bytes per weight of the dtype (NVFP4: 4 bits + one FP8 scale per 16);
* KV-cache bytes per token = 2 x k x head_dim x bytes of the KV dtype (GQA layers only);
* GEMMs of a forward over M tokens: time = max(2 x params x M / tp / (peak x flop_fraction(M)),
  weight bytes / tp / (bandwidth x bw_fraction(matrix bytes))): compute- or weight-read-bound;
* attention: prefill of S tokens 2 x 2 x heads x head_dim x S^2 / 2 FLOPs per sequence; a decode step at
  context c reads c tokens of KV cache per sequence and does 4 x heads x head_dim x c FLOPs: its own roofline;
* tensor parallelism: one ring all-reduce after each sub-block that is not a no-op (two per full layer) of
  M x hidden activations, 2 (tp - 1) / tp x bytes / link bandwidth + 2 (tp - 1) hops x link latency, on the
  critical path;
* overhead: kernels x per-kernel cost, and the engine's per-step overhead once per forward (in `head_cost`).
The fractions, overheads, usable memory and batch limit come from the engine profile (`tessera.engine`).
A scenario IN/OUT costs one prefill of IN tokens per sequence plus OUT decode steps at contexts IN..IN+OUT-1,
summed exactly. `block_cost_table` gives per-variant rows (the Puzzle MIP's input); `predict` sizes the batch
(weights + KV cache fit in the engine's share of memory, at most the engine's batch limit and `batch_cap`) and
returns output tokens/s per GPU at the best batch, with where the time goes (`Prediction.parts`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from tessera.arch import ArchSpec, BlockSpec
from tessera.engine import OPS, EngineProfile, engine_profile
from tessera.errors import TesseraError
from tessera.hardware import Hardware
from tessera.serving import DTYPE_BYTES, KV_DTYPES, Scenario, check_dtype, default_kv_dtype

__all__ = ["DTYPE_BYTES", "OPS", "PARTS", "BATCH_CAP", "BlockCost", "Prediction", "Scenario", "block_cost",
           "block_cost_table", "check_tp", "default_kv_dtype", "head_cost", "kv_bytes_per_sequence", "max_batch",
           "predict", "weight_bytes", "weight_bytes_per_gpu"]

BATCH_CAP = 4096  # default upper end of predict's batch search (printed with every prediction)
# Where the time goes: weight reads (memory-bound GEMMs), KV-cache reads (memory-bound attention), FLOPs
# (compute-bound GEMMs and attention), tensor-parallel communication, fixed per-kernel / per-step overhead.
PARTS = ("weights", "kv", "flops", "comm", "overhead")
# ... and the amounts behind them: bytes read, FLOPs done, bytes all-reduced.
AMOUNTS = ("weight_bytes", "kv_bytes", "flop_count", "comm_bytes")


def _zero() -> dict[str, float]:
    return {k: 0.0 for k in (*PARTS, *AMOUNTS)}


@dataclass(frozen=True)
class BlockCost:
    params: int
    weight_bytes: float
    kv_bytes_per_token: float
    prefill_s: float  # batch x input_len tokens
    decode_s: float  # all output steps of the scenario, summed
    ops: int
    prefill_parts: dict[str, float] = field(default_factory=_zero, compare=False)  # seconds per PART + AMOUNTS
    decode_parts: dict[str, float] = field(default_factory=_zero, compare=False)


def _sub_blocks(arch: ArchSpec, block: BlockSpec):
    """(matmul params, matrices, attention heads*head_dim if GQA else 0, kv heads, ops key) per sub-block."""
    att, ffn = block.attention, block.ffn
    if att.kind == "gqa":  # fused QKV, O
        yield arch.attention_matmul_params(att), 2, arch.num_attention_heads * arch.head_dim, att.num_kv_heads, "gqa"
    elif att.kind == "linear":
        yield arch.attention_matmul_params(att), 1, 0, 0, "linear"
    if ffn.kind == "swiglu":  # fused gate+up, down
        yield arch.ffn_matmul_params(ffn), 2, 0, 0, "swiglu"
    elif ffn.kind == "linear":
        yield arch.ffn_matmul_params(ffn), 1, 0, 0, "ffn_linear"


def all_reduce_s(hw: Hardware, tp: int, nbytes: float | np.ndarray) -> float | np.ndarray:
    """Ring all-reduce of `nbytes` over tp GPUs: 2 (tp - 1) / tp x bytes / link bandwidth + 2 (tp - 1) hops."""
    if tp == 1:
        return 0.0 * nbytes
    if hw.link_bw <= 0:
        raise TesseraError(f"{hw.name} has no interconnect figure; tensor parallelism (--tp {tp}) needs a GPU profile")
    return 2 * (tp - 1) / tp * nbytes / hw.link_bw + 2 * (tp - 1) * hw.link_latency_s


def _roofline(parts: dict[str, float], flops, nbytes, peak: float, bw: float, mem_part: str):
    """Time of kernels doing `flops` and reading `nbytes` (scalars or one value per step); the time is booked
    to `flops` or to `mem_part` by whichever bounds each step."""
    t_f, t_b = np.asarray(flops / peak, dtype=float), np.asarray(nbytes / bw, dtype=float)
    compute = t_f >= t_b
    parts["flops"] += float(np.sum(np.where(compute, t_f, 0.0)))
    parts[mem_part] += float(np.sum(np.where(compute, 0.0, t_b)))
    return np.maximum(t_f, t_b)


def _kv_heads_per_gpu(kv_heads: int, tp: int) -> int:
    """KV heads one GPU holds: split tp ways, or replicated (one per GPU) when tp exceeds them."""
    return math.ceil(kv_heads / tp) if kv_heads else 0


def block_cost(arch: ArchSpec, block: BlockSpec, hw: Hardware, scenario: Scenario, *, batch: int = 1,
               dtype: str = "bf16", kv_dtype: str | None = None, tp: int = 1,
               engine: EngineProfile | None = None) -> BlockCost:
    """Cost of one block variant in the context of `arch` (hidden size, heads) for a whole scenario, on each of
    `tp` GPUs (times are the tensor-parallel group's wall time; bytes and KV bytes/token are the whole block's)."""
    eng = engine or engine_profile(hw)
    dtype, kv_dtype = _dtypes(dtype, kv_dtype)
    wb, kvb = DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype]
    peak, bw = hw.peak(dtype), hw.mem_bw
    S, n_out = scenario.input_len, scenario.output_len
    ctx = S + np.arange(n_out)
    params = kv_per_token = ops = 0
    pre, dec = _zero(), _zero()
    prefill, decode = 0.0, 0.0
    m_pre, m_dec = batch * S, batch  # tokens in one forward: the prefill, one decode step
    for mm_params, n_mats, qdim, kv_heads, kind in _sub_blocks(arch, block):
        params += mm_params
        ops += eng.op_count(kind)
        kv_per_token += 2 * kv_heads * arch.head_dim * kvb
        # GEMMs, this GPU's shard: bound by FLOPs or by reading the weights
        w_gpu = mm_params * wb / tp
        bw_w = bw * eng.bw_at(w_gpu / n_mats)
        f_pre, f_dec = 2 * mm_params * m_pre / tp, 2 * mm_params * m_dec / tp
        prefill += float(_roofline(pre, f_pre, w_gpu, peak * eng.flops_at(m_pre), bw_w, "weights"))
        steps = np.ones(n_out)
        decode += float(np.sum(_roofline(dec, f_dec * steps, w_gpu * steps, peak * eng.flops_at(m_dec), bw_w, "weights")))
        pre["weight_bytes"] += w_gpu
        dec["weight_bytes"] += w_gpu * n_out
        pre["flop_count"] += f_pre
        dec["flop_count"] += f_dec * n_out
        if qdim:  # attention over this GPU's heads and its share of the KV cache
            kv_gpu = 2 * _kv_heads_per_gpu(kv_heads, tp) * arch.head_dim * kvb
            a_pre = 2 * 2 * (qdim / tp) * S * S / 2 * batch
            w_kv = batch * S * kv_gpu  # prefill writes the cache
            prefill += float(_roofline(pre, a_pre, w_kv, peak * eng.flops_at(m_pre), bw * eng.kv_bw_at(w_kv), "kv"))
            a_dec, r_kv = 4 * (qdim / tp) * ctx * batch, batch * ctx * kv_gpu
            decode += float(np.sum(_roofline(dec, a_dec, r_kv, peak * eng.flops_at(m_dec), bw * eng.kv_bw_at(r_kv),
                                             "kv")))
            pre["kv_bytes"] += w_kv
            dec["kv_bytes"] += float(np.sum(r_kv))
            pre["flop_count"] += a_pre
            dec["flop_count"] += float(np.sum(a_dec))
        if tp > 1:  # one all-reduce of the sub-block's output activations, on the critical path
            c_pre, c_dec = m_pre * arch.hidden_size * eng.act_bytes, m_dec * arch.hidden_size * eng.act_bytes
            t_pre, t_dec = all_reduce_s(hw, tp, c_pre), all_reduce_s(hw, tp, c_dec) * n_out
            prefill, decode = prefill + t_pre, decode + t_dec
            pre["comm"], dec["comm"] = pre["comm"] + t_pre, dec["comm"] + t_dec
            pre["comm_bytes"] += c_pre
            dec["comm_bytes"] += c_dec * n_out
    overhead = ops * eng.op_overhead_s
    prefill, decode = prefill + overhead, decode + overhead * n_out
    pre["overhead"] += overhead
    dec["overhead"] += overhead * n_out
    norms = (block.attention.kind != "no_op") + (block.ffn.kind != "no_op")
    return BlockCost(params + norms * arch.hidden_size, (params + norms * arch.hidden_size) * wb, kv_per_token,
                     prefill, decode, ops, pre, dec)



def _head_parts(arch: ArchSpec, hw: Hardware, scenario: Scenario, batch: int, dtype: str, tp: int,
                eng: EngineProfile) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Embedding lookup + final norm + lm_head (logits of the last position only, vocabulary split tp ways) and
    the engine's per-step overhead: (prefill_s, decode_s, prefill parts, decode parts)."""
    wb = DTYPE_BYTES["bf16" if dtype in ("fp8", "nvfp4") else dtype]  # lm_head usually stays unquantised
    peak, n_out = hw.peak("bf16" if dtype in ("fp8", "nvfp4") else dtype), scenario.output_len
    head_params = arch.vocab_size * arch.hidden_size
    w_gpu = head_params * wb / tp
    pre, dec = _zero(), _zero()
    step_over = eng.op_count("model") * eng.op_overhead_s + eng.step_overhead_s
    one = _roofline(pre, 2 * head_params * batch / tp, w_gpu, peak * eng.flops_at(batch), hw.mem_bw * eng.bw_at(w_gpu),
                    "weights")
    steps = np.ones(n_out)
    _roofline(dec, 2 * head_params * batch / tp * steps, w_gpu * steps, peak * eng.flops_at(batch),
              hw.mem_bw * eng.bw_at(w_gpu), "weights")
    for d, n in ((pre, 1), (dec, n_out)):
        d["overhead"] += step_over * n
        d["weight_bytes"] += w_gpu * n
        d["flop_count"] += 2 * head_params * batch / tp * n
    step = float(one) + step_over
    return step, step * n_out, pre, dec


def head_cost(arch: ArchSpec, hw: Hardware, scenario: Scenario, batch: int, dtype: str, *, tp: int = 1,
              engine: EngineProfile | None = None) -> tuple[float, float]:
    """(prefill_s, decode_s) of embedding lookup + final norm + lm_head (logits only for the last position) and
    the engine's per-step overhead: what a model with every layer empty costs."""
    pre, dec, _, _ = _head_parts(arch, hw, scenario, batch, dtype, tp, engine or engine_profile(hw))
    return pre, dec


@dataclass(frozen=True)
class Prediction:
    hardware: str
    scenario: str
    dtype: str
    batch: int
    tp: int
    weight_bytes: float  # the whole model's
    kv_bytes: float  # the whole batch's KV cache, all GPUs together
    memory_bytes: float  # available to weights + KV per GPU (the engine's share of capacity)
    prefill_s: float
    decode_s: float
    total_s: float
    output_tokens_per_s: float  # per GPU
    decode_tokens_per_s: float  # per GPU, decode phase only
    prefill_tokens_per_s: float
    kv_dtype: str = ""
    engine: str = ""
    weight_bytes_per_gpu: float = 0.0  # matrices split tp ways, norms replicated
    kv_bytes_per_gpu: float = 0.0  # KV heads split tp ways, or replicated when tp exceeds them
    batch_limits: dict[str, int] = field(default_factory=dict)  # memory, engine, cap: what bounded the batch
    parts: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> PARTS seconds and AMOUNTS

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def batch_bound(self) -> str:
        """What set the batch: 'memory', 'engine' (its batch limit), 'cap' (the search cap) or 'chosen'."""
        for k, v in sorted(self.batch_limits.items(), key=lambda kv: kv[1]):
            if v == self.batch:
                return k
        return "chosen"


def weight_bytes(arch: ArchSpec, dtype: str) -> float:
    wb = DTYPE_BYTES[dtype]
    head_wb = DTYPE_BYTES["bf16" if dtype in ("fp8", "nvfp4") else dtype]
    emb = arch.vocab_size * arch.hidden_size
    blocks = sum(arch.block_params(i) for i in range(arch.num_layers))
    return blocks * wb + emb * head_wb * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size * wb


def _norm_bytes(arch: ArchSpec, dtype: str) -> float:
    norms = 1 + sum((b.attention.kind != "no_op") + (b.ffn.kind != "no_op") for b in arch.blocks)
    return norms * arch.hidden_size * DTYPE_BYTES[dtype]


def weight_bytes_per_gpu(arch: ArchSpec, dtype: str, tp: int = 1) -> float:
    """Weights one GPU holds under tensor parallelism: every matrix (embedding and head vocabulary-split too)
    split tp ways, the norms replicated on every GPU. Never below weight_bytes / tp."""
    norms = _norm_bytes(arch, dtype)
    return (weight_bytes(arch, dtype) - norms) / tp + norms


def kv_bytes_per_sequence(arch: ArchSpec, scenario: Scenario, kv_dtype: str, tp: int = 1) -> float:
    """KV cache one IN/OUT sequence occupies on one of tp GPUs (tp=1: the whole cache)."""
    per_token = sum(2 * _kv_heads_per_gpu(arch.kv_heads(i), tp) * arch.head_dim * DTYPE_BYTES[kv_dtype]
                    for i in range(arch.num_layers))
    return per_token * (scenario.input_len + scenario.output_len)


def check_tp(arch: ArchSpec, tp: int) -> None:
    """Refuse a tensor-parallel degree the architecture cannot be split by: tp must divide the query heads, each
    GQA layer's KV heads (or be a multiple of them: the heads are then replicated) and each FFN width."""
    if tp < 1:
        raise TesseraError(f"--tp must be >= 1, got {tp}")
    problems = _tp_problems(arch, tp)
    if problems:
        ok = [t for t in (1, 2, 4, 8, 16) if not _tp_problems(arch, t)]
        raise TesseraError(f"--tp {tp} does not divide the model's {', '.join(problems)}; "
                           f"use --tp {' or '.join(map(str, ok))}")


def _tp_problems(arch: ArchSpec, tp: int) -> list[str]:
    problems = []
    if arch.num_attention_heads % tp:
        problems.append(f"{arch.num_attention_heads} query heads")
    kv = sorted({arch.kv_heads(i) for i in range(arch.num_layers) if arch.kv_heads(i)})
    bad_kv = [k for k in kv if k % tp and tp % k]
    if bad_kv:
        problems.append(f"{'/'.join(map(str, bad_kv))} KV heads")
    widths = sorted({b.ffn.intermediate_size for b in arch.blocks if b.ffn.kind == "swiglu"})
    bad_w = [w for w in widths if w % tp]
    if bad_w:
        problems.append(f"FFN width {'/'.join(map(str, bad_w))}")
    return problems


def _dtypes(dtype: str, kv_dtype: str | None) -> tuple[str, str]:
    """The canonical weight and KV-cache dtype names (`float16` -> `fp16`; no KV dtype: the weights' default)."""
    dtype = check_dtype(dtype)
    return dtype, check_dtype(kv_dtype or default_kv_dtype(dtype), "KV-cache dtype", KV_DTYPES)


def _check(arch: ArchSpec, hw: Hardware, tp: int) -> None:
    check_tp(arch, tp)
    if tp > 1 and hw.link_bw <= 0:
        raise TesseraError(f"{hw.name} has no interconnect figure; tensor parallelism (--tp {tp}) needs a GPU profile")


def batch_limits(arch: ArchSpec, hw: Hardware, scenario: Scenario, dtype: str = "bf16", tp: int = 1,
                 kv_dtype: str | None = None, *, engine: EngineProfile | None = None,
                 batch_cap: int = BATCH_CAP) -> dict[str, int]:
    """The largest batch each limit allows: `memory` (weights + KV cache in the engine's share of one GPU),
    `engine` (its batch limit) and `cap` (the search cap). Raises when the weights alone do not fit."""
    eng = engine or engine_profile(hw)
    dtype, kv_dtype = _dtypes(dtype, kv_dtype)
    weights = weight_bytes_per_gpu(arch, dtype, tp)
    budget = eng.memory_budget(hw.mem_bytes, weights)
    per_seq = kv_bytes_per_sequence(arch, scenario, kv_dtype, tp)
    if weights >= budget:
        raise TesseraError(
            f"the model does not fit: {weights / 1e9:.1f} GB of {dtype} weights per GPU vs {budget / 1e9:.1f} GB usable "
            f"on {hw.name} (tp={tp}); use more GPUs (--tp), a smaller dtype or a smaller model")
    memory = int((budget - weights) // per_seq) if per_seq else 2**62
    return {"memory": memory, "engine": int(eng.max_batch), "cap": int(batch_cap)}


def max_batch(arch: ArchSpec, hw: Hardware, scenario: Scenario, dtype: str = "bf16", tp: int = 1,
              kv_dtype: str | None = None, *, engine: EngineProfile | None = None, batch_cap: int = BATCH_CAP) -> int:
    """The largest batch that fits memory, the engine's batch limit and `batch_cap`."""
    return min(batch_limits(arch, hw, scenario, dtype, tp, kv_dtype, engine=engine, batch_cap=batch_cap).values())


def predict(arch: ArchSpec, hw: Hardware, scenario: Scenario, *, dtype: str = "bf16", batch: int | str = "auto",
            tp: int = 1, kv_dtype: str | None = None, engine: EngineProfile | None = None,
            batch_cap: int = BATCH_CAP) -> Prediction:
    """Whole-model time for a batch of IN/OUT requests on tp GPUs; with batch='auto', the throughput-best batch
    that fits (searched up to `batch_cap`, the engine's batch limit and memory; `Prediction.batch_limits`)."""
    dtype, kv_dtype = _dtypes(dtype, kv_dtype)
    _check(arch, hw, tp)
    eng = engine or engine_profile(hw)
    if batch_cap < 1:
        raise TesseraError(f"the batch search cap must be >= 1, got {batch_cap}")
    limits = batch_limits(arch, hw, scenario, dtype, tp, kv_dtype, engine=eng, batch_cap=batch_cap)
    limit = min(limits.values())
    if batch == "auto":
        if limit < 1:
            raise TesseraError(_no_room(arch, hw, scenario, dtype, tp, kv_dtype, eng))
        candidates = sorted({b for b in (2**i for i in range(limit.bit_length())) if b <= limit} | {limit})
        return max((_predict(arch, hw, scenario, dtype, b, tp, kv_dtype, eng, limits) for b in candidates),
                   key=lambda p: p.output_tokens_per_s)
    if isinstance(batch, str) and not batch.isdigit():
        raise TesseraError(f"batch must be a positive integer or 'auto', got {batch!r}")
    batch = int(batch)
    if batch < 1:
        raise TesseraError(f"batch must be >= 1, got {batch}; use --batch auto for the best batch that fits")
    if batch > limits["memory"]:
        raise TesseraError(_no_room(arch, hw, scenario, dtype, tp, kv_dtype, eng, batch))
    return _predict(arch, hw, scenario, dtype, batch, tp, kv_dtype, eng, limits)


def _predict(arch: ArchSpec, hw: Hardware, scenario: Scenario, dtype: str, batch: int, tp: int, kv_dtype: str,
             eng: EngineProfile, limits: dict[str, int]) -> Prediction:
    prefill = decode = 0.0
    pre_parts, dec_parts = _zero(), _zero()
    cache: dict[BlockSpec, BlockCost] = {}
    for block in arch.blocks:
        if block not in cache:
            cache[block] = block_cost(arch, block, hw, scenario, batch=batch, dtype=dtype, kv_dtype=kv_dtype, tp=tp,
                                      engine=eng)
        c = cache[block]
        prefill += c.prefill_s
        decode += c.decode_s
        _add(pre_parts, c.prefill_parts)
        _add(dec_parts, c.decode_parts)
    head_pre, head_dec, hp, hd = _head_parts(arch, hw, scenario, batch, dtype, tp, eng)
    prefill, decode = prefill + head_pre, decode + head_dec
    _add(pre_parts, hp)
    _add(dec_parts, hd)
    total = prefill + decode
    out_tokens = batch * scenario.output_len
    w_gpu = weight_bytes_per_gpu(arch, dtype, tp)
    return Prediction(hw.name, str(scenario), dtype, batch, tp, weight_bytes(arch, dtype),
                      batch * kv_bytes_per_sequence(arch, scenario, kv_dtype),
                      eng.memory_budget(hw.mem_bytes, w_gpu),
                      prefill, decode, total, out_tokens / total / tp, out_tokens / decode / tp,
                      batch * scenario.input_len / prefill / tp, kv_dtype, eng.name,
                      w_gpu, batch * kv_bytes_per_sequence(arch, scenario, kv_dtype, tp),
                      dict(limits), {"prefill": pre_parts, "decode": dec_parts})


def _add(into: dict[str, float], parts: dict[str, float]) -> None:
    for k, v in parts.items():
        into[k] = into.get(k, 0.0) + v


def _no_room(arch, hw, scenario, dtype, tp, kv_dtype, eng, batch: int = 1) -> str:
    w = weight_bytes_per_gpu(arch, dtype, tp)
    kv = kv_bytes_per_sequence(arch, scenario, kv_dtype, tp)
    return (f"scenario {scenario} does not fit on {hw.name}: {w / 1e9:.1f} GB weights + {batch} x {kv / 1e9:.2f} GB "
            f"{kv_dtype} KV cache per GPU > {eng.memory_budget(hw.mem_bytes, w) / 1e9:.1f} GB usable; lower the batch, "
            "add GPUs (--tp), use --kv-dtype fp8 or shorten the scenario")


def block_cost_table(arch: ArchSpec, variants: Iterable[BlockSpec], hw: Hardware, scenario: Scenario, *,
                     batch: int = 1, dtype: str = "bf16", kv_dtype: str | None = None, tp: int = 1,
                     engine: EngineProfile | None = None) -> list[dict]:
    """One row per block variant: parameters, KV bytes/token and predicted times (the Puzzle MIP's costs)."""
    rows = []
    for v in variants:
        c = block_cost(arch, v, hw, scenario, batch=batch, dtype=dtype, kv_dtype=kv_dtype, tp=tp, engine=engine)
        d = asdict(c)
        d.pop("prefill_parts")
        d.pop("decode_parts")
        rows.append({"block": v.describe(), **d})
    return rows
