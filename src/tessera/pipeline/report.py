"""The run report: `report.md` and a self-contained `report.html` (plots embedded as data URIs, no scripts).

Built from the run directory alone (manifest and stage outputs), so `tessera report RUN_DIR` rebuilds it at any
time. Sections: the child (per-layer architecture, parameters and KV memory against the parent), speed
(measured here per scenario, predicted on the chosen GPU), quality (the accuracy-preserved table with standard
errors, KLD and perplexity on the reporting split), the frontier and architecture plots, each stage's time,
and the commands to serve the child (vLLM; llama.cpp via GGUF) and to reproduce the run. `report.json` holds
the numbers the report shows.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from tessera.io import atomic_dir


def _read(run_dir: Path, stage: str) -> dict | None:
    path = run_dir / stage / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def collect(run_dir: Path, manifest=None) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written as report.json)."""
    from tessera.formats import read_config
    from tessera.pipeline.manifest import Manifest

    run_dir = Path(run_dir)
    manifest = manifest or Manifest.load(run_dir)
    meta = manifest.meta
    parent = _read(run_dir, "parent") or {}
    stages_in_order = meta.get("stages", list(manifest.stages))
    child_stage = None
    for s in stages_in_order:
        if s in ("prune", "search", "distill", "quantize") and (run_dir / s / "config.json").is_file():
            child_stage = s
    child_arch = read_config(run_dir / child_stage) if child_stage else None
    child_rows = child_arch.layer_rows() if child_arch else parent.get("layers", [])
    kv_child = sum(r["kv_bytes_per_token"] for r in child_rows)
    data: dict[str, Any] = {
        "run_dir": str(run_dir), "recipe": manifest.recipe.get("recipe", {}), "budget": meta.get("budget"),
        "source": meta.get("source"), "parent_ref": meta.get("parent"), "child_stage": child_stage,
        "child_dir": str(run_dir / child_stage) if child_stage else None,
        "parent": {"params": parent.get("params"), "non_embedding_params": parent.get("non_embedding_params"),
                   "kv_bytes_per_token": parent.get("kv_bytes_per_token_bf16"), "layers": parent.get("layers", []),
                   "fingerprint": parent.get("fingerprint")},
        "child": {"params": child_arch.num_params() if child_arch else parent.get("params"),
                  "non_embedding_params": child_arch.non_embedding_params() if child_arch else None,
                  "kv_bytes_per_token": kv_child, "layers": child_rows,
                  "homogeneous": child_arch.is_homogeneous if child_arch else True},
        "stages": [{"stage": s, "status": manifest.stages[s].status if s in manifest.stages else "pending",
                    "wall_s": manifest.stages[s].wall_s if s in manifest.stages else None,
                    "tokens": manifest.stages[s].tokens if s in manifest.stages else None,
                    "peak_memory_bytes": manifest.stages[s].peak_memory_bytes if s in manifest.stages else None,
                    "resumed_from": manifest.stages[s].resumed_from if s in manifest.stages else None}
                   for s in stages_in_order],
        "evaluate": _read(run_dir, "evaluate"), "bench": _read(run_dir, "bench"), "cost": _read(run_dir, "cost"),
    }
    data["serve"] = serve_commands(data, child_arch)
    data["reproduce"] = (f"tessera run {meta.get('source')} --parent {meta.get('parent')} --budget {meta.get('budget')} "
                         f"--out {run_dir}")
    return data


def serve_commands(data: dict, child_arch) -> dict[str, Any]:
    """vLLM and llama.cpp commands for the child, with what each engine cannot serve (tessera.formats.engines)."""
    from tessera.formats.engines import incompatibilities

    child = data["child_dir"]
    if child is None:
        return {}
    name = Path(data["run_dir"]).name
    vllm = f"vllm serve {child} --served-model-name {name}"
    if child_arch is not None and not child_arch.is_homogeneous:
        vllm += " --trust-remote-code"  # nemotron-nas: the checkpoint carries its configuration_decilm.py
    export = _read(Path(data["run_dir"]), "export")
    if export and export.get("gguf"):
        gguf = Path(data["run_dir"]) / "export" / export["gguf"]
        llama = [f"llama-server -m {gguf} --port 8080   # {export['architecture']}, {export['outtype']}"]
    else:
        gguf = f"{child}.gguf"
        llama = [f"tessera export {child} --format gguf --outtype f16 --out {gguf}",
                 f"llama-server -m {gguf} --port 8080"]
    notes = {e: [str(i) for i in incompatibilities(child_arch, e)] for e in ("vllm", "llamacpp")} if child_arch else {}
    if export and not export.get("gguf"):
        notes["llamacpp"] = [*notes.get("llamacpp", []), *export.get("llamacpp_problems", [])]
    return {"vllm": vllm, "llamacpp": llama, "incompatible": notes}


