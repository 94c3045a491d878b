"""The documented torchrun command on the CPU: `tessera distill` with 2 processes (gloo) against 1 process, same
settings, tiny seeded teacher (2 layers, hidden 32) and an FFN/hidden-pruned student on a 3,000-word corpus.
Prints the largest weight difference, the per-step losses of both runs and the wall times; exits 1 if the
students differ by more than `--atol` or the logged losses differ (they are global means, not rank 0's half).

    .venv/bin/python benchmarks/ddp_check.py [--out DIR] [--atol 2e-5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import tessera  # noqa: E402
from gpu_check import Checks, random_model  # noqa: E402
from gpu_pipeline_check import word_tokenizer  # noqa: E402
from tessera.arch import ArchSpec  # noqa: E402
from tessera.importance import random_importance  # noqa: E402
from tessera.prune import PruneTarget, prune  # noqa: E402

VOCAB = 96


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--atol", type=float, default=2e-5)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tessera-ddp-"))
    arch = ArchSpec.llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                          intermediate_size=64, max_position_embeddings=256)
    teacher = random_model(arch)
    with torch.no_grad():  # gpu_check's weights (std 0.02) make a near-uniform teacher; give it something to teach
        for name, p in teacher.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(5)
    teacher.tokenizer = word_tokenizer(VOCAB)
    tessera.save(teacher, out / "parent", force=True)
    tessera.save(prune(teacher, random_importance(teacher), PruneTarget(ffn=16, hidden=24)), out / "student", force=True)
    ids = torch.randint(4, VOCAB, (3000,), generator=torch.Generator().manual_seed(1))
    (out / "corpus.txt").write_text("\n".join(" ".join(f"w{i - 4}" for i in ids[j:j + 12].tolist())
                                              for j in range(0, len(ids), 12)))
    common = ["distill", "--teacher", out / "parent", "--student", out / "student", "--data", out / "corpus.txt",
              "--tokens", 2048, "--seq-len", 32, "--batch", 8, "--lr", 5e-3, "--warmup", 1, "--eval-every", 4,
              "--device", "cpu", "--force", "--json"]
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
                    "-m", "tessera.cli"], "single": [sys.executable, "-m", "tessera.cli"]}
    checks, secs = Checks(), {}
    for name, prefix in runs.items():
        t0 = time.perf_counter()
        proc = subprocess.run([*prefix, *map(str, common), "--out", str(out / name)], capture_output=True, text=True,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
        secs[name] = time.perf_counter() - t0
        if not checks.expect(proc.returncode == 0, f"{name}: exit {proc.returncode} in {secs[name]:.1f} s"):
            print(proc.stderr[-3000:], file=sys.stderr)
            checks.finish()
    ddp, single = tessera.load(out / "ddp").state_dict(), tessera.load(out / "single").state_dict()
    diff = max(float((ddp[k] - single[k]).abs().max()) for k in single)
    checks.expect(diff <= args.atol, f"largest |weight difference| 2 processes vs 1: {diff:.2e} over {len(single)} "
                                     f"tensors (atol {args.atol:g})")
    logs = {n: json.loads((out / n / "distill_log.json").read_text()) for n in runs}
    losses = {n: [e["loss"] for e in log] for n, log in logs.items()}
    for n, label in (("ddp", "2 processes"), ("single", "1 process  ")):
        print(f"per-step loss, {label}: " + " ".join(f"{x:.5g}" for x in losses[n]))
    checks.expect(len(losses["ddp"]) == len(losses["single"]) and all(
        abs(a - b) <= 1e-4 * abs(b) for a, b in zip(losses["ddp"], losses["single"])),
        "logged losses equal to 1e-4 (global means, not rank 0's half)")
    print(f"wall time {secs['ddp']:.1f} s (2 processes) vs {secs['single']:.1f} s (1 process); work directory {out}")
    checks.finish()


if __name__ == "__main__":
    main()
