"""Quantization on the default parent: every tessera scheme side by side with llm-compressor's oneshot.

For each variant: KL(parent || quantized) and top-1 agreement on 512-token windows of the reporting split
(calibration never sees it), perplexity on the same windows, accuracy preserved on the shared bench tasks
(first --limit items of each), calibration wall time. llm-compressor (`oneshot` + `QuantizationModifier`,
FP8_DYNAMIC and NVFP4) runs in its own environment (--llmc-python) on the same calibration chunks; its
compressed-tensors output is loaded with `tessera.load` and evaluated by the same code.

    flock /work/bench.lock .venv/bin/python benchmarks/quantization.py [--calib-samples 32] [--calib-seq-len 512]
        [--report 8] [--limit 20] [--llmc-python .venv-llmc/bin/python] [--threads 2] [--only LABEL ...] [--out DIR]

--only takes one row label per flag and may be repeated (labels hold commas: "fp8 (static, per-tensor)"); an
unknown label is refused with the list of known ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import tessera
from tessera.checkpoint import default_parent_dir
from tessera.data import check_disjoint, load_split
from tessera.evaluate import accuracy_preserved, evaluate_tasks, mean_kld, parent_logits_for
from tessera.evaluate.perplexity import perplexity_of_ids
from tessera.quantize import get_scheme
from tessera.quantize.calibrate import CalibrationConfig, calibration_data, quantize_model

TASKS = ["arc_easy", "winogrande", "lambada"]
LLMC_PRESETS = ("FP8_DYNAMIC", "NVFP4")  # llm-compressor's rows, labelled "<preset> oneshot"
# (label, scheme, observer, gptq: False | True | "sequential"); the llm-compressor preset each is compared with
VARIANTS = [  # the rows the KLD goals are judged on first, so a run stopped early still has them
    ("fp8-dynamic mse+gptq", "fp8-dynamic", "mse", True, "FP8_DYNAMIC"),
    ("nvfp4 mse+gptq", "nvfp4", "mse", True, "NVFP4"),
    ("fp8-dynamic minmax", "fp8-dynamic", "minmax", False, "FP8_DYNAMIC"),
    ("nvfp4 minmax", "nvfp4", "minmax", False, "NVFP4"),
    ("nvfp4 mse+gptq sequential", "nvfp4", "mse", "sequential", "NVFP4"),
    ("fp8 (static, per-tensor)", "fp8", "minmax", False, None),
    ("nvfp4-weight-only mse+gptq", "nvfp4-weight-only", "mse", True, None),
]


def select_rows(only: list[str] | None) -> set[str] | None:
    """The row labels `--only` asked for (None: every row); an unknown label exits with one line."""
    if not only:
        return None
    known = [label for label, *_ in VARIANTS] + [f"{preset} oneshot" for preset in LLMC_PRESETS]
    unknown = [x for x in only if x not in known]
    if unknown:
        sys.exit(f"error: unknown --only row {', '.join(map(repr, unknown))}; known rows: "
                 f"{', '.join(map(repr, known))} (one label per --only)")
    return set(only)


def evaluate(parent, child, held, parent_ref, parent_acc, limit):
    k = mean_kld(parent, child, held.chunks, parent_logits=parent_ref)
    ppl = perplexity_of_ids(child, held.chunks.flatten().tolist(), held.seq_len)
    acc = evaluate_tasks(child, TASKS, limit=limit, progress=False, use_cache=False)
    table = accuracy_preserved(acc, parent_acc)
    return {"kld": k.kld, "top1": k.top1, "tokens": k.tokens, "ppl": ppl.perplexity,
            "preserved": table["average"]["preserved"], "accuracy": acc}


def run_llmc(python: str, parent_dir: Path, calib_ids: torch.Tensor, preset: str, work: Path, threads: int | None):
    calib_file = work / "calib.safetensors"
    if not calib_file.exists():
        save_file({"input_ids": calib_ids.contiguous()}, str(calib_file))
    out = work / preset
    cmd = [python, str(Path(__file__).with_name("llmc_oneshot.py")), "--model", str(parent_dir), "--calib",
           str(calib_file), "--scheme", preset, "--out", str(out)] + (["--threads", str(threads)] if threads else [])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}:\n{res.stderr[-3000:]}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["process_seconds"] = time.perf_counter() - t0
    return out, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--report", type=int, default=8, help="512-token windows of the reporting split")
    ap.add_argument("--limit", type=int, default=20, help="items per accuracy task")
    ap.add_argument("--llmc-python", default=".venv-llmc/bin/python", help="llm-compressor's environment ('' skips)")
    ap.add_argument("--only", action="append", default=None, metavar="LABEL",
                    help="one row label (repeat the flag for more; default: every row)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    only = select_rows(args.only)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    parent = tessera.load("default")
    cfg = CalibrationConfig(samples=args.calib_samples, seq_len=args.calib_seq_len)
    calib = calibration_data(parent.tokenizer, cfg)
    held = load_split(parent.tokenizer, "reporting", seq_len=512, max_tokens=args.report * 512).take(args.report)
    records = {"calibration": calib.record(), "reporting": held.record()}
    check_disjoint(records)
    for role, r in records.items():
        print(f"{role:>11}: {r['chunks']} chunks x {r['seq_len']} = {r['tokens']:,} tokens of the {r['split']} split "
              f"(sha256 {r['sha256']})", flush=True)
    parent_ref = parent_logits_for(parent, held.chunks)
    parent_acc = evaluate_tasks(parent, TASKS, limit=args.limit, progress=False, use_cache=False)
    parent_ppl = perplexity_of_ids(parent, held.chunks.flatten().tolist(), 512).perplexity
    print(f"parent: perplexity {parent_ppl:.3f}; accuracy (limit {args.limit}): "
          + ", ".join(f"{t} {100 * parent_acc[t].get('acc_norm', parent_acc[t].get('acc')):.1f}" for t in TASKS),
          flush=True)
    rows = []

    def save(row: dict) -> None:
        """Append each finished row to rows.jsonl at once, so a stopped run keeps what it measured."""
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "rows.jsonl", "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    if args.llmc_python:  # the reference first, so that its figures exist even if a later row is stopped
        with tempfile.TemporaryDirectory() as tmp:
            for preset in LLMC_PRESETS:
                if only and f"{preset} oneshot" not in only:
                    continue
                try:
                    out, info = run_llmc(args.llmc_python, default_parent_dir(), calib.chunks, preset, Path(tmp),
                                         args.threads)
                except RuntimeError as e:  # one failed preset must not lose the rows already measured
                    print(f"llm-compressor {preset}: FAILED: {e}", flush=True)
                    continue
                child = tessera.load(out)
                child.tokenizer = parent.tokenizer
                r = {"tool": "llm-compressor", "variant": f"{preset} oneshot", "scheme": preset, "seconds": info["seconds"],
                     "llmcompressor": info["llmcompressor"], "loaded_as": child.quantization["scheme"],
                     **evaluate(parent, child, held, parent_ref, parent_acc, args.limit)}
                rows.append(r)
                save(r)
                print(f"llm-compressor {preset:>21}: KLD {r['kld']:.5f}, top-1 {r['top1']:.2%}, ppl {r['ppl']:.3f}, "
                      f"preserved {r['preserved']:.1%}, oneshot {info['seconds']:.1f} s (loaded by tessera as "
                      f"{r['loaded_as']})", flush=True)
                del child
    for label, scheme, observer, gptq, _ in VARIANTS:
        if only and label not in only:
            continue
        c = CalibrationConfig(samples=args.calib_samples, seq_len=args.calib_seq_len, observer=observer,
                              gptq=bool(gptq), gptq_sequential=gptq == "sequential")
        t0 = time.perf_counter()
        child = quantize_model(parent, get_scheme(scheme), calib, config=c)
        secs = time.perf_counter() - t0
        r = {"tool": "tessera", "variant": label, "scheme": scheme, "seconds": secs,
             **evaluate(parent, child, held, parent_ref, parent_acc, args.limit)}
        rows.append(r)
        save(r)
        print(f"tessera {label:>28}: KLD {r['kld']:.5f}, top-1 {r['top1']:.2%}, ppl {r['ppl']:.3f}, preserved "
              f"{r['preserved']:.1%}, calibration+quantization {secs:.1f} s", flush=True)
        del child
    print(f"\nparent perplexity {parent_ppl:.3f}; reporting {held.tokens:,} tokens; calibration {calib.tokens:,} tokens;"
          f" accuracy on the first {args.limit} items of {', '.join(TASKS)}")
    print("\n| tool | variant | KLD | top-1 | perplexity | acc. preserved | calibration s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tool']} | {r['variant']} | {r['kld']:.5f} | {r['top1']:.2%} | {r['ppl']:.3f} | "
              f"{r['preserved']:.1%} | {r['seconds']:.1f} |")
    ref = {r["scheme"]: r for r in rows if r["tool"] == "llm-compressor"}
    if ref:
        print("\n| tessera variant | vs llm-compressor | KLD ratio |")
        print("|---|---|---:|")
        for label, _scheme, _obs, _gptq, preset in VARIANTS:
            r = next((x for x in rows if x["tool"] == "tessera" and x["variant"] == label), None)
            if r is not None and preset in ref:
                print(f"| {label} | {preset} | {r['kld'] / ref[preset]['kld']:.3f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"rows": rows, "parent_accuracy": parent_acc,
                                                           "parent_ppl": parent_ppl, "data": records,
                                                           "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
