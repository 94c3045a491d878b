"""The run report: what it says (markdown) and that a real browser shows it whole (headless Chromium)."""

from __future__ import annotations

import json

import pytest

from browser import check_page, find_browser
from helpers import cli
from test_pipeline import make_fixture


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    mp = pytest.MonkeyPatch()
    mp.setenv("TESSERA_HOME", str(root / "home"))
    recipe = make_fixture(root / "fx")
    text = recipe.read_text()
    a, b = text.index("[distill]"), text.index("[export]")
    recipe.write_text(text[:a] + text[b:])  # prune -> export -> evaluate -> bench -> cost -> report: every section
    r = cli("run", recipe, "--out", root / "run", "--device", "cpu")
    mp.undo()
    assert r.exit_code == 0, r.output
    return root / "run"


def test_report_markdown_has_every_section(run_dir):
    md = (run_dir / "report" / "report.md").read_text()
    data = json.loads((run_dir / "report" / "report.json").read_text())
    for needle in ("## Size: child against parent", "KV cache per token", "## Child architecture, per layer",
                   "## Accuracy preserved", " ± ", "KL(parent ‖ child)", "perplexity, child",
                   "## Measured throughput here", "## Predicted on one h100", "## Stages", "vllm serve",
                   "llama-server -m", "## Reproduce", "--budget standard",
                   "![architecture](architecture.png)", "![frontier](frontier.png)"):
        assert needle in md, needle
    ev = data["evaluate"]
    row = ev["preserved"]["rows"][0]
    assert f"{100 * row['child']:.2f} ± {100 * ev['child'][row['task']]['acc_norm_stderr']:.2f}" in md
    assert f"{100 * row['diff']:+.2f} ± {100 * row['diff_stderr']:.2f}" in md and "samples" not in ev["child"][row["task"]]
    assert data["child"]["params"] < data["parent"]["params"]
    assert [s["stage"] for s in data["stages"]] == ["parent", "prune", "export", "evaluate", "bench", "cost", "report"]
    # the tiny word-level tokenizer has no GGUF form: the export stage records why and the report says so
    assert "llamacpp cannot serve this child as is: no GGUF: the tokenizer is WordLevel" in md
    html = (run_dir / "report" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 2 and "<script" not in html
    assert "src=\"architecture.png\"" not in html  # self-contained: nothing to fetch beside it


def test_report_rebuilds_the_same(run_dir):
    before = json.loads((run_dir / "report" / "report.json").read_text())
    r = cli("report", run_dir, "--json")
    assert r.exit_code == 0, r.output
    after = json.loads((run_dir / "report" / "report.json").read_text())
    assert after["stages"][-1]["status"] == "done"  # rebuilt after the run: the report stage is now recorded
    before.pop("stages"), after.pop("stages")
    assert before == after


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    if find_browser() is None:
        pytest.skip("no Chromium here (apt-get install chromium): the browser check needs a real browser")
    page = check_page(run_dir / "report" / "report.html")
    assert page["title"].startswith("tessera run: tiny") and page["text_len"] > 1000
    assert len(page["images"]) == 2
    assert all(img["complete"] and img["width"] > 100 for img in page["images"]), page["images"]
    assert page["errors"] == []
    # the checker sees what it claims to: a broken image and a console error on another page
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                   '<img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    broken = check_page(bad)
    assert broken["images"][0]["width"] == 0 and broken["errors"] == ["boom"]
