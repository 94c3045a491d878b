"""Measured throughput: real generation over the KV cache for IN/OUT serving scenarios.

One run = prefill of IN tokens (every sequence of the batch) then OUT decode steps, each feeding the previous
greedy token back through the static per-layer KV cache (heterogeneous children keep cache only for their GQA
layers). Inputs are random token ids: speed does not depend on text. After warm-up, `reps` runs give medians
and the spread (min..max) of prefill, decode and end-to-end tokens/s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from tessera.model import Transformer
from tessera.serving import Scenario


@dataclass(frozen=True)
class BenchResult:
    scenario: str
    batch: int
    device: str
    prefill_tok_s: float  # input tokens / prefill seconds (median)
    decode_tok_s: float  # output tokens / decode seconds (median)
    e2e_tok_s: float  # output tokens / (prefill + decode) seconds (median)
    prefill_s: float
    decode_s: float
    decode_spread: tuple[float, float]  # min, max decode tok/s over reps
    reps: int

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_once(model: Transformer, batch: int, scenario: Scenario, generator: torch.Generator | None = None,
             decode=None, make_decode=None) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one generation. `decode` replaces model.decode_step (e.g. compiled);
    `make_decode(model)` builds one after the cache exists (e.g. a CUDA graph, captured outside the timing)."""
    device = model.device
    ids = torch.randint(0, model.arch.vocab_size, (batch, scenario.input_len), generator=generator).to(device)
    model.setup_cache(batch, scenario.input_len + scenario.output_len)
    step = decode or model.decode_step
    try:
        _sync(device)
        t0 = time.perf_counter()
        token = model(ids, use_cache=True, last_only=True)[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        if make_decode is not None:
            step = make_decode(model)
            _sync(device)
            t1 = time.perf_counter()
        for _ in range(scenario.output_len):
            token = step(token).argmax(-1, keepdim=True)
        _sync(device)
        t2 = time.perf_counter()
    finally:
        model.reset_cache()
    return t1 - t0, t2 - t1


def bench(model: Transformer, scenarios: list[Scenario], batch_sizes: list[int], *, reps: int = 3, warmup: int = 1,
          seed: int = 0, compile: bool = False, cuda_graphs: bool = False, progress=None) -> list[BenchResult]:
    decode = make = None
    if compile:
        from tessera.generate import compiled_decode_step

        decode = compiled_decode_step(model)
    if cuda_graphs:
        from tessera.generate import CudaGraphDecode

        make = CudaGraphDecode
    gen = torch.Generator().manual_seed(seed)
    results = []
    for scenario in scenarios:
        for batch in batch_sizes:
            for _ in range(warmup):  # same shapes as the timed runs, so a compiled step is compiled here
                run_once(model, batch, scenario, gen, decode, make)
            runs = [run_once(model, batch, scenario, gen, decode, make) for _ in range(reps)]
            pre = statistics.median(r[0] for r in runs)
            dec = statistics.median(r[1] for r in runs)
            e2e = statistics.median(r[0] + r[1] for r in runs)
            rates = [batch * scenario.output_len / r[1] for r in runs]
            results.append(BenchResult(str(scenario), batch, str(model.device), batch * scenario.input_len / pre,
                                       batch * scenario.output_len / dec, batch * scenario.output_len / e2e,
                                       pre, dec, (min(rates), max(rates)), reps))
            if progress is not None:
                progress(results[-1])
    return results
