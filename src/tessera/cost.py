"""Analytic roofline cost model: what a block variant, or a whole model, costs on a given chip and scenario.

Per block variant (GQA with k KV heads | linear | no-op attention; SwiGLU of width n | linear | no-op FFN):
* weight bytes = parameters x bytes per weight of the dtype (NVFP4: 4 bits + one FP8 scale per 16);
* KV-cache bytes per token = 2 x k x head_dim x bytes of the KV dtype (GQA layers only);
* prefill of S tokens: 2 FLOPs per parameter per token, plus causal attention 2 x 2 x heads x head_dim x S^2 / 2;
* one decode step at context c: 2 FLOPs per parameter, attention 4 x heads x head_dim x c, and the bytes read:
  all weights once plus the layer's KV cache for c tokens of every sequence;
* time = max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth) + ops x per-op overhead.
A scenario IN/OUT costs one prefill of IN tokens plus OUT decode steps at contexts IN..IN+OUT-1, summed exactly.
`block_cost_table` gives per-variant rows (the Puzzle MIP's input); `predict` sizes the batch from memory
(weights + KV cache must fit) and returns output tokens/s per GPU at the best batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tessera.arch import ArchSpec, BlockSpec
from tessera.errors import TesseraError
from tessera.hardware import Hardware

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}
# Framework ops per sub-block in one forward: eager PyTorch on CPU runs many small ops (views, rope, norms);
# fused GPU engines launch a handful of kernels. Measured from tessera's profile (~2,000 ops per SmolLM2 step).
OPS = {
    "cpu": {"gqa": 40, "linear": 6, "swiglu": 14, "ffn_linear": 6, "no_op": 0, "model": 20},
    "gpu": {"gqa": 6, "linear": 2, "swiglu": 3, "ffn_linear": 2, "no_op": 0, "model": 4},
}


@dataclass(frozen=True)
class Scenario:
    input_len: int
    output_len: int

    @staticmethod
    def parse(text: str) -> Scenario:
        try:
            a, b = (int(x) for x in text.split("/"))
        except ValueError:
            raise TesseraError(f"scenario {text!r} is not IN/OUT (e.g. 128/1024)") from None
        if a < 1 or b < 1:
            raise TesseraError(f"scenario {text!r}: input and output lengths must be >= 1")
        return Scenario(a, b)

    def __str__(self) -> str:
        return f"{self.input_len}/{self.output_len}"


@dataclass(frozen=True)
class BlockCost:
    params: int
    weight_bytes: float
    kv_bytes_per_token: float
    prefill_s: float  # batch x input_len tokens
    decode_s: float  # all output steps of the scenario, summed
    ops: int


def _sub_blocks(arch: ArchSpec, block: BlockSpec):
    """(matmul params, attention heads*head_dim if GQA else 0, kv heads, ops key) for attention and FFN."""
    h = arch.hidden_size
    att, ffn = block.attention, block.ffn
    if att.kind == "gqa":
        a_params = 2 * h * arch.num_attention_heads * arch.head_dim + 2 * h * att.num_kv_heads * arch.head_dim
        yield a_params, arch.num_attention_heads * arch.head_dim, att.num_kv_heads, "gqa"
    elif att.kind == "linear":
        yield h * h, 0, 0, "linear"
    if ffn.kind == "swiglu":
        yield 3 * h * ffn.intermediate_size, 0, 0, "swiglu"
    elif ffn.kind == "linear":
        yield h * h, 0, 0, "ffn_linear"


def _runtime(hw: Hardware) -> str:
    return "cpu" if hw.name == "cpu" else "gpu"


def block_cost(arch: ArchSpec, block: BlockSpec, hw: Hardware, scenario: Scenario, *, batch: int = 1,
               dtype: str = "bf16", kv_dtype: str | None = None) -> BlockCost:
    """Cost of one block variant in the context of `arch` (hidden size, heads) for a whole scenario."""
    wb, kvb = DTYPE_BYTES[dtype], DTYPE_BYTES[kv_dtype or ("fp32" if dtype == "fp32" else "bf16")]
    peak, bw = hw.peak(dtype) * hw.compute_eff, hw.mem_bw * hw.bw_eff
    S, ctx = scenario.input_len, scenario.input_len + np.arange(scenario.output_len)
    params = kv_per_token = ops = 0
    pre_flops, pre_bytes = 0.0, 0.0
    dec_flops = np.zeros(len(ctx))
    dec_bytes = np.zeros(len(ctx))
    for mm_params, qdim, kv_heads, kind in _sub_blocks(arch, block):
        params += mm_params
        ops += OPS[_runtime(hw)][kind]
        kv = 2 * kv_heads * arch.head_dim * kvb
        kv_per_token += kv
        pre_flops += 2 * mm_params * batch * S + 2 * 2 * batch * qdim * S * S / 2
        pre_bytes += mm_params * wb + batch * S * kv
        dec_flops += 2 * mm_params * batch + 4 * batch * qdim * ctx
        dec_bytes += mm_params * wb + batch * ctx * kv
    overhead = ops * hw.op_overhead_s
    prefill = max(pre_flops / peak, pre_bytes / bw) + overhead if ops else 0.0
    decode = float(np.sum(np.maximum(dec_flops / peak, dec_bytes / bw) + overhead)) if ops else 0.0
    norms = (block.attention.kind != "no_op") + (block.ffn.kind != "no_op")
    return BlockCost(params + norms * arch.hidden_size, (params + norms * arch.hidden_size) * wb, kv_per_token,
                     prefill, decode, ops)


def head_cost(arch: ArchSpec, hw: Hardware, scenario: Scenario, batch: int, dtype: str) -> tuple[float, float]:
    """(prefill_s, decode_s) of embedding lookup + final norm + lm_head (logits only for the last position)."""
    wb = DTYPE_BYTES["bf16" if dtype in ("fp8", "nvfp4") else dtype]  # lm_head usually stays unquantised
    peak, bw = hw.peak(dtype) * hw.compute_eff, hw.mem_bw * hw.bw_eff
    head_params = arch.vocab_size * arch.hidden_size
    step = max(2 * head_params * batch / peak, head_params * wb / bw) + OPS[_runtime(hw)]["model"] * hw.op_overhead_s
    return step, step * scenario.output_len


@dataclass(frozen=True)
class Prediction:
    hardware: str
    scenario: str
    dtype: str
    batch: int
    tp: int
    weight_bytes: float
    kv_bytes: float
    memory_bytes: float  # available to weights + KV per GPU
    prefill_s: float
    decode_s: float
    total_s: float
    output_tokens_per_s: float  # per GPU
    decode_tokens_per_s: float  # per GPU, decode phase only
    prefill_tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(arch: ArchSpec, dtype: str) -> float:
    wb = DTYPE_BYTES[dtype]
    head_wb = DTYPE_BYTES["bf16" if dtype in ("fp8", "nvfp4") else dtype]
    emb = arch.vocab_size * arch.hidden_size
    blocks = sum(arch.block_params(i) for i in range(arch.num_layers))
    return blocks * wb + emb * head_wb * (1 if arch.tie_word_embeddings else 2) + arch.hidden_size * wb


def kv_bytes_per_sequence(arch: ArchSpec, scenario: Scenario, kv_dtype: str) -> float:
    return arch.kv_cache_bytes_per_token(DTYPE_BYTES[kv_dtype]) * (scenario.input_len + scenario.output_len)


def max_batch(arch: ArchSpec, hw: Hardware, scenario: Scenario, dtype: str = "bf16", tp: int = 1,
              kv_dtype: str | None = None) -> int:
    kv_dtype = kv_dtype or ("fp32" if dtype == "fp32" else "bf16")
    budget = hw.mem_bytes * hw.usable_mem
    weights = weight_bytes(arch, dtype) / tp
    per_seq = kv_bytes_per_sequence(arch, scenario, kv_dtype) / tp
    if weights >= budget:
        raise TesseraError(
            f"the model does not fit: {weights / 1e9:.1f} GB of {dtype} weights per GPU vs {budget / 1e9:.1f} GB usable "
            f"on {hw.name} (tp={tp}); use more GPUs (--tp), a smaller dtype or a smaller model")
    if per_seq == 0:
        return 4096
    return int(min((budget - weights) // per_seq, 4096))


def predict(arch: ArchSpec, hw: Hardware, scenario: Scenario, *, dtype: str = "bf16", batch: int | str = "auto",
            tp: int = 1, kv_dtype: str | None = None) -> Prediction:
    """Whole-model time for a batch of IN/OUT requests; with batch='auto', the throughput-best batch that fits."""
    if dtype not in DTYPE_BYTES:
        raise TesseraError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    kv_dtype = kv_dtype or ("fp32" if dtype == "fp32" else "bf16")
    limit = max_batch(arch, hw, scenario, dtype, tp, kv_dtype)
    if batch == "auto":
        if limit < 1:
            raise TesseraError(_no_room(arch, hw, scenario, dtype, tp, kv_dtype))
        candidates = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b <= limit} | {limit})
        best = max((predict(arch, hw, scenario, dtype=dtype, batch=b, tp=tp, kv_dtype=kv_dtype) for b in candidates),
                   key=lambda p: p.output_tokens_per_s)
        return best
    batch = int(batch)
    if batch > limit:
        raise TesseraError(_no_room(arch, hw, scenario, dtype, tp, kv_dtype, batch))
    # Tensor parallelism splits every matrix and the KV cache across tp GPUs: per-GPU work is 1/tp.
    prefill = decode = 0.0
    cache: dict[BlockSpec, BlockCost] = {}
    for block in arch.blocks:
        if block not in cache:
            cache[block] = block_cost(arch, block, hw, scenario, batch=batch, dtype=dtype, kv_dtype=kv_dtype)
        prefill += cache[block].prefill_s
        decode += cache[block].decode_s
    head_pre, head_dec = head_cost(arch, hw, scenario, batch, dtype)
    prefill, decode = (prefill + head_pre) / tp, (decode + head_dec) / tp
    total = prefill + decode
    out_tokens = batch * scenario.output_len
    return Prediction(hw.name, str(scenario), dtype, batch, tp, weight_bytes(arch, dtype),
                      batch * kv_bytes_per_sequence(arch, scenario, kv_dtype), hw.mem_bytes * hw.usable_mem,
                      prefill, decode, total, out_tokens / total / tp, out_tokens / decode / tp,
                      batch * scenario.input_len / prefill / tp)


def _no_room(arch, hw, scenario, dtype, tp, kv_dtype, batch: int = 1) -> str:
    w = weight_bytes(arch, dtype) / tp
    kv = kv_bytes_per_sequence(arch, scenario, kv_dtype) / tp
    return (f"scenario {scenario} does not fit on {hw.name}: {w / 1e9:.1f} GB weights + {batch} x {kv / 1e9:.2f} GB "
            f"KV cache per GPU > {hw.mem_bytes * hw.usable_mem / 1e9:.1f} GB usable; lower the batch, add GPUs (--tp) "
            "or shorten the scenario")


def block_cost_table(arch: ArchSpec, variants: list[BlockSpec], hw: Hardware, scenario: Scenario, *, batch: int = 1,
                     dtype: str = "bf16") -> list[dict]:
    """One row per block variant: parameters, KV bytes/token and predicted times (the Puzzle MIP's costs)."""
    rows = []
    for v in variants:
        c = block_cost(arch, v, hw, scenario, batch=batch, dtype=dtype)
        rows.append({"block": v.describe(), **asdict(c)})
    return rows
