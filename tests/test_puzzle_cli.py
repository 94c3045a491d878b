"""Puzzle from the command line: `tessera puzzle library|bld|score|mip|assemble` chained through their directories,
`tessera search` end to end with resume, and one clear line (nothing half-written) for each kind of bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch

import tessera
from helpers import assert_one_line_error, cli, random_model, tiny_arch, tiny_tokenizer
from tessera.errors import TesseraError
from tessera.puzzle.costs import Target
from tessera.puzzle.run import STAGE_FILE, SearchConfig, constraints_from, run_search

SMALL = ["--seq-len", "16"]


@pytest.fixture
def parent_dir(tmp_path):
    m = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64))
    m.tokenizer = tiny_tokenizer()
    return tessera.save(m, tmp_path / "parent")


@pytest.fixture
def data_file(tmp_path):
    rng = random.Random(0)
    lines = [" ".join(f"w{rng.randrange(60)}" for _ in range(12)) for _ in range(1200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(data_file, **kw):
    base = dict(constraints=constraints_from(1.1, phase="decode"), target=Target("h100", "bf16", "64/64"),
                costs="predicted", data=str(data_file), seq_len=16, calib_samples=8, bld_tokens=8 * 16, bld_batch=4,
                score_samples=4, gkd_tokens=4 * 16 * 2, gkd_batch=4, report_samples=4)
    base.update(kw)
    return SearchConfig(**base)


def _inspect_matches(child_dir, chosen):
    result = cli("inspect", child_dir, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["layers"]
    assert len(rows) == len(chosen)
    for row, c in zip(rows, chosen):
        a, f = tessera.puzzle.library.Variant.from_key(c["attention"]), tessera.puzzle.library.Variant.from_key(c["ffn"])
        assert (row["attention"], row["kv_heads"]) == (a.kind, a.spec.num_kv_heads or 0)
        assert (row["ffn"], row["ffn_width"]) == (f.kind, f.spec.intermediate_size or 0)


def test_stage_commands_chain_through_their_directories(parent_dir, data_file, tmp_path):
    lib, scores, mip, child = tmp_path / "lib", tmp_path / "scores", tmp_path / "mip", tmp_path / "child"
    d = ["--data", data_file, *SMALL]
    r = cli("puzzle", "library", parent_dir, "--out", lib, "--ffn-fractions", "0.5,0.25", "--ffn-multiple", "8",
            "--samples", "8", *d, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ffn_variants"] == 5 * 4  # per layer: the parent's 64, 32, 16, linear, no_op
    r = cli("puzzle", "bld", lib, "--tokens", "1024", "--batch", "4", "--lr", "3e-3", *d, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["variants"] > 0 and out["mean_nmse_final"] < out["mean_nmse_init"]
    r = cli("puzzle", "score", lib, "--out", scores, "--samples", "4", *d, "--heatmap", tmp_path / "h.png")
    assert r.exit_code == 0, r.output
    assert (scores / STAGE_FILE).is_file() and (tmp_path / "h.png").is_file()
    r = cli("puzzle", "mip", scores, "--out", mip, "--target-speedup", "1.1", "--phase", "decode", "--gpu", "h100",
            "--scenario", "64/64", "--json")
    assert r.exit_code == 0, r.output
    chosen = json.loads(r.output)["chosen"]
    # refined: the children measured on the scores' own tokens (rebuilt from the scores' settings), the closest kept
    r = cli("puzzle", "mip", scores, "--out", tmp_path / "mip_refined", "--target-speedup", "1.1", "--phase", "decode",
            "--gpu", "h100", "--scenario", "64/64", "--refine-rounds", "3", "--json")
    assert r.exit_code == 0, r.output
    refined = json.loads((tmp_path / "mip_refined" / "mip.json").read_text())
    rounds = refined["refine"]
    assert 1 <= len(rounds) <= 3 and rounds[0]["chosen"] == chosen  # round 0 is the plain MIP's choice
    best = min(rounds, key=lambda x: x["measured"])
    assert refined["chosen"] == best["chosen"] == json.loads(r.output)["chosen"] and best["measured"] > 0
    assert all(v >= 1.1 - 1e-9 for v in refined["constraint_values"].values())  # the target still met
    assert_one_line_error(cli("puzzle", "mip", scores, "--out", tmp_path / "m3", "--target-speedup", "1.1", "--gpu",
                              "h100", "--refine-rounds", "2", "--num-solutions", "2"), "one solution")
    assert not (tmp_path / "m3").exists()
    r = cli("puzzle", "assemble", mip, "--out", child, "--gkd-tokens", "128", "--batch", "4", "--report-samples", "4",
            *d, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["gkd_tokens"] == 128 and summary["kld"] < summary["kld_assembled"]
    _inspect_matches(child, chosen)
    saved = json.loads((child / "search.json").read_text())
    assert saved["chosen"] == chosen and saved["constraints"][0]["kind"] == "speedup"
    assert saved["report"]["data"]["split"] == "reporting" and saved["gkd"]["loss"] == "kl+cosine-layers"
    assert saved["gkd"]["dtype"] == "fp32"  # the CPU's default, recorded
    # every stage refuses to overwrite without --force, in one line
    assert_one_line_error(cli("puzzle", "library", parent_dir, "--out", lib, *d), "already exists")
    assert_one_line_error(cli("puzzle", "bld", lib, *d), "already complete")
    assert_one_line_error(cli("puzzle", "score", lib, "--out", scores, *d), "already exists")
    assert_one_line_error(cli("puzzle", "mip", scores, "--out", mip, "--target-speedup", "1.1", "--gpu", "h100"),
                          "already exists")
    assert_one_line_error(cli("puzzle", "assemble", mip, "--out", child, *d), "already exists")


def test_search_runs_every_stage_then_resumes_a_killed_run(parent_dir, data_file, tmp_path, monkeypatch):
    import tessera.puzzle.run as run

    out = tmp_path / "search"
    cfg = _cfg(data_file)
    real = run.stage_assemble

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "stage_assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        run_search(str(parent_dir), cfg, out, progress=False)
    assert {p.name for p in out.iterdir()} == {"library", "scores", "mip"}  # no half-written child
    monkeypatch.setattr(run, "stage_assemble", real)
    result = run_search(str(parent_dir), cfg, out, progress=False)
    assert result.reused == ["library", "bld", "score", "mip"] and set(result.seconds) == {"assemble"}
    _inspect_matches(result.child, result.record["chosen"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(result.child))
    ids = torch.randint(4, 60, (1, 8))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, tessera.load(result.child)(ids), atol=1e-5)
    # everything complete: a rerun reuses it all; other settings are refused, --force redoes them
    again = run_search(str(parent_dir), cfg, out, progress=False)
    assert again.reused == ["library", "bld", "score", "mip", "assemble"]
    with pytest.raises(TesseraError, match="made with other settings .*constraints"):
        run_search(str(parent_dir), _cfg(data_file, constraints=constraints_from(1.6, phase="decode")), out,
                   progress=False)
    with pytest.raises(TesseraError, match="made with other settings .*refine_rounds"):
        run_search(str(parent_dir), _cfg(data_file, refine_rounds=2), out, progress=False)
    refined = run_search(str(parent_dir), _cfg(data_file, refine_rounds=2, gkd_tokens=0), tmp_path / "refined",
                         progress=False)
    rounds = refined.record["refine"]  # the MIP stage's rounds, carried into the child's search.json
    assert rounds[0]["chosen"] == result.record["chosen"]  # the same library, BLD and scores: the same first choice
    assert refined.record["chosen"] == min(rounds, key=lambda x: x["measured"])["chosen"]


def test_search_cli_prints_one_summary_and_serves_the_engine(parent_dir, data_file, tmp_path):
    r = cli("search", parent_dir, "--out", tmp_path / "s", "--target-speedup", "1.1", "--phase", "decode", "--gpu",
            "h100", "--scenario", "64/64", "--bld-tokens", "64", "--gkd-tokens", "64", "--calib-samples", "8",
            "--score-samples", "4", "--ffn-fractions", "0.5", "--engine", "llamacpp", "--data", data_file, *SMALL,
            "--gkd-dtype", "bf16", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["constraint_values"] and set(summary["seconds"]) == {"library", "bld", "score", "mip", "assemble"}
    assert summary["predicted"]["speedup[64/64,decode]"] >= 1.1
    record = json.loads((tmp_path / "s" / "child" / "search.json").read_text())
    assert record["gkd"]["dtype"] == "bf16"
    chosen = record["chosen"]
    assert any(c["ffn"] != "ffn.swiglu-64" or c["attention"] != "attn.gqa-kv2" for c in chosen)  # a real search
    assert all(c["ffn"] != "ffn.linear" for c in chosen)  # llama.cpp has no linear FFN
    assert all(c["ffn"] != "ffn.no_op" or c["attention"] == "attn.no_op" for c in chosen)  # nor attention alone
    result = cli("inspect", tmp_path / "s" / "child", "--json")
    assert result.exit_code == 0


# ---------------------------------------------------------------------------- bad input: one line, nothing written
def _scores(parent_dir, data_file, tmp_path):
    lib, scores = tmp_path / "lib", tmp_path / "scores"
    d = ["--data", data_file, *SMALL]
    assert cli("puzzle", "library", parent_dir, "--out", lib, "--ffn-fractions", "0.5", "--samples", "8", *d).exit_code == 0
    assert cli("puzzle", "score", lib, "--out", scores, "--samples", "4", *d).exit_code == 0
    return lib, scores


def test_unknown_gkd_dtype_is_refused_before_any_stage(parent_dir, data_file, tmp_path):
    r = cli("search", parent_dir, "--out", tmp_path / "s", "--target-speedup", "1.1", "--gkd-dtype", "int4",
            "--data", data_file, *SMALL)
    assert_one_line_error(r, "unknown dtype 'int4'")
    assert not (tmp_path / "s").exists()


def test_target_faster_than_the_all_no_op_model_is_refused(parent_dir, data_file, tmp_path):
    _, scores = _scores(parent_dir, data_file, tmp_path)
    r = cli("puzzle", "mip", scores, "--out", tmp_path / "mip", "--target-speedup", "1000", "--gpu", "h100")
    assert_one_line_error(r, "out of reach for any child")
    assert not (tmp_path / "mip").exists()


def test_library_of_a_different_parent_is_refused(parent_dir, data_file, tmp_path):
    out = tmp_path / "search"
    d = ["--data", data_file, *SMALL]
    r = cli("puzzle", "library", parent_dir, "--out", out / "library", "--ffn-fractions", "0.5", "--samples", "8", *d)
    assert r.exit_code == 0, r.output
    other = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64), seed=7)
    other.tokenizer = tiny_tokenizer()
    other_dir = tessera.save(other, tmp_path / "other")
    assert_one_line_error(cli("puzzle", "bld", out / "library", "--parent", other_dir, *d),
                          "library built from a different parent")
    assert not (out / "library" / "bld").exists()
    r = cli("search", other_dir, "--out", out, "--target-speedup", "1.1", "--gpu", "h100", "--ffn-fractions", "0.5",
            "--calib-samples", "8", *d)
    assert_one_line_error(r, "library built from a different parent")
    assert sorted(p.name for p in out.iterdir()) == ["library"]


def test_variant_list_that_does_not_fit_the_parent_is_refused(parent_dir, data_file, tmp_path):
    r = cli("puzzle", "library", parent_dir, "--out", tmp_path / "lib", "--kv-heads", "3", "--data", data_file, *SMALL)
    assert_one_line_error(r, "3")
    assert not (tmp_path / "lib").exists()
    r = cli("puzzle", "library", parent_dir, "--out", tmp_path / "lib", "--ffn-fractions", "1.5", "--data", data_file)
    assert_one_line_error(r, "must be in (0, 1]")
    assert not (tmp_path / "lib").exists()


def test_interrupted_stage_directories_are_refused(parent_dir, data_file, tmp_path):
    lib, scores = _scores(parent_dir, data_file, tmp_path)
    (scores / STAGE_FILE).unlink()  # as a killed scoring run leaves it
    r = cli("puzzle", "mip", scores, "--out", tmp_path / "mip", "--target-speedup", "1.1", "--gpu", "h100")
    assert_one_line_error(r, "an interrupted score stage")
    assert not (tmp_path / "mip").exists()
    (lib / STAGE_FILE).unlink()
    assert_one_line_error(cli("puzzle", "bld", lib, "--data", data_file, *SMALL), "an interrupted library stage")


def test_bld_interrupted_is_refused_by_scoring(parent_dir, data_file, tmp_path):
    lib, _ = _scores(parent_dir, data_file, tmp_path)
    (lib / "bld").mkdir()
    (lib / "bld" / "run.json").write_text("{}")  # a BLD run that never finished
    r = cli("puzzle", "score", lib, "--out", tmp_path / "s2", "--data", data_file, *SMALL)
    assert_one_line_error(r, "interrupted BLD run")
    assert not (tmp_path / "s2").exists()


def test_overlapping_calibration_and_scoring_data_are_refused(parent_dir, data_file, tmp_path):
    lib, _ = _scores(parent_dir, data_file, tmp_path)
    r = cli("puzzle", "score", lib, "--out", tmp_path / "s2", "--split", "all", "--samples", "4", "--data", data_file,
            *SMALL)
    assert_one_line_error(r, "overlap")
    assert not (tmp_path / "s2").exists()


def test_score_on_the_answers_of_task_items(parent_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_BENCH_DIR", str(tmp_path))
    task = tmp_path / "qa.jsonl"
    task.write_text("".join(json.dumps({"context": f"w{k} w{k + 1} w{k + 2}", "choices": [" w7 w8", " w9"],
                                        "gold": k % 2}) + "\n" for k in range(12)))
    lib, scores = tmp_path / "lib", tmp_path / "scores"
    d = ["--data", data_file, *SMALL]
    assert cli("puzzle", "library", parent_dir, "--out", lib, "--ffn-fractions", "0.5", "--samples", "8", *d).exit_code == 0
    r = cli("puzzle", "score", lib, "--out", scores, "--tasks", f"{task}:2-10", *d, "--json")
    assert r.exit_code == 0, r.output
    stage = json.loads((scores / STAGE_FILE).read_text())
    assert stage["data"]["split"] == "answers" and stage["settings"]["score_tasks"] == [f"{task}:2-10"]
    assert json.loads(r.output)["tokens"] == stage["data"]["positions"] == 4 * 2 + 4 * 1  # " w7 w8" x4, " w9" x4
    assert_one_line_error(cli("puzzle", "score", lib, "--out", tmp_path / "s2", "--tasks", "qa:5", *d),
                          "write TASK:START-STOP")
    assert not (tmp_path / "s2").exists()


def test_refinement_refuses_scores_whose_tokens_cannot_be_rebuilt(parent_dir, data_file, tmp_path):
    """The MIP stage measures refined children on the scores' own tokens, rebuilt from their settings: if the text
    changed since scoring, one line says so (and nothing is written)."""
    from tessera.puzzle.run import scores_data, stage_library, stage_mip, stage_score

    cfg = _cfg(data_file, bld_tokens=0, refine_rounds=2)
    parent = tessera.load(parent_dir)
    library = stage_library(parent, str(parent_dir), cfg, tmp_path / "lib")
    stage_score(library, parent, cfg, tmp_path / "scores", progress=False)
    assert scores_data(tmp_path / "scores", parent).record() == json.loads(
        (tmp_path / "scores" / STAGE_FILE).read_text())["data"]
    data_file.write_text(data_file.read_text().replace("w1", "w2"))
    with pytest.raises(TesseraError, match="cannot be rebuilt here"):
        stage_mip(tmp_path / "scores", cfg, tmp_path / "mip", parent=parent)
    with pytest.raises(TesseraError, match="cannot be rebuilt here"):  # the library's recorded parent, loaded
        stage_mip(tmp_path / "scores", cfg, tmp_path / "mip")
    assert not (tmp_path / "mip").exists()


def test_a_second_score_table_of_the_same_library_reuses_it(parent_dir, data_file, tmp_path):
    from tessera.puzzle.run import load_scores_stage, stage_library, stage_score

    cfg = _cfg(data_file, bld_tokens=0)
    parent = tessera.load(parent_dir)
    library = stage_library(parent, str(parent_dir), cfg, tmp_path / "lib")
    stage_score(library, parent, cfg, tmp_path / "scores", progress=False)
    table, loaded = load_scores_stage(tmp_path / "scores")
    assert loaded is not library and loaded.path.resolve() == library.path.resolve()
    again, same = load_scores_stage(tmp_path / "scores", library)
    assert same is library and again.kl == table.kl and len(table.kl) > 0
    other = stage_library(parent, str(parent_dir), cfg, tmp_path / "lib2")
    assert load_scores_stage(tmp_path / "scores", other)[1] is not other  # not its library: the scored one is loaded
