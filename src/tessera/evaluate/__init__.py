"""Evaluation: benchmark tasks, perplexity, KL divergence to the parent, the accuracy-preserved table."""

from tessera.evaluate.kld import KLDResult, kl_per_token, mean_kld, parent_logits_for

__all__ = ["KLDResult", "kl_per_token", "mean_kld", "parent_logits_for"]
