"""Tests that need the shared data or the real parent skip on a laptop without them, but fail under CI=true."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import skip_or_fail


def test_skip_or_fail(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("no data")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        skip_or_fail("no data")


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_missing_shared_data_fails_in_ci(ci, outcome, tmp_path):
    tests = Path(__file__).parent
    env = os.environ | {"CI": ci, "TESSERA_SHARED": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{tests / 'test_evaluate.py'}::test_real_tasks_load_and_score"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tests.parent)
    assert outcome in proc.stdout and (proc.returncode != 0) == bool(ci), proc.stdout[-2000:]
