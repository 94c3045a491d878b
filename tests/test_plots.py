import json

from helpers import mixed_arch, tiny_arch
from tessera.formats import config_json
from tessera.plots import pareto_front, plot_architecture, plot_frontier


def test_pareto_front():
    pts = [{"name": "p", "throughput": 1, "quality": 100}, {"name": "a", "throughput": 2, "quality": 95},
           {"name": "b", "throughput": 1.5, "quality": 90}, {"name": "c", "throughput": 3, "quality": 80}]
    assert [p["name"] for p in pareto_front(pts)] == ["p", "a", "c"]


def test_plots_write_png(tmp_path):
    a = plot_architecture(mixed_arch(), tmp_path / "arch.png", parent=tiny_arch())
    f = plot_frontier([{"name": "parent", "throughput": 10, "quality": 100, "kind": "parent"},
                       {"name": "child", "throughput": 20, "quality": 97}], tmp_path / "front.png")
    for path in (a, f):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.png", "front.png"]  # no temp files left


def test_plot_cli(tmp_path):
    from typer.testing import CliRunner

    from tessera.cli import app

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(config_json(mixed_arch()))
    res = CliRunner().invoke(app, ["plot", "arch", str(tmp_path / "m"), "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 0 and (tmp_path / "a.png").is_file()
    (tmp_path / "pts.json").write_text(json.dumps([{"name": "x", "throughput": 1}]))
    res = CliRunner().invoke(app, ["plot", "frontier", str(tmp_path / "pts.json")])
    assert res.exit_code == 2 and "expected a JSON list" in res.output
    res = CliRunner().invoke(app, ["plot", "arch", str(tmp_path / "m"), "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 2 and "pass --force" in res.output  # an existing output is kept
    res = CliRunner().invoke(app, ["plot", "arch", str(tmp_path / "m"), "--out", str(tmp_path / "a.png"), "--force"])
    assert res.exit_code == 0
    (tmp_path / "pts.json").write_text(json.dumps({"name": "x", "throughput": 1, "quality": 2}))  # not a list
    res = CliRunner().invoke(app, ["plot", "frontier", str(tmp_path / "pts.json"), "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 2 and "expected a JSON list" in res.output and not (tmp_path / "f.png").exists()
