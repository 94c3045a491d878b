import json

import pytest

from helpers import mixed_arch, random_model, tiny_arch
from tessera.bench import bench, run_once
from tessera.cost import Scenario


@pytest.mark.parametrize("arch", [tiny_arch(), mixed_arch()], ids=["llama", "mixed"])
def test_bench_runs_real_decode_steps(arch):
    model = random_model(arch)
    calls = []
    orig = model.decode_step

    def counting(token, impl=None):
        calls.append(token.shape)
        return orig(token)

    model.decode_step = counting
    pre, dec = run_once(model, 3, Scenario(10, 7))
    assert pre > 0 and dec > 0 and calls == [(3, 1)] * 7
    assert model.cache is None  # released after the run
    results = bench(model, [Scenario(8, 4), Scenario(16, 2)], [1, 2], reps=2)
    assert [(r.scenario, r.batch) for r in results] == [("8/4", 1), ("8/4", 2), ("16/2", 1), ("16/2", 2)]
    for r in results:
        assert r.decode_spread[0] <= r.decode_tok_s <= r.decode_spread[1] and r.e2e_tok_s < r.decode_tok_s


def test_bench_cli_json_on_saved_model(tmp_path):
    from typer.testing import CliRunner

    from tessera.checkpoint import save
    from tessera.cli import app

    save(random_model(mixed_arch()), tmp_path / "m")
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "m"), "--scenarios", "6/3,4/2", "--batch-sizes", "1,2",
                                   "--reps", "1", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["scenario"], r["batch"]) for r in rows] == [("6/3", 1), ("6/3", 2), ("4/2", 1), ("4/2", 2)]
    assert all(r["decode_tok_s"] > 0 and r["device"] == "cpu" for r in rows)
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "m"), "--batch-sizes", "1,x"])
    assert res.exit_code == 2 and "--batch-sizes must be comma-separated integers" in res.output
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "m"), "--scenarios", "128-128"])
    assert res.exit_code == 2 and "not IN/OUT" in res.output


def test_bench_takes_the_shared_device_and_dtype_vocabulary(tmp_path, monkeypatch):
    """`bench` defaults to `--device auto` like every other compute command (issue 13): the default goes through
    `tessera.devices.resolve_device`, `--dtype bf16` / `float16` are the shared names, a bad device is one line."""
    from typer.testing import CliRunner

    import tessera.devices as devices
    from tessera.checkpoint import save
    from tessera.cli import app

    save(random_model(tiny_arch()), tmp_path / "m")
    asked = []
    resolve = devices.resolve_device
    monkeypatch.setattr(devices, "resolve_device", lambda name=None: asked.append(name) or resolve("cpu"))
    run = lambda *a: CliRunner().invoke(app, ["bench", str(tmp_path / "m"), "--scenarios", "4/2", "--reps", "1",
                                              "--json", *a])
    res = run()
    assert res.exit_code == 0, res.output
    assert asked[0] == "auto" and json.loads(res.output)[0]["device"] == "cpu"
    for name in ("bf16", "float16"):
        res = run("--dtype", name)
        assert res.exit_code == 0, res.output
    monkeypatch.setattr(devices, "resolve_device", resolve)
    res = run("--device", "tpu")
    assert res.exit_code == 2 and res.output.startswith("error:") and len(res.output.strip().splitlines()) == 1
