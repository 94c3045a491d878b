"""tessera run: recipes, the manifest and lock, skip / resume / rerun decisions, bad input, the report."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest

import tessera
from helpers import assert_one_line_error, cli, random_model, tiny_arch, tiny_tokenizer
from tessera.errors import TesseraError
from tessera.pipeline import BUDGETS, load_recipe, parse_recipe, shipped_recipes
from tessera.pipeline.manifest import Manifest, RunLock, hash_path
from tessera.pipeline.recipe import STAGE_MODULES, check_runnable


def make_fixture(root: Path) -> Path:
    """A tiny parent, a corpus of its words, a custom task and a recipe that runs every stage on them."""
    root.mkdir(parents=True, exist_ok=True)
    m = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64))
    m.tokenizer = tiny_tokenizer()
    tessera.save(m, root / "parent", force=True)
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(f"w{rng.randrange(4, 96)}" for _ in range(20))
                                               for _ in range(3000)))
    with open(root / "task.jsonl", "w") as f:
        for i in range(12):
            row = {"context": " ".join(f"w{rng.randrange(4, 96)}" for _ in range(6)),
                   "choices": [f" w{rng.randrange(4, 96)}" for _ in range(3)], "gold": i % 3}
            f.write(json.dumps(row) + "\n")
    (root / "tiny.toml").write_text(TINY_RECIPE.format(root=root))
    return root / "tiny.toml"


TINY_RECIPE = """
[recipe]
name = "tiny"
parent = "{root}/parent"
[data]
path = "{root}/corpus.txt"
seq_len = 16
[prune]
target_params = 0.6
samples = 8
select_samples = 4
max_candidates = 2
multiple = 8
[distill]
tokens = 3840
batch = 4
lr = 5e-3
warmup = 1
ckpt_every = 1
eval_every = 20
eval_chunks = 2
[export]
outtype = "f16"
[evaluate]
tasks = ["{root}/task.jsonl"]
limit = 12
kld_chunks = 4
perplexity_tokens = 300
[bench]
scenarios = ["8/4"]
reps = 1
[cost]
gpu = "h100"
scenarios = ["128/128"]
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    return make_fixture(tmp_path / "fx")


def assert_error_line(result, needle):
    """A run that fails after some stages printed progress: exit 2, no traceback, one error line on stderr."""
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output


# ---------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["default", "minitron", "quantize-only", "gpu-sizing"])
def test_every_shipped_recipe_validates_at_every_budget(name):
    assert name in shipped_recipes()
    recipe = load_recipe(name)
    assert recipe.stage_names[0] == "parent" and recipe.stage_names[-1] == "report"
    for budget in BUDGETS:
        scaled = recipe.with_budget(budget)
        for stage, cfg in recipe.stages.items():
            for f in dataclasses.fields(cfg):  # budgets scale tokens, samples and limits, nothing else
                before, after = getattr(cfg, f.name), getattr(scaled.stages[stage], f.name)
                if "scale" not in f.metadata:
                    assert before == after, (stage, f.name)
    quick = load_recipe("minitron").with_budget("quick")
    assert quick.config("distill").tokens == load_recipe("minitron").config("distill").tokens // 50
    assert load_recipe("minitron").with_budget("full").config("evaluate").limit is None