# ---------------------------------------------------------------------------- plots
def make_plots(data: dict, out_dir: Path) -> dict[str, Path]:
    from tessera.formats import read_config
    from tessera.plots import plot_architecture, plot_frontier

    plots: dict[str, Path] = {}
    if data["child_dir"]:
        child_arch = read_config(Path(data["child_dir"]))
        parent_cfg = Path(data["run_dir"]) / "parent"
        parent_arch = read_config(parent_cfg) if (parent_cfg / "config.json").is_file() else None
        plots["architecture"] = plot_architecture(child_arch, out_dir / "architecture.png", parent=parent_arch,
                                                  title=f"child: {child_arch.num_layers} layers, "
                                                        f"{child_arch.num_params() / 1e6:.2f} M parameters")
    points = frontier_points(data)
    if points:
        plots["frontier"] = plot_frontier(points, out_dir / "frontier.png",
                                          throughput_label=points[0]["label"], title="throughput vs accuracy preserved")
    return plots


def frontier_points(data: dict) -> list[dict]:
    ev, bench, cost = data["evaluate"], data["bench"], data["cost"]
    quality = {"parent": 100.0, "child": None}
    if ev and ev["preserved"]["average"]:
        quality["child"] = 100 * ev["preserved"]["average"]["preserved"]
    elif ev is None:
        return []
    if bench:
        tp = {k: bench[k][0]["e2e_tok_s"] for k in ("parent", "child")}
        label = f"measured here: output tokens/s ({bench['parent'][0]['scenario']}, batch {bench['parent'][0]['batch']})"
    elif cost:
        s = next(iter(cost["predicted"]["parent"]))
        tp = {k: cost["predicted"][k][s]["output_tokens_per_s"] for k in ("parent", "child")}
        label = f"predicted on {cost['gpu']}: output tokens/s ({s})"
    else:
        return []
    return [{"name": k, "throughput": tp[k], "quality": quality[k], "kind": k, "label": label}
            for k in ("parent", "child") if quality[k] is not None]


