"""The benchmark scripts' own checks: the GPU check scripts fail (exit status 1) on a mismatch instead of only
printing it; `quantization.py --only` selects whole row labels."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_check import Checks, require_cuda  # noqa: E402


def test_a_failed_check_exits_nonzero(capsys):
    checks = Checks()
    assert checks.expect(True, "logits agree")
    checks.finish()  # all passed: returns
    assert not checks.expect(False, "cached == uncached: False")
    with pytest.raises(SystemExit) as info:
        checks.finish()
    assert info.value.code == 1
    out = capsys.readouterr()
    assert "logits agree  (ok)" in out.out and "(MISMATCH)" in out.out and "1 check(s) failed" in out.err


def test_without_cuda_the_checks_refuse_to_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        require_cuda()
    assert info.value.code == 2


def test_quantization_only_takes_labels_that_hold_commas():
    """`benchmarks/quantization.py --only` selects whole row labels, commas and all; an unknown one is refused."""
    from quantization import select_rows

    assert select_rows(None) is None
    assert select_rows(["fp8 (static, per-tensor)"]) == {"fp8 (static, per-tensor)"}
    assert select_rows(["nvfp4 mse+gptq", "NVFP4 oneshot"]) == {"nvfp4 mse+gptq", "NVFP4 oneshot"}
    with pytest.raises(SystemExit) as info:
        select_rows(["fp8 (static"])  # what splitting the label on its comma used to ask for
    assert "unknown --only row 'fp8 (static'" in str(info.value.code)
    assert "'fp8 (static, per-tensor)'" in str(info.value.code)


def _puzzle_args(out, src, **over):
    import argparse

    args = dict(gkd_tokens=131072, gkd_dtype="bf16", lr=2e-4, batch=8, limit=500, seq_len=256, report_samples=8,
                scenario="32/32", batches=[1, 8], reps=3, calib_samples=64, gkd_data="corpus", gkd_loss="auto",
                speedups=[1.25, 1.5], out=out, baselines_from=src)
    args.update(over)
    return argparse.Namespace(**args)


def test_puzzle_reuses_only_the_baselines_of_a_run_with_the_same_settings(tmp_path):
    """`benchmarks/puzzle.py --baselines-from`: the parent accuracy, the Minitron / ShortGPT rows of the asked
    speed-ups, the cost table and those rows' timings come over; Puzzle rows never do; other settings, or baselines
    healed with another loss than this run's --gkd-loss gives them, are refused."""
    import json

    from puzzle import _write, seed_baselines

    src, out = tmp_path / "old", tmp_path / "new"
    src.mkdir(), out.mkdir()
    old = _puzzle_args(src, None, speedups=[1.25, 1.5, 2.0])
    auto = {"puzzle": "kl+cosine-layers", "minitron": "kl+cosine-layers", "shortgpt": "kl+cosine"}
    rows = [{"target": s, "method": m, "path": f"{src}/{m}-{s}", "gkd": {"loss": auto[m]}} for s in (1.25, 1.5, 2.0)
            for m in ("puzzle", "minitron", "shortgpt")]
    _write(old, {"rows": rows, "parent": {"accuracy": {"average": 0.4}}})
    (src / "costs.json").write_text('{"costs": 1}')
    (src / "measure.json").write_text(json.dumps({r["path"]: {"measured": r["path"]} for r in rows}))

    with pytest.raises(SystemExit, match="its gkd_tokens, limit, gkd_data differ"):
        seed_baselines(_puzzle_args(out, src, gkd_tokens=16384, limit=200, gkd_data="mix"))
    assert not (out / "results.json").exists()
    with pytest.raises(SystemExit, match=r"its minitron \(kl\+cosine-layers\) children were healed with another loss"):
        seed_baselines(_puzzle_args(out, src, gkd_loss="kl+cosine"))  # ShortGPT's were: that alone would pass
    with pytest.raises(SystemExit, match=r"minitron \(kl\+cosine-layers\), shortgpt \(kl\+cosine\) children"):
        seed_baselines(_puzzle_args(out, src, gkd_loss="kl"))
    assert not (out / "results.json").exists()
    seed_baselines(_puzzle_args(out, src))
    got = json.loads((out / "results.json").read_text())
    assert got["parent"]["accuracy"]["average"] == 0.4 and got["baselines_from"] == str(src)
    assert sorted((r["method"], r["target"]) for r in got["rows"]) == [
        ("minitron", 1.25), ("minitron", 1.5), ("shortgpt", 1.25), ("shortgpt", 1.5)]
    assert (out / "costs.json").read_text() == '{"costs": 1}'
    assert set(json.loads((out / "measure.json").read_text())) == {r["path"] for r in got["rows"]}


def test_puzzle_compares_children_item_by_item():
    """`benchmarks/puzzle.py`'s `paired`: Puzzle minus a baseline per reporting chunk and per task item; the average's
    difference is the mean of the task differences; rows from before per-item outcomes were kept are not paired."""
    from puzzle import paired

    def row(kld, tasks):
        return {"kld_per_chunk": kld, "accuracy": {"tasks": {t: {"samples": s} for t, s in tasks.items()}}}

    a = row([0.5, 0.6, 0.7], {"x": [1, 1, 0, 1], "y": [0, 1, 1, 1]})
    b = row([0.6, 0.8, 0.7], {"x": [1, 0, 0, 1], "y": [0, 1, 1, 1]})
    d = paired(a, b)
    assert d["kld"][0] == pytest.approx(-0.1) and d["kld"][1] > 0
    assert d["tasks"]["x"][0] == pytest.approx(0.25) and d["tasks"]["y"] == (0.0, 0.0)
    assert d["average"][0] == pytest.approx(0.125) and d["average"][1] == pytest.approx(d["tasks"]["x"][1] / 2)
    old = {"accuracy": {"tasks": {"x": {"acc": 0.5}, "y": {"acc": 0.5}}}}
    assert paired(a, old) == {}
