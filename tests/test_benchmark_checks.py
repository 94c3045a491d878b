"""The GPU check scripts fail (exit status 1) on a mismatch instead of only printing it."""

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
