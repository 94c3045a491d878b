"""Must hold (issue 18): a run SIGKILLed at random points in several stages and re-run gives the same child
(same weights hash) and the same report numbers as an uninterrupted run, and nothing in the run directory is
ever half-written; a full disk is one line and leaves a run that --resume finishes."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli
from tessera.pipeline.manifest import Manifest, hash_path
from test_pipeline import assert_error_line, make_fixture

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args, env_extra=None, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "TESSERA_HOME": str(home), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tessera.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def assert_consistent(out: Path) -> None:
    """Every stage the manifest calls done is whole (its content hash matches); no file under a final name is
    partial (JSON parses, safetensors headers read); only `.NAME.tmp-PID` leftovers of a dead process may exist."""
    from safetensors import safe_open

    m = Manifest.load(out)
    for name, rec in m.stages.items():
        if rec.status == "done":
            assert rec.outputs["hash"] == hash_path(out / name), name
    for f in out.rglob("*"):
        if not f.is_file() or any(".tmp-" in part or ".old-" in part for part in f.relative_to(out).parts):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    st.get_tensor(key)


def numbers(out: Path) -> dict:
    """The report's numbers that do not depend on timing (accuracy, KLD, perplexity, sizes, predicted speed)."""
    r = json.loads((out / "report" / "report.json").read_text())
    return {"evaluate": r["evaluate"], "cost": r["cost"], "child": r["child"], "parent": r["parent"]}


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path):
    recipe = make_fixture(tmp_path / "fx")
    home = tmp_path / "home"
    ref = tmp_path / "ref"
    assert run_cli("run", recipe, "--out", ref, "--device", "cpu", home=home).returncode == 0
    seed = int(os.environ.get("TESSERA_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    kills = ["prune:importance",  # after the importance checkpoint, before the child is written
             f"distill:+{rng.uniform(1.0, 3.0):.2f}",  # mid-distillation, at a random time
             rng.choice(["evaluate:start", "evaluate:written", "bench:written"]),  # outputs in place, manifest not
             f"report:+{rng.uniform(0.0, 1.0):.2f}"]
    out = tmp_path / "run"
    ckpt_step = None
    for i, point in enumerate(kills):
        args = ["run", recipe, "--out", out, "--device", "cpu"] + (["--resume"] if i else [])
        p = run_cli(*args, env_extra={"TESSERA_PIPELINE_KILL_AT": point}, home=home)
        assert p.returncode in (-9, 0), (seed, point, p.stderr[-2000:])
        assert_consistent(out)
        state = out / "distill.ckpt" / "last" / "state.json"
        if point.startswith("distill") and p.returncode == -9 and state.is_file():
            ckpt_step = json.loads(state.read_text())["step"]
    final = run_cli("run", recipe, "--out", out, "--device", "cpu", "--resume", home=home)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_consistent(out)
    assert not [f for f in out.rglob("*") if ".tmp-" in f.name], "stale temp files survive a resumed run"
    m = Manifest.load(out)
    assert all(rec.status == "done" for rec in m.stages.values())
    if ckpt_step is not None and ckpt_step < 60:  # the killed distillation continued from its checkpoint
        assert m.stages["distill"].resumed_from == ckpt_step, seed
    assert hash_path(out / "distill" / "model.safetensors") == hash_path(ref / "distill" / "model.safetensors"), seed
    assert numbers(out) == numbers(ref), seed


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_full_disk_is_one_line_and_resumable(tmp_path, monkeypatch):
    """A 400 KiB tmpfs fills up during distillation's checkpoints (where mount is not allowed, ENOSPC is
    simulated in the checkpoint writer): one line, every finished stage kept, --resume finishes on more space."""
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    recipe = make_fixture(tmp_path / "fx")
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "400k")
    try:
        if not mounted:
            import tessera.distill

            real = tessera.distill.save_file

            def full(*_a, **_k):
                raise OSError(errno.ENOSPC, "No space left on device", str(disk / "run" / "distill.ckpt"))

            monkeypatch.setattr(tessera.distill, "save_file", full)
        out = disk / "run"
        r = cli("run", recipe, "--out", out, "--device", "cpu")
        assert_error_line(r, "stage distill: no space left on the device")
        m = Manifest.load(out)
        assert [m.stages[s].status for s in ("parent", "prune", "distill")] == ["done", "done", "failed"]
        assert_consistent(out)
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        else:
            monkeypatch.setattr(tessera.distill, "save_file", real)
        r = cli("run", recipe, "--out", out, "--device", "cpu", "--resume")
        assert r.exit_code == 0, r.output
        m = Manifest.load(out)
        assert all(rec.status == "done" for rec in m.stages.values())
        assert m.stages["prune"].attempts == 1  # the finished stage was kept, not redone
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
