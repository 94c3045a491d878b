"""`tessera` command line: a thin typer dispatch over documented library functions, one module per command group.

    models    inspect, generate, convert, demo
    evaluate  eval, perplexity, kld
    minitron  importance, prune, distill
    speed     bench, cost, plot
    engines   export
    puzzle    puzzle library|bld|score|mip|assemble, search
    quantize  quantize
    pipeline  run, report
"""

# isort: off
# Import order is the order of `tessera --help`; each module registers its commands on `app`.
from tessera.cli import models, evaluate, minitron, speed, engines, puzzle, quantize, pipeline  # noqa: F401
from tessera.cli.app import app, main

# isort: on

__all__ = ["app", "main"]
