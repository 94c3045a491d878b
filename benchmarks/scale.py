"""An 8B-class parent on a small machine: every stage's wall time and peak memory on a checkpoint shaped like
Llama-3.1-8B (random bf16 weights), run layer by layer (`tessera.stream`).

    .venv/bin/python benchmarks/scale.py [--dir /work/scratch/scale] [--stages build,inspect,...] [--samples 4]

Stages already run can be left out (`--stages quantize,kld`): the parent, the importance scores and the pruned
child are reused from DIR when there. `build` writes the parent (32 layers, hidden 4096, 32 heads / 8 KV heads, FFN
14336, vocab 128256: 8.0 B parameters, 16 GB in bf16) tensor by tensor into safetensors shards with
`tessera.stream.checkpoint_writer`, so it is never whole in memory; the tokenizer is the default parent's (its ids
are a subset of the vocabulary). It is reused when it is already there (--rebuild writes it again). Then every
stage runs as its own `tessera` command in a child process, and its wall time, CPU time and peak resident memory
(`os.wait4`'s rusage of that process: ru_maxrss) are printed side by side:

    inspect      config and shard headers checked, nothing loaded
    cost         the roofline prediction (config only)
    importance   activation importance (+ drop-one-layer scores) on a few calibration chunks, streamed
    prune        Minitron prune to 50 % FFN + 75 % hidden with those scores, written shard by shard
    quantize     fp8-dynamic, streamed: each bf16 layer read, quantized and written shard by shard
    puzzle       the Puzzle library + BLD + replace-1-block scoring for two layers (library API, streamed)
    kld          KL(parent || pruned child) with both streamed

The goal (issue 19): every stage under 20 GiB peak RSS on the 24 GiB, 2-core box. Token counts are small on
purpose (the point is memory and that each stage runs; the weights are random, so the scores mean nothing).
Not in CI (it writes ~30 GB and takes tens of minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
STAGES = ("build", "inspect", "cost", "importance", "prune", "quantize", "puzzle", "kld")


# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B); "tiny" runs every stage in seconds (a smoke test).
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32, num_kv_heads=8,
               intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=49152, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                 intermediate_size=128, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5),
}


def shape_arch(shape: str, tokenizer):
    """The architecture of `shape`, with llama3 RoPE scaling and the tokenizer's special ids."""
    from tessera.arch import ArchSpec, RopeScaling

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    return ArchSpec.llama(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos,
                          pad_token_id=tokenizer.pad_token_id,
                          rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192))


def build(out: Path, shape: str = "8b", seed: int = 0, max_shard_bytes: int | None = None, tokenizer=None) -> None:
    """Random bf16 weights (normal, std 0.02; norms 1), written tensor by tensor: memory holds one tensor in fp32
    and one shard. The tokenizer is the default parent's unless one is given."""
    import torch

    from tessera.checkpoint import MAX_SHARD_BYTES, default_parent_dir, load_tokenizer
    from tessera.stream import checkpoint_writer
    from tessera.stream.writer import save_order

    torch.set_num_threads(1)
    tok = tokenizer if tokenizer is not None else load_tokenizer(default_parent_dir())
    arch = shape_arch(shape, tok)
    g = torch.Generator().manual_seed(seed)
    record = [{"stage": "build", "note": f"random weights shaped like {'Llama-3.1-8B' if shape == '8b' else shape} "
               "(benchmarks/scale.py)", "seed": seed}]
    with checkpoint_writer(out, arch, dtype=torch.bfloat16, provenance=record, tokenizer=tok, force=True,
                           max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES) as w:
        for name in save_order(w.expected):
            shape_ = w.expected[name]
            if name.endswith("norm.weight"):
                t = torch.ones(shape_, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape_).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)
            w.add(name, t)
            del t


