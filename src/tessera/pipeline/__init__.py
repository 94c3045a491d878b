"""One command end to end: a recipe (TOML) of stages run over a resumable run directory, ending in a report.

    recipe    TOML -> frozen dataclasses, validated; budgets (quick | standard | full)
    manifest  the run directory's manifest (stage status, input/output hashes, time, tokens, memory) and lock
    run       the stages (parent, prune, search, distill, quantize, evaluate, bench, cost, report) and the runner
    report    report.md and a self-contained report.html from a run directory
"""

from tessera.pipeline.recipe import BUDGETS, STAGES, Recipe, load_recipe, parse_recipe, shipped_recipes
from tessera.pipeline.run import RunResult, run_recipe

__all__ = ["BUDGETS", "STAGES", "Recipe", "RunResult", "load_recipe", "parse_recipe", "run_recipe", "shipped_recipes"]
