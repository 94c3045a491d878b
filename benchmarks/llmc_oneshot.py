"""llm-compressor's reference run for benchmarks/quantization.py, in llm-compressor's own environment.

    .venv-llmc/bin/python benchmarks/llmc_oneshot.py --model DIR --calib CALIB.safetensors --scheme NVFP4 --out DIR

`oneshot` + `QuantizationModifier(targets="Linear", scheme=..., ignore=["lm_head"])` on the given token chunks (the
same calibration chunks tessera used, written by the benchmark), saved compressed; prints one JSON line with the
calibration wall time. Runs in its own virtual environment (llm-compressor pins its own transformers); tessera
is not imported here, the benchmark loads the result with `tessera.load`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help="safetensors file with an `input_ids` tensor (N, L)")
    ap.add_argument("--scheme", required=True, help="FP8_DYNAMIC | NVFP4")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out, save_compressed=True)
    import llmcompressor

    print(json.dumps({"scheme": args.scheme, "seconds": seconds, "samples": len(ids), "seq_len": ids.shape[1],
                      "llmcompressor": llmcompressor.__version__}))


if __name__ == "__main__":
    main()
