"""CUDA checks and GPU throughput on a parent-shaped model (random weights: speed does not depend on values).

Checks: CUDA fp32 logits equal CPU fp32 logits; cached generation equals uncached on CUDA; bf16 runs; then
prefill / decode tokens/s of tessera (eager and torch.compile'd decode) against transformers' Llama on the same
weights, side by side. The default parent's weights are not needed (the GPU box cannot read the GGUF), so the
SmolLM2-135M shape is built from its ArchSpec with seeded random weights.

    python benchmarks/gpu_check.py [--arch-config benchmarks/configs/smollm2-135m.json] [--batch 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tessera.arch import ArchSpec
from tessera.checkpoint import _finish
from tessera.formats import read_config, to_hf_config
from tessera.generate import generate
from tessera.model import Transformer

SMOLLM2 = ArchSpec.llama(vocab_size=49152, hidden_size=576, num_layers=30, num_attention_heads=9, num_kv_heads=3,
                         intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_model(arch: ArchSpec, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.05 * torch.randn_like(p) if name.endswith("norm.weight") else 0.02 * torch.randn_like(p))
    return _finish(model).eval()


class Checks:
    """Correctness checks of a benchmark: each prints its line; any failure makes the script exit with status 1."""

    def __init__(self):
        self.failed: list[str] = []

    def expect(self, ok: bool, line: str) -> bool:
        print(f"{line}  ({'ok' if ok else 'MISMATCH'})", flush=True)
        if not ok:
            self.failed.append(line)
        return ok

    def finish(self) -> None:
        if self.failed:
            print(f"{len(self.failed)} check(s) failed: " + "; ".join(self.failed), file=sys.stderr)
            sys.exit(1)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        print("error: this check needs a CUDA device", file=sys.stderr)
        sys.exit(2)


def hf_twin(model: Transformer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in to_hf_config(model.arch).items() if k not in ("architectures", "model_type")}
    hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf.eval()


def cuda_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch-config", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    require_cuda()
    checks = Checks()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    arch = read_config(args.arch_config) if args.arch_config else SMOLLM2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    cpu = random_model(arch)
    gpu = random_model(arch).cuda()
    ids = torch.randint(100, 40000, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (cpu(ids) - gpu(ids.cuda()).cpu()).abs().max().item()
    checks.expect(diff < 1e-3, f"fp32 logits, CUDA vs CPU: max |diff| = {diff:.2e}")
    prompts = ids.tolist()
    cached = generate(gpu, prompts, 16, stop_tokens=[])
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        for _ in range(16):
            logits = gpu(torch.tensor(seqs, device="cuda"))[:, -1]
            for s, t in zip(seqs, logits.argmax(-1).tolist()):
                s.append(t)
    same = all(c == s[len(p):] for c, s, p in zip(cached, seqs, prompts))
    checks.expect(same, f"cached == uncached greedy generation on CUDA (fp32): {same}")
    compiled = generate(gpu, prompts, 16, stop_tokens=[], compile=True)
    checks.expect(compiled == cached, f"compiled decode == eager decode on CUDA (fp32): {compiled == cached}")

    model = gpu.to(torch.bfloat16)
    hf = hf_twin(random_model(arch)).to("cuda", torch.bfloat16)
    for batch in args.batch:
        x = torch.randint(100, 40000, (batch, args.prompt_len), device="cuda")
        runners = {
            "tessera": lambda n, x=x: generate(model, x.tolist(), n, stop_tokens=[]),
            "tessera-compiled": lambda n, x=x: generate(model, x.tolist(), n, stop_tokens=[], compile=True),
            "transformers-sdpa": lambda n, x=x: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                                             min_new_tokens=n, do_sample=False, pad_token_id=0),
        }
        rates = {}
        for name, run in runners.items():
            with torch.inference_mode():
                run(4)
                run(1 + args.new_tokens)  # warm-up / compile for this shape
                pre = cuda_time(lambda run=run: run(1), args.reps)
                full = cuda_time(lambda run=run: run(1 + args.new_tokens), args.reps)
            rates[name] = (batch * args.prompt_len / pre, batch * args.new_tokens / (full - pre))
            print(f"bf16 batch {batch:3d} {name:>18}: prefill {rates[name][0]:10.0f} tok/s  "
                  f"decode {rates[name][1]:8.0f} tok/s")
        for name in ("tessera", "tessera-compiled"):
            ref = rates["transformers-sdpa"]
            print(f"bf16 batch {batch:3d} {name} / transformers-sdpa: prefill {rates[name][0] / ref[0]:.2f}x  "
                  f"decode {rates[name][1] / ref[1]:.2f}x")
    checks.finish()


if __name__ == "__main__":
    main()
