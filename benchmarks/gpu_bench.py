"""On a GPU: measured speed-ups of pruned architectures over their parent with tessera's engine, next to the
cost model's prediction for the same chip, batch and scenario. Random bf16 weights (speed does not depend on
values); decode replayed as a CUDA graph (no per-token host overhead).

    python benchmarks/gpu_bench.py [--batch 1 64] [--scenario 128/128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cost_model import CONFIGS, children  # noqa: E402
from gpu_check import SMOLLM2  # noqa: E402
from tessera.arch import ArchSpec  # noqa: E402
from tessera.bench import run_once  # noqa: E402
from tessera.checkpoint import _finish  # noqa: E402
from tessera.cost import Scenario, predict  # noqa: E402
from tessera.formats import read_config
from tessera.generate import CudaGraphDecode  # noqa: E402
from tessera.hardware import GPUS  # noqa: E402
from tessera.model import Transformer  # noqa: E402


def build(arch: ArchSpec) -> Transformer:
    with torch.device("meta"):
        model = Transformer(arch)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return _finish(model).eval()


def measure(arch: ArchSpec, batch: int, scenario: Scenario, reps: int) -> float:
    model = build(arch)
    run_once(model, batch, scenario, make_decode=CudaGraphDecode)
    times = sorted(run_once(model, batch, scenario, make_decode=CudaGraphDecode)[1] for _ in range(reps))
    del model
    torch.cuda.empty_cache()
    return batch * scenario.output_len / times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--scenario", default="128/128")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sc = Scenario.parse(args.scenario)
    hw = GPUS["h100"]
    name = torch.cuda.get_device_name()
    groups = {
        "llama-3.1-8b": {n: read_config(CONFIGS / n) for n in
                         ("llama-3.1-8b", "llama-3.1-minitron-4b-width", "llama-3.1-minitron-4b-depth")},
        "smollm2-135m": {"smollm2-135m": SMOLLM2, **children(SMOLLM2)},
    }
    for group, archs in groups.items():
        for batch in args.batch:
            print(f"\n{name}, bf16, scenario {sc}, batch {batch}: decode tok/s and speed-up over {group}")
            base_meas = base_pred = None
            for label, arch in archs.items():
                t0 = time.perf_counter()
                meas = measure(arch, batch, sc, args.reps)
                pred = predict(arch, hw, sc, batch=batch).decode_tokens_per_s
                base_meas, base_pred = base_meas or meas, base_pred or pred
                print(f"  {label:>30}: measured {meas:9.0f} tok/s  speed-up {meas / base_meas:5.2f}  "
                      f"predicted {pred:9.0f} tok/s  speed-up {pred / base_pred:5.2f}  ({time.perf_counter() - t0:.0f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