BAD_RECIPES = [
    ("[prune]\ntarget_param = 0.5\n", "unknown key 'target_param' in [prune]"),
    ("[distill]\ntokens = \"many\"\n[prune]\n", "[distill] tokens must be an integer, got a string"),
    ("[prune]\ntarget_params = 1.5\n", "target_params 1.5 is impossible"),
    ("[search]\ntarget_speedup = 0.9\n", "target_speedup 0.9 is impossible"),
    ("[evaluate]\ntasks = [\"arc_easy\", \"no_such_task\"]\n", "unknown task 'no_such_task'"),
    ("[evaluate]\ntasks = \"arc_easy\"\n", "tasks must be a list of strings"),
    ("[prunning]\n", "unknown table [prunning]"),
    ("[cost]\ngpu = \"h1000\"\n", "gpu 'h1000' is unknown"),
    ("[bench]\nscenarios = [\"128x128\"]\n", "[bench] scenarios"),
    ("[distill]\n", "[distill] needs a child to train"),
    ("[prune]\ntarget_params = 0.5\n[search]\n", "keep one of them"),
    ("[recipe\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,needle", BAD_RECIPES)
def test_recipe_mistakes_are_one_clear_line(tmp_path, text, needle):
    with pytest.raises(TesseraError) as exc:
        parse_recipe(text, "r.toml")
    assert needle in str(exc.value) and "\n" not in str(exc.value) and str(exc.value).startswith("r.toml")
    (tmp_path / "r.toml").write_text(text)
    assert_one_line_error(cli("run", tmp_path / "r.toml", "--out", tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()


def test_a_stage_whose_library_has_not_landed_is_refused_in_one_line():
    import importlib.util

    for stage, (module, attr) in STAGE_MODULES.items():
        recipe = parse_recipe(f"[{stage}]\n" + ("[prune]\n" if stage == "quantize" else ""), "r.toml") \
            if stage == "quantize" else parse_recipe(f"[{stage}]\n", "r.toml")
        present = importlib.util.find_spec(module) is not None and hasattr(importlib.import_module(module), attr)
        if present:
            check_runnable(recipe)
            continue
        with pytest.raises(TesseraError, match=rf"stage \[{stage}\] needs {module}\.{attr}"):
            check_runnable(recipe)


# ---------------------------------------------------------------------------- the run
def test_run_then_resume_skips_reruns_changed_and_from_stage(tiny, tmp_path):
    out = tmp_path / "run"
    r = cli("run", tiny, "--out", out, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ran"] == ["parent", "prune", "distill", "export", "evaluate", "bench", "cost", "report"]
    assert summary["child"] == str(out / "distill") and Path(summary["report"]).is_file()
    m = Manifest.load(out)
    for name, rec in m.stages.items():
        assert rec.status == "done" and rec.wall_s is not None and rec.peak_memory_bytes > 0, name
        assert rec.outputs["hash"] == hash_path(out / name), name
    assert m.stages["distill"].tokens == 3840 and m.stages["distill"].inputs["prune"] == m.stages["prune"].outputs["hash"]
    # a second plain run is refused; --resume skips every finished stage
    assert_one_line_error(cli("run", tiny, "--out", out, "--device", "cpu"), "--resume")
    again = json.loads(cli("run", tiny, "--out", out, "--device", "cpu", "--json", "--resume").stdout)
    assert again["ran"] == [] and len(again["skipped"]) == 8
    # a changed [evaluate] table reruns evaluate and what reads it (the report), nothing else
    tiny.write_text(tiny.read_text().replace("kld_chunks = 4", "kld_chunks = 3"))
    changed = json.loads(cli("run", tiny, "--out", out, "--device", "cpu", "--json", "--resume").stdout)
    assert changed["ran"] == ["evaluate", "report"]
    assert json.loads((out / "evaluate" / "result.json").read_text())["kld"]["tokens"] == 3 * 16
    weights = hash_path(out / "distill" / "model.safetensors")
    redo = json.loads(cli("run", tiny, "--out", out, "--device", "cpu", "--json", "--from-stage", "distill").stdout)
    assert redo["ran"] == ["distill", "export", "evaluate", "bench", "cost", "report"]
    assert hash_path(out / "distill" / "model.safetensors") == weights  # distillation is deterministic
    assert_one_line_error(cli("run", tiny, "--out", out, "--from-stage", "search"), "not a stage of this recipe")
    rebuilt = cli("report", out)
    assert rebuilt.exit_code == 0 and "report.html" in rebuilt.output


def test_a_second_run_on_a_locked_directory_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        r = cli("run", tiny, "--out", out, "--device", "cpu")
    assert_one_line_error(r, f"another tessera run (pid {os.getpid()})")
    with RunLock(out):  # released: it can be taken again
        pass


def test_missing_parent_and_unwritable_output_are_one_line(tiny, tmp_path):
    assert_one_line_error(cli("run", tiny, "--parent", tmp_path / "nope", "--out", tmp_path / "r1"),
                          "no such file or directory")
    assert not (tmp_path / "r1").exists()
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(cli("run", tiny, "--out", tmp_path / "a-file" / "run"), "cannot create the run directory")


def test_constraints_that_cannot_be_met_leave_a_resumable_run(tiny, tmp_path):
    recipe = tmp_path / "sizing.toml"
    body = f'[recipe]\nparent = "{tiny.parent / "parent"}"\n[cost]\nscenarios = ["128/128"]\nmax_gpus = 2\n'
    recipe.write_text(body + "min_tokens_per_s = 1e15\n")
    out = tmp_path / "run"
    assert_error_line(cli("run", recipe, "--out", out), "stage cost: min_tokens_per_s 1,000,000,000,000,000 cannot be met")
    m = Manifest.load(out)
    assert m.stages["parent"].status == "done" and m.stages["cost"].status == "failed"
    assert "cannot be met" in m.stages["cost"].error and not (out / "cost").exists()
    recipe.write_text(body + "min_tokens_per_s = 1000\n")
    r = json.loads(cli("run", recipe, "--out", out, "--resume", "--json").stdout)
    assert r["skipped"] == ["parent"] and r["ran"] == ["cost", "report"]
    sizing = json.loads((out / "cost" / "result.json").read_text())["sizing"]
    assert sizing["chosen"]["gpus"] == 1 and sizing["chosen"]["meets"]


def test_gpu_sizing_reads_only_a_config(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    config = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "llama-3.1-70b"
    r = cli("run", "gpu-sizing", "--parent", config, "--out", tmp_path / "run")
    # 50k output tok/s is beyond 8 H100s for a 70B model (2048/128): the one line names the best deployment found
    assert_error_line(r, "min_tokens_per_s 50,000 cannot be met on up to 8 h100: the best is")
    out = json.loads((tmp_path / "run" / "parent" / "result.json").read_text())
    assert out["params"] > 60e9 and out["weights_loaded"] is False


def test_search_recipe_runs_puzzle_and_refuses_an_unreachable_speedup(tiny, tmp_path):
    pytest.importorskip("tessera.puzzle.run")
    text = tiny.read_text()
    a, b = text.index("[prune]"), text.index("[distill]")
    search = ('[search]\ntarget_speedup = {s}\ngpu = "h100"\nscenarios = ["128/128"]\nbatch = 8\n'
              'engine = "transformers"\ncalib_samples = 4\nbld_tokens = 512\nscore_samples = 2\nrefine_rounds = 2\n')
    recipe = tmp_path / "search.toml"
    body = text[:a] + "{search}" + text[b:].replace("lr = 5e-3", 'lr = 5e-3\nloss = "kl+cosine"')
    recipe.write_text(body.replace("{search}", search.format(s=50)))
    out = tmp_path / "run"
    # no child of this tiny parent is 50x faster on an H100 (head and per-step overhead stay): refused with the numbers
    assert_error_line(cli("run", recipe, "--out", out, "--device", "cpu"), "stage search: speedup[128/128,e2e] >= 50.000x")
    recipe.write_text(body.replace("{search}", search.format(s=1.1)))
    r = json.loads(cli("run", recipe, "--out", out, "--device", "cpu", "--resume", "--json").stdout)
    assert r["ran"] == ["search", "distill", "export", "evaluate", "bench", "cost", "report"]
    cost = json.loads((out / "cost" / "result.json").read_text())
    assert cost["speedup"]["128/128"] >= 1.1  # the MIP's promise, checked by the cost stage on the saved child
    assert (out / "search" / "search.json").is_file() and (out / "distill" / "model.safetensors").is_file()
    refined = json.loads((out / "search" / "search.json").read_text())
    assert 1 <= len(refined["refine"]) <= 2  # [search] refine_rounds reaches the MIP stage
    assert refined["chosen"] == min(refined["refine"], key=lambda x: x["measured"])["chosen"]


def test_quantize_stage_writes_a_compressed_tensors_child_that_is_evaluated(tiny, tmp_path):
    pytest.importorskip("tessera.quantize.calibrate")
    text = tiny.read_text()
    a, b = text.index("[distill]"), text.index("[evaluate]")
    recipe = tmp_path / "quant.toml"
    recipe.write_text(text[:a] + '[quantize]\nscheme = "fp8-dynamic"\n' + text[b:])
    out = tmp_path / "run"
    r = json.loads(cli("run", recipe, "--out", out, "--device", "cpu", "--json").stdout)
    # the recipe's [distill] and [export] sections were replaced by [quantize]: no GGUF stage
    assert r["ran"] == ["parent", "prune", "quantize", "evaluate", "bench", "cost", "report"]
    assert r["child"] == str(out / "quantize")
    config = json.loads((out / "quantize" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    from tessera.quantize import quant_layers

    assert quant_layers(tessera.load(out / "quantize"))  # loads back quantized
    ev = json.loads((out / "evaluate" / "result.json").read_text())
    assert ev["kld"]["kld"] > 0 and ev["preserved"]["rows"]
