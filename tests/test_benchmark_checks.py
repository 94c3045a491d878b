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
