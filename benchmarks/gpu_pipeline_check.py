"""The compute stages end to end on one device, through the CLI a user runs: importance -> prune -> distill (under
torchrun, one process per GPU) -> eval / kld / perplexity, each with `--device` and `--json`. Exits 1 if any
stage fails or reports another device, 2 without CUDA when `--device cuda` is asked for.

The model is SmolLM2-135M-shaped with seeded random weights and a word-level tokenizer (the default parent's GGUF
need not travel to a GPU box); the corpus is seeded random words. On a CPU (`--device cpu --nproc 2`) the same
script checks the gloo path.

    python benchmarks/gpu_pipeline_check.py [--device cuda] [--nproc N] [--out DIR]
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
from gpu_check import SMOLLM2, Checks, random_model, require_cuda  # noqa: E402

VOCAB_WORDS = 2000


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def run(args: list[str], checks: Checks, what: str, nproc: int = 1) -> dict | None:
    cmd = [sys.executable, "-m", "tessera.cli", *map(str, args), "--json"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29571",
               "-m", "tessera.cli", *map(str, args), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    secs = time.perf_counter() - t0
    if not checks.expect(proc.returncode == 0, f"{what}: exit {proc.returncode} in {secs:.1f} s"):
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nproc", type=int, default=None, help="distillation processes (default: one per GPU, max 2)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than SmolLM2's 30, for a quick CPU run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        require_cuda()
    nproc = args.nproc or (min(2, torch.cuda.device_count()) if args.device.startswith("cuda") else 2)
    out = args.out or Path(tempfile.mkdtemp(prefix="tessera-gpu-pipeline-"))
    checks = Checks()
    arch = SMOLLM2.with_blocks(SMOLLM2.blocks[: args.layers]) if args.layers else SMOLLM2
    parent = random_model(arch)
    parent.tokenizer = word_tokenizer(arch.vocab_size)
    tessera.save(parent, out / "parent", force=True)
    ids = torch.randint(4, VOCAB_WORDS, (200_000,), generator=torch.Generator().manual_seed(0))
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"w{i - 4}" for i in ids[j:j + 20].tolist()) for j in range(0, len(ids), 20)))
    task = out / "task.jsonl"
    task.write_text("".join(json.dumps({"context": f"w{i} w{i + 1}", "choices": [f" w{i + 2}", f" w{i + 3}"],
                                        "gold": i % 2}) + "\n" for i in range(40)))
    dev = ["--device", args.device]
    common = ["--data", corpus, "--seq-len", 128]
    print(f"device {args.device}, {nproc} distillation process(es), work directory {out}")
    imp = run(["importance", out / "parent", "--out", out / "scores.safetensors", "--samples", 16, "--force", *common,
               *dev], checks, "importance")
    if imp:
        checks.expect(imp["meta"]["data"]["split"] == "calibration", f"importance data: {imp['meta']['data']}")
    pruned = run(["prune", out / "parent", "--out", out / "child", "--scores", out / "scores.safetensors", "--ffn",
                  768, "--hidden", 448, "--heads", 6, "--kv-heads", 1, "--force", *dev], checks, "prune")
    if pruned:
        checks.expect(pruned["params"] < parent.num_params(), f"prune: {pruned['params']:,} parameters")
    distilled = run(["distill", "--teacher", out / "parent", "--student", out / "child", "--out", out / "healed",
                     "--tokens", 128 * 16 * 8, "--batch", 16, "--lr", 1e-3, "--warmup", 2, "--eval-every", 4,
                     "--force", *common, *dev], checks, f"distill ({nproc} processes)", nproc=nproc)
    if distilled:
        want = "cuda" if args.device.startswith("cuda") else "cpu"
        checks.expect(distilled["device"].startswith(want), f"distill ran on {distilled['device']} "
                      f"({distilled['compute_dtype']})")
        log = json.loads((out / "healed" / "distill_log.json").read_text())
        checks.expect(log[-1]["heldout_kld"] < log[3]["heldout_kld"],
                      f"distill: held-out KLD {log[3]['heldout_kld']:.4f} (step 4) -> {log[-1]['heldout_kld']:.4f}")
    for name, cmd in [("eval", ["eval", out / "healed", "--tasks", task, "--no-cache"]),
                      ("kld", ["kld", out / "parent", out / "healed", corpus, "--seq-len", 128, "--max-tokens", 4096]),
                      ("perplexity", ["perplexity", out / "healed", corpus, "--max-tokens", 4096, "--max-len", 512])]:
        result = run([*cmd, *dev], checks, name)
        if result:
            shown = {k: v for k, v in result.items() if k in ("kld", "top1_agreement", "perplexity", "tokens")}
            print(f"  {name}: {shown or result.get('results')}")
    checks.finish()
    print("all stages passed")


if __name__ == "__main__":
    main()
