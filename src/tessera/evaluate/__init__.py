"""Evaluation: benchmark tasks, perplexity, KL divergence to the parent, the accuracy-preserved table."""

from tessera.evaluate.kld import KLDResult, kl_per_token, mean_kld, parent_logits_for
from tessera.evaluate.perplexity import PerplexityResult, perplexity, rolling_nll
from tessera.evaluate.run import evaluate_tasks
from tessera.evaluate.table import accuracy_preserved, render_preserved_markdown
from tessera.evaluate.tasks import DEFAULT_TASKS, TASKS, get_task

__all__ = [
    "DEFAULT_TASKS", "TASKS", "KLDResult", "PerplexityResult", "accuracy_preserved", "evaluate_tasks", "get_task",
    "kl_per_token", "mean_kld", "parent_logits_for", "perplexity", "render_preserved_markdown", "rolling_nll",
]
