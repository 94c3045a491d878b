"""Prefill and decode tokens/s of tessera vs transformers on the default parent, measured side by side.

Both sides are timed the same way, through their public generate(): prefill = a generation of 1 new token;
decode = (time of 1 + N new tokens - time of 1 new token) / N. Runs alternate (tessera, transformers,
tessera, ...) and the medians are compared, so load from other processes hits both sides alike.

    .venv/bin/python benchmarks/runtime.py [--prompt-len 128] [--new-tokens 64] [--batch 1] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def tessera_runner(model, compile: bool = False):
    from tessera.generate import generate

    def run(ids: torch.Tensor, n: int) -> None:
        generate(model, ids.tolist(), n, stop_tokens=[], compile=compile)

    return run


def hf_runner(model):
    def run(ids: torch.Tensor, n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    return run


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode (compiling takes ~1 min)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import transformers
    from transformers import AutoModelForCausalLM

    import tessera
    from tessera.checkpoint import default_parent_dir

    transformers.logging.set_verbosity_error()
    ours = tessera.load("default", dtype=dtype, device=args.device)
    runners = {"tessera": tessera_runner(ours)}
    if not args.no_compile:
        runners["tessera-compiled"] = tessera_runner(ours, compile=True)
    for impl in ("sdpa", "eager"):
        hf = AutoModelForCausalLM.from_pretrained(default_parent_dir(), dtype=dtype, attn_implementation=impl)
        runners[f"transformers-{impl}"] = hf_runner(hf.to(args.device).eval())

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.prompt_len), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def measure(run, n):
        sync()
        t = timed(run, ids, n)
        sync()
        return t

    for run in runners.values():  # warm-up: allocator, kernels, caches, torch.compile
        measure(run, 4)
    prefill = {k: [] for k in runners}
    full = {k: [] for k in runners}
    for _ in range(args.reps):
        for name, run in runners.items():
            prefill[name].append(measure(run, 1))
            full[name].append(measure(run, 1 + args.new_tokens))

    print(f"default parent, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{args.dtype} on {args.device}, {args.reps} alternating reps, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    rates = {}
    for name in runners:
        p = statistics.median(prefill[name])
        d = statistics.median(f - q for f, q in zip(full[name], prefill[name])) / args.new_tokens
        rates[name] = (args.batch * args.prompt_len / p, args.batch / d)
        print(f"{name:>20}: prefill {rates[name][0]:9.1f} tok/s   decode {rates[name][1]:8.1f} tok/s")
    for ours_name in [n for n in runners if n.startswith("tessera")]:
        for ref in ("transformers-sdpa", "transformers-eager"):
            print(f"{ours_name} / {ref}: prefill {rates[ours_name][0] / rates[ref][0]:.2f}x   "
                  f"decode {rates[ours_name][1] / rates[ref][1]:.2f}x")


if __name__ == "__main__":
    main()
