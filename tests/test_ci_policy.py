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


@pytest.mark.slow  # a pytest in a subprocess: ~60 s on the shared machine under load
def test_missing_shared_data_fails_in_ci(tmp_path):
    """The conftest fixture goes through skip_or_fail: under CI=true a test needing absent data errors."""
    tests = Path(__file__).parent
    env = os.environ | {"CI": "true", "TESSERA_SHARED": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{tests / 'test_evaluate.py'}::test_real_tasks_load_and_score"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tests.parent)
    assert "1 error" in proc.stdout and "CI=true" in proc.stdout and proc.returncode == 1, proc.stdout[-2000:]
