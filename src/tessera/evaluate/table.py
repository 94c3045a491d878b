"""The "accuracy preserved" table of the Puzzle blog: child, parent and child/parent per task, and the average."""

from __future__ import annotations

from tessera.evaluate.tasks import TASKS


def primary_metric(task: str, results: dict) -> str:
    if task in TASKS:
        return TASKS[task].primary
    return "acc_norm" if "acc_norm" in results else "acc"


def accuracy_preserved(child: dict, parent: dict) -> dict:
    """Rows for the tasks both results share; the average row compares the mean accuracies. Where both were
    evaluated with `log_samples`, each row and the average also carry child - parent paired on the same items
    ("diff", "diff_stderr": `tessera.evaluate.metrics.paired_tasks`)."""
    from tessera.evaluate.metrics import paired_tasks

    rows = []
    for task in child:
        if task not in parent:
            continue
        metric = primary_metric(task, child[task])
        c, p = child[task][metric], parent[task][metric]
        rows.append({"task": task, "metric": metric, "child": c, "parent": p, "preserved": c / p if p else float("nan")})
    if not rows:
        return {"rows": [], "average": None}
    mean_c = sum(r["child"] for r in rows) / len(rows)
    mean_p = sum(r["parent"] for r in rows) / len(rows)
    average = {"task": "average", "metric": "", "child": mean_c, "parent": mean_p,
               "preserved": mean_c / mean_p if mean_p else float("nan")}
    if all("samples" in child[r["task"]] and "samples" in parent[r["task"]] for r in rows):
        d = paired_tasks({r["task"]: ([o[r["metric"]] for o in child[r["task"]]["samples"]],
                                      [o[r["metric"]] for o in parent[r["task"]]["samples"]]) for r in rows})
        for r in rows:
            r["diff"], r["diff_stderr"] = d["tasks"][r["task"]]
        average["diff"], average["diff_stderr"] = d["average"]
    return {"rows": rows, "average": average}


def paired_cell(row: dict) -> str:
    """child - parent ± paired se, in points ("" where the row has no paired difference)."""
    return f"{100 * row['diff']:+.2f} ± {100 * row['diff_stderr']:.2f}" if "diff" in row else ""


def render_preserved_markdown(table: dict) -> str:
    rows = table["rows"] + ([table["average"]] if table["average"] else [])
    paired = any("diff" in r for r in rows)
    extra = (" child - parent ± se (paired) |", "---:|") if paired else ("", "")
    lines = ["| task | metric | child | parent | preserved |" + extra[0], "|---|---|---:|---:|---:|" + extra[1]]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {100 * r['child']:.2f} | {100 * r['parent']:.2f} | "
                     f"{100 * r['preserved']:.1f}% |" + (f" {paired_cell(r)} |" if paired else ""))
    return "\n".join(lines) + "\n"


def rich_preserved_table(table: dict, title: str = "accuracy preserved"):
    from rich.table import Table

    paired = any("diff" in r for r in table["rows"])
    t = Table(title=title)
    for col in ("task", "metric", "child", "parent", "preserved") + (("child - parent ± se (paired)",) if paired else ()):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for r in table["rows"]:
        t.add_row(r["task"], r["metric"], f"{100 * r['child']:.2f}", f"{100 * r['parent']:.2f}",
                  f"{100 * r['preserved']:.1f}%", *([paired_cell(r)] if paired else []))
    if table["average"]:
        a = table["average"]
        t.add_section()
        t.add_row("average", "", f"{100 * a['child']:.2f}", f"{100 * a['parent']:.2f}", f"{100 * a['preserved']:.1f}%",
                  *([paired_cell(a)] if paired else []))
    return t


def rich_results_table(results: dict, title: str = "results"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "n", "acc", "± stderr", "acc_norm", "± stderr", "other", "seconds"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for task, r in results.items():
        other = []
        if "perplexity" in r:
            other.append(f"ppl {r['perplexity']:.2f}")
        if "acc_macro" in r:
            other.append(f"macro {100 * r['acc_macro']:.2f}")
        if "exact_match" in r:
            other.append(f"em {100 * r['exact_match']:.2f}")

        def pct(key, r=r):
            return f"{100 * r[key]:.2f}" if key in r else ""

        t.add_row(task, str(r.get("n", "")), pct("acc"), pct("acc_stderr"), pct("acc_norm"), pct("acc_norm_stderr"),
                  ", ".join(other), f"{r.get('seconds', 0):.1f}" + (" (cached)" if r.get("cached") else ""))
    return t
