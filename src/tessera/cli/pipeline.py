"""Pipeline commands: run (a recipe end to end, resumable), report (rebuild a run's report)."""

from __future__ import annotations

from pathlib import Path

import typer

from tessera.cli.app import DEVICE_HELP, app, console, echo_json, err_console, friendly


@app.command("run")
@friendly
def run_cmd(recipe: str = typer.Argument("default", help="a recipe .toml file or a shipped recipe's name "
                                         "(default, minitron, quantize-only, gpu-sizing)"),
            parent: str = typer.Option(None, "--parent", help="the parent (default: the recipe's, usually 'default')"),
            out: Path = typer.Option(None, "--out", help="run directory (default: runs/RECIPE-BUDGET)"),
            budget: str = typer.Option("standard", "--budget", help="quick | standard | full: scales tokens, samples and "
                                       "task limits, nothing else"),
            resume: bool = typer.Option(False, "--resume", help="continue a run: skip finished stages, resume a killed "
                                        "one from its checkpoint, rerun stages whose inputs changed"),
            force: bool = typer.Option(False, "--force", help="rerun every stage"),
            from_stage: str = typer.Option(None, "--from-stage", help="rerun this stage and every later one"),
            device: str = typer.Option("auto", help=DEVICE_HELP),
            as_json: bool = typer.Option(False, "--json", help="print a JSON summary at the end")):
    """Run a recipe end to end: parent -> child -> evaluation against the parent -> report."""
    from tessera.pipeline import load_recipe, run_recipe

    r = load_recipe(recipe).with_budget(budget).with_parent(parent)
    out = out or Path("runs") / f"{r.info.name}-{budget}"
    echo = (lambda line: err_console.print(line, highlight=False)) if as_json else \
        (lambda line: console.print(line, highlight=False))
    result = run_recipe(r, out, resume=resume, force=force, from_stage=from_stage, device=device, echo=echo,
                        progress=not as_json)
    if as_json:
        echo_json(result.as_dict())
        return
    ran = ", ".join(result.ran) or "none"
    console.print(f"ran: {ran}; skipped (already done): {', '.join(result.skipped) or 'none'}", highlight=False)
    console.print(f"child:  {result.child or 'none (this recipe makes no child)'}", highlight=False)
    if result.report is not None:
        console.print(f"report: {result.report}  (and report.md beside it)", highlight=False)


@app.command("report")
@friendly
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory made by tessera run"),
               as_json: bool = typer.Option(False, "--json")):
    """Rebuild RUN_DIR/report/ (report.md, self-contained report.html, report.json) from the run's outputs."""
    from tessera.errors import TesseraError
    from tessera.pipeline.manifest import Manifest, RunLock
    from tessera.pipeline.report import build_report

    if not (run_dir / "manifest.json").is_file():
        raise TesseraError(f"{run_dir}: not a run directory (no manifest.json); pass the --out of a tessera run")
    with RunLock(run_dir):
        paths = build_report(run_dir, Manifest.load(run_dir))
    if as_json:
        echo_json({k: str(v) for k, v in paths.items()})
        return
    console.print(f"report: {paths['html']}  (and {paths['md'].name} beside it)", highlight=False)