# ---------------------------------------------------------------------------- markdown and HTML
def _tables(data: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table of the report, shared by the markdown and the HTML."""
    from tessera.evaluate.table import paired_cell

    out = []
    p, c = data["parent"], data["child"]
    if p.get("params") is not None:
        rows = [["parameters", f"{p['params']:,}", f"{c['params']:,}", f"{c['params'] / p['params']:.1%}"]]
        if p.get("non_embedding_params") and c.get("non_embedding_params"):
            rows.append(["non-embedding parameters", f"{p['non_embedding_params']:,}", f"{c['non_embedding_params']:,}",
                         f"{c['non_embedding_params'] / p['non_embedding_params']:.1%}"])
        if p.get("kv_bytes_per_token"):
            rows.append(["KV cache per token (bf16)", f"{p['kv_bytes_per_token']:,.0f} B",
                         f"{c['kv_bytes_per_token']:,.0f} B", f"{c['kv_bytes_per_token'] / p['kv_bytes_per_token']:.1%}"])
            rows.append(["KV cache, 4096 tokens", _mib(4096 * p["kv_bytes_per_token"]),
                         _mib(4096 * c["kv_bytes_per_token"]), ""])
        out.append(("Size: child against parent", ["", "parent", "child", "child / parent"], rows, ""))
    layer_rows = [[str(r["layer"]), r["attention"], str(r["kv_heads"]), r["ffn"], str(r["ffn_width"]), f"{r['params']:,}",
                   f"{r['kv_bytes_per_token']:,.0f}"] for r in c["layers"]]
    parent_layer = p["layers"][0] if p.get("layers") else None
    note = (f"parent: {len(p['layers'])} layers of GQA with {parent_layer['kv_heads']} KV heads and SwiGLU width "
            f"{parent_layer['ffn_width']}" if parent_layer else "")
    out.append(("Child architecture, per layer", ["layer", "attention", "KV heads", "FFN", "FFN width", "params",
                                                  "KV B/token"], layer_rows, note))
    ev = data["evaluate"]
    if ev:
        rows = []
        for r in ev["preserved"]["rows"]:
            m = r["metric"]
            ce, pe = ev["child"][r["task"]].get(f"{m}_stderr"), ev["parent"][r["task"]].get(f"{m}_stderr")
            rows.append([r["task"], m, str(ev["child"][r["task"]].get("n", "")),
                         f"{_pct(r['child'])} ± {_pct(ce)}", f"{_pct(r['parent'])} ± {_pct(pe)}",
                         f"{100 * r['preserved']:.1f}%", paired_cell(r)])
        a = ev["preserved"]["average"]
        if a:
            rows.append(["average", "", "", _pct(a["child"]), _pct(a["parent"]), f"{100 * a['preserved']:.1f}%",
                         paired_cell(a)])
        out.append(("Accuracy preserved", ["task", "metric", "n", "child (± stderr)", "parent (± stderr)", "preserved",
                                           "child − parent (± paired stderr)"],
                    rows, (f"limit {ev['limit']} items per task" if ev.get("limit") else "whole tasks")
                    + "; the paired stderr compares both models item by item"))
        k, ppl = ev["kld"], ev["perplexity"]
        rows = [["KL(parent ‖ child), nats/token", f"{k['kld']:.4f}", f"{k['tokens']:,} tokens"],
                ["top-1 agreement", f"{100 * k['top1_agreement']:.2f}%", ""],
                ["perplexity, parent", f"{ppl['parent']['perplexity']:.3f}", f"{ppl['parent']['tokens']:,} tokens"],
                ["perplexity, child", f"{ppl['child']['perplexity']:.3f}", f"{ppl['child']['tokens']:,} tokens"]]
        out.append(("KLD and perplexity (reporting split)", ["metric", "value", "on"], rows, ""))
    b = data["bench"]
    if b:
        rows = [[pp["scenario"], str(pp["batch"]), f"{pp['e2e_tok_s']:,.1f}", f"{cc['e2e_tok_s']:,.1f}",
                 f"{cc['e2e_tok_s'] / pp['e2e_tok_s']:.2f}×", f"{pp['decode_tok_s']:,.1f}", f"{cc['decode_tok_s']:,.1f}"]
                for pp, cc in zip(b["parent"], b["child"])]
        out.append((f"Measured throughput here ({b['device']}, {b['threads']} threads)",
                    ["scenario IN/OUT", "batch", "parent tok/s", "child tok/s", "speed-up", "parent decode tok/s",
                     "child decode tok/s"], rows, "end-to-end output tokens/s, median of the bench reps"))
    co = data["cost"]
    if co:
        rows = []
        for s, pp in co["predicted"]["parent"].items():
            cc = co["predicted"]["child"][s]
            rows.append([s, f"{pp['output_tokens_per_s']:,.0f} (batch {pp['batch']})",
                         f"{cc['output_tokens_per_s']:,.0f} (batch {cc['batch']})", f"{co['speedup'][s]:.2f}×"])
        out.append((f"Predicted on one {co['gpu']} ({co['dtype']}, cost model)",
                    ["scenario IN/OUT", "parent tok/s per GPU", "child tok/s per GPU", "speed-up"], rows, ""))
        if "sizing" in co:
            sz = co["sizing"]
            rows = [[o["dtype"], str(o["gpus"]), f"{o['worst_tokens_per_s']:,.0f}", "yes" if o["meets"] else "no",
                     "<-" if o == sz["chosen"] else ""] for o in sz["options"]]
            out.append((f"Deployment sizing: ≥ {sz['target_tokens_per_s']:,.0f} output tokens/s in every scenario",
                        ["dtype", "GPUs (TP)", "worst-scenario tok/s", "meets", "chosen"], rows, ""))
    rows = [[s["stage"], "this report" if s["stage"] == "report" else s["status"],
             "–" if s["wall_s"] is None else f"{s['wall_s']:.1f}",
             "–" if not s["tokens"] else f"{s['tokens']:,}",
             "–" if not s["peak_memory_bytes"] else f"{s['peak_memory_bytes'] / 2**30:.2f} GiB",
             "" if s["resumed_from"] is None else f"step {s['resumed_from']}"] for s in data["stages"]]
    out.append(("Stages", ["stage", "status", "wall s", "tokens", "peak RSS", "resumed from"], rows,
                "peak RSS is the run process's peak so far at the end of each stage"))
    return out


def _headline(data: dict) -> str:
    parts = []
    p, c = data["parent"], data["child"]
    if p.get("params"):
        parts.append(f"{c['params'] / p['params']:.0%} of the parent's parameters")
    if data["bench"]:
        s = next(iter(data["bench"]["speedup"].items()))
        parts.append(f"{s[1]:.2f}× its measured throughput here ({s[0]})")
    if data["cost"]:
        s = next(iter(data["cost"]["speedup"].items()))
        parts.append(f"{s[1]:.2f}× predicted on {data['cost']['gpu']} ({s[0]})")
    ev = data["evaluate"]
    if ev and ev["preserved"]["average"]:
        parts.append(f"{100 * ev['preserved']['average']['preserved']:.1f}% of its accuracy")
    return "The child has " + ", ".join(parts) + "." if parts else ""


def render_markdown(data: dict, plots: dict[str, Path]) -> str:
    title = data["recipe"].get("name", "run")
    lines = [f"# tessera run: {title} ({data['budget']} budget)", "", _headline(data), "",
             f"- parent: `{data['parent_ref']}` (fingerprint {data['parent']['fingerprint']})",
             f"- child: `{data['child_dir']}`" if data["child_dir"] else "- child: none (this recipe makes no child)",
             f"- recipe: `{data['source']}`", ""]
    for name, path in plots.items():
        lines += [f"![{name}]({path.name})", ""]
    for t, header, rows, note in _tables(data):
        lines += [f"## {t}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", note, ""] if note else [""]
    if data["serve"]:
        s = data["serve"]
        lines += ["## Serve the child", "", "vLLM:", "", "```bash", s["vllm"], "```", "",
                  "llama.cpp (the exported GGUF):", "", "```bash", *s["llamacpp"], "```", ""]
        for engine, issues in s["incompatible"].items():
            if issues:
                lines += [f"{engine} cannot serve this child as is: " + "; ".join(issues[:5]), ""]
    lines += ["## Reproduce", "", "```bash", data["reproduce"], "```", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
pre{background:#f6f6f6;padding:.7em;overflow-x:auto}.note{color:#666;font-size:.9em}"""


def render_html(data: dict, plots: dict[str, Path]) -> str:
    e = html.escape
    title = f"tessera run: {data['recipe'].get('name', 'run')} ({data['budget']} budget)"
    body = [f"<h1>{e(title)}</h1>", f"<p><b>{e(_headline(data))}</b></p>", "<ul>",
            f"<li>parent: <code>{e(str(data['parent_ref']))}</code> "
            f"(fingerprint {e(str(data['parent']['fingerprint']))})</li>",
            f"<li>child: <code>{e(str(data['child_dir']))}</code></li>",
            f"<li>recipe: <code>{e(str(data['source']))}</code></li>", "</ul>"]
    for name, path in plots.items():
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        body.append(f'<h2>{e(name.capitalize())} plot</h2><img alt="{e(name)} plot" src="{uri}">')
    for t, header, rows, note in _tables(data):
        body.append(f"<h2>{e(t)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        body.append("</table>" + (f'<p class="note">{e(note)}</p>' if note else ""))
    if data["serve"]:
        s = data["serve"]
        body += ["<h2>Serve the child</h2><p>vLLM:</p>", f"<pre>{e(s['vllm'])}</pre>",
                 "<p>llama.cpp (the exported GGUF):</p>", f"<pre>{e(chr(10).join(s['llamacpp']))}</pre>"]
        for engine, issues in s["incompatible"].items():
            if issues:
                body.append(f'<p class="note">{e(engine)} cannot serve this child as is: {e("; ".join(issues[:5]))}</p>')
    body += ["<h2>Reproduce</h2>", f"<pre>{e(data['reproduce'])}</pre>"]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>' + e(title) + "</title><style>"
            + _CSS + "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def build_report(run_dir: str | Path, manifest=None) -> dict[str, Path]:
    """Write RUN_DIR/report/ (report.md, report.html, report.json, the plots) atomically; returns their paths."""
    run_dir = Path(run_dir)
    data = collect(run_dir, manifest)
    target = run_dir / "report"
    with atomic_dir(target, force=True) as tmp:
        plots = make_plots(data, tmp)
        (tmp / "report.md").write_text(render_markdown(data, plots), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(data, plots), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return {"md": target / "report.md", "html": target / "report.html", "json": target / "report.json",
            **{k: target / v.name for k, v in plots.items()}}