def puzzle(parent_dir: Path, out: Path, layers: tuple[int, ...] = (0, 1), samples: int = 4, seq_len: int = 64) -> None:
    """The Puzzle library (one KV-head and one FFN-width variant besides no-ops), BLD of `layers` and their
    replace-1-block scores, on the parent streamed in fp32 (no CLI for these stages yet: the library API)."""
    import torch

    from tessera.data import load_split
    from tessera.puzzle.bld import BLDConfig, run_bld
    from tessera.puzzle.library import LibraryConfig, build_library
    from tessera.puzzle.scoring import score_library
    from tessera.stream import open_streamed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    parent = open_streamed(parent_dir, dtype=torch.float32)
    calib = load_split(parent.tokenizer, "calibration", None, seq_len=seq_len, max_tokens=samples * seq_len).take(samples)
    selection = load_split(parent.tokenizer, "selection", None, seq_len=seq_len, max_tokens=2 * seq_len).take(2)
    kv = max(1, parent.arch.blocks[0].attention.num_kv_heads // 8)
    cfg = LibraryConfig(kv_heads=(kv,), ffn_fractions=(0.5,), linear_attention=False, linear_ffn=False)
    t0 = time.perf_counter()
    lib = build_library(parent, cfg, calib.chunks, out / "library", parent_source=str(parent_dir), force=True,
                        batch_size=2)
    t1 = time.perf_counter()
    run_bld(lib, parent, calib, BLDConfig(tokens=samples * seq_len, batch=2), layers=list(layers), force=True,
            progress=False)
    t2 = time.perf_counter()
    table = score_library(lib, parent, selection, out / "scores", layers=list(layers), batch_size=2, progress=False,
                          force=True)
    t3 = time.perf_counter()
    print(f"puzzle: library {t1 - t0:.1f} s, BLD of layers {list(layers)} {t2 - t1:.1f} s, scoring {t3 - t2:.1f} s "
          f"({len(table.kl)} candidates on {table.tokens} tokens)")
    for (i, key), kl in sorted(table.kl.items()):
        print(f"  layer {i} {key:<16} KL {kl:.5f}")


def run_stage(name: str, argv: list[str], env: dict) -> dict:
    """Run one stage as a child process; its wall time and peak RSS (from wait4, this child only)."""
    print(f"\n== {name}: {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"stage": name, "wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "exit": proc.returncode, "command": shlex.join(argv)}
    print(f"== {name}: exit {row['exit']}, {row['wall_s']} s wall, {row['cpu_s']} s CPU, "
          f"peak RSS {row['peak_rss_gib']} GiB", flush=True)
    return row


def has_command(name: str) -> bool:
    import tessera.cli  # noqa: F401 - registers the command groups
    from tessera.cli.app import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    names |= {g.name for g in app.registered_groups}
    return name in names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/work/scratch/scale"),
                    help="the parent and the outputs go to DIR/SHAPE/")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b", help="8b (Llama-3.1-8B) or tiny (a smoke test)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--samples", type=int, default=4, help="calibration chunks for importance")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--drop-samples", type=int, default=1, help="chunks for the drop-one-layer scores")
    ap.add_argument("--kld-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true", help="write the parent again even if it is there")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        sys.exit(f"error: unknown stages {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    d = args.dir.expanduser() / args.shape
    d.mkdir(parents=True, exist_ok=True)
    parent, child, scores = d / "parent", d / "child", d / "importance.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tessera = [sys.executable, "-m", "tessera.cli"]
    calib = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--drop-samples", str(args.drop_samples)]
    compute = ["--device", "cpu", "--dtype", "fp32", "--stream", "on"]
    hidden, ffn = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["intermediate_size"]
    rows = []
    for stage in stages:
        if stage == "build":
            if (parent / "config.json").is_file() and not args.rebuild:
                print(f"\n== build: {parent} is there (--rebuild writes it again)")
                continue
            rows.append(run_stage("build", [sys.executable, __file__, "--build-only", str(parent), args.shape], env))
        elif stage == "inspect":
            rows.append(run_stage(stage, [*tessera, "inspect", str(parent)], env))
        elif stage == "cost":
            rows.append(run_stage(stage, [*tessera, "cost", str(parent), "--gpu", "h100"], env))
        elif stage == "importance":
            rows.append(run_stage(stage, [*tessera, "importance", str(parent), "--out", str(scores), *calib, *compute,
                                          "--force"], env))
        elif stage == "prune":
            rows.append(run_stage(stage, [*tessera, "prune", str(parent), "--out", str(child), "--scores", str(scores),
                                          "--ffn", str(ffn // 2), "--hidden", str(hidden * 3 // 4),
                                          "--save-dtype", "bf16", *compute,
                                          "--force"], env))
        elif stage == "quantize":
            if not has_command("quantize"):
                print("\n== quantize: not run (no `tessera quantize` command in this checkout)")
                rows.append({"stage": stage, "exit": None, "note": "not run: no quantize command"})
                continue
            rows.append(run_stage(stage, [*tessera, "quantize", str(parent), "--scheme", "fp8-dynamic", "--out",
                                          str(d / "fp8"), "--device", "cpu", "--dtype", "bf16", "--stream", "on",
                                          "--force"], env))
        elif stage == "puzzle":
            rows.append(run_stage(stage, [sys.executable, __file__, "--puzzle-only", str(parent), str(d / "puzzle"),
                                          str(args.samples), str(args.seq_len)], env))
        elif stage == "kld":
            rows.append(run_stage(stage, [*tessera, "kld", str(parent), str(child), "--seq-len", str(args.seq_len),
                                          "--max-tokens", str(args.kld_tokens), "--batch-size", "2", *compute], env))
    print("\nstage        exit   wall s   CPU s   peak RSS GiB")
    for r in rows:
        if r.get("exit") is None:
            print(f"{r['stage']:<12} {'-':>4}   {r['note']}")
        else:
            print(f"{r['stage']:<12} {r['exit']:>4} {r['wall_s']:>8} {r['cpu_s']:>7} {r['peak_rss_gib']:>14}")
    ran = [r for r in rows if r.get("exit") is not None]
    if ran:
        worst = max(ran, key=lambda r: r["peak_rss_gib"])
        print(f"largest peak RSS: {worst['peak_rss_gib']} GiB ({worst['stage']}); goal < 20 GiB: "
              f"{'met' if worst['peak_rss_gib'] < 20 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if any(r.get("exit") not in (None, 0) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build-only":
        build(Path(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "--puzzle-only":
        puzzle(Path(sys.argv[2]), Path(sys.argv[3]), samples=int(sys.argv[4]), seq_len=int(sys.argv[5]))
    else:
        main()
