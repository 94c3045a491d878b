"""Per-item outcomes and their aggregation, with lm-eval-harness conventions.

* acc: argmax of the summed continuation loglikelihoods is the gold choice.
* acc_norm: argmax of loglikelihood divided by the choice's length in characters (lm-eval's `completion_len`:
  the choice text without the " " that joins it to the context), which removes the bias towards short answers.
* truthfulqa mc1: acc with the best answer as choice 0; mc2: normalised probability mass on true answers.
* lambada: acc = the continuation is the greedy completion; perplexity = exp(-mean loglikelihood).
* Standard error of a mean: sample standard deviation / sqrt(n) (lm-eval's `mean_stderr`).
* Two models on the same items: the mean of the per-item differences and its standard error (the paired se), which
  leaves out the variance the items share and so is smaller than the two models' own se combined.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from tessera.evaluate.scoring import Score
from tessera.evaluate.tasks import Item


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def choice_chars(continuation: str) -> int:
    """lm-eval's acc_norm length: characters of the choice, not counting the single joining space."""
    return max(len(continuation) - continuation.startswith(" "), 1)


def item_outcome(item: Item, scores: Sequence[Score]) -> dict[str, float]:
    ll = [s.loglik for s in scores]
    if item.kind == "mc":
        norm = [s.loglik / choice_chars(c) for s, c in zip(scores, item.continuations)]
        return {"acc": float(argmax(ll) == item.gold), "acc_norm": float(argmax(norm) == item.gold)}
    if item.kind == "mc1":
        return {"acc": float(argmax(ll) == 0)}
    if item.kind == "mc2":
        top = max(ll)
        probs = [math.exp(x - top) for x in ll]
        return {"acc": sum(probs[i] for i in item.gold) / sum(probs)}
    if item.kind == "greedy":
        return {"acc": float(scores[0].is_greedy), "loglik": ll[0]}
    raise ValueError(f"unknown item kind {item.kind}")


def extract_number(text: str) -> str | None:
    """gsm8k answer: the number after '####' if present, else the last number in the text (flexible extract)."""
    strict = re.search(r"####\s*(-?[0-9.,]+)", text)
    numbers = [strict.group(1)] if strict else re.findall(r"-?[0-9][0-9,]*\.?[0-9]*", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    return value


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a_i - b_i over items both models were scored on, in the same order, and its standard error."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same items: {len(a)} against {len(b)}")
    return mean_stderr([x - y for x, y in zip(a, b)])


def paired_tasks(pairs: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> dict:
    """`paired_difference` per task, {task: (a's outcomes, b's outcomes)}, and of the average over tasks: the mean of
    the task differences, se = sqrt(sum of squared task se) / tasks (the tasks' items are independent)."""
    tasks = {t: paired_difference(a, b) for t, (a, b) in pairs.items()}
    n = len(tasks)
    return {"tasks": tasks, "average": (sum(d for d, _ in tasks.values()) / n,
                                        math.sqrt(sum(se ** 2 for _, se in tasks.values())) / n)}


def aggregate(items: Sequence[Item], outcomes: Sequence[dict[str, float]], metrics: Sequence[str] | None = None) -> dict:
    """Task metrics from per-item outcomes: each metric (of `metrics`, if given) with its stderr, perplexity, groups."""
    result: dict = {"n": len(outcomes)}
    keys = [k for k in outcomes[0] if k != "loglik" and (metrics is None or k in metrics)] if outcomes else []
    for key in keys:
        mean, se = mean_stderr([o[key] for o in outcomes])
        result[key], result[f"{key}_stderr"] = mean, se
    if outcomes and "loglik" in outcomes[0]:
        result["perplexity"] = math.exp(-sum(o["loglik"] for o in outcomes) / len(outcomes))
    groups: dict[str, list[float]] = defaultdict(list)
    for item, o in zip(items, outcomes):
        if item.group:
            groups[item.group].append(o["acc"])
    if groups:
        result["groups"] = {g: {"acc": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())}
        result["acc_macro"] = sum(g["acc"] for g in result["groups"].values()) / len(groups)
    return result
