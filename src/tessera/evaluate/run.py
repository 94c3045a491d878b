"""Run tasks on a model: score items, aggregate metrics, cache results by model content hash.

Results are cached under `$TESSERA_HOME/eval-cache/<fingerprint>/` keyed by task, limit, the task's version, the
data directory and the scoring-code version (a hash of the code that turns a model and items into numbers:
model, generation, scoring, metrics, task prompts and this module), so the parent is evaluated once per machine
however many children are compared with it, and a change to how numbers are computed never serves stale ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tessera.evaluate.metrics import aggregate, extract_number, item_outcome
from tessera.evaluate.scoring import Scorer
from tessera.evaluate.tasks import Item, Task, bench_dir, get_task, load_items
from tessera.io import atomic_write_json
from tessera.model import Transformer

PAIR_CHUNK = 64  # items whose pairs are batched together on the full-sequence path
SCORING_MODULES = ("tessera.model", "tessera.generate", "tessera.evaluate.scoring", "tessera.evaluate.metrics",
                   "tessera.evaluate.tasks", "tessera.evaluate.run")


@functools.cache
def scoring_version() -> str:
    """A hash of the source of SCORING_MODULES: part of every cache key and recorded with every result."""
    import importlib

    h = hashlib.sha256()
    for name in SCORING_MODULES:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()[:12]


def cache_path(fingerprint: str, task: Task, limit: int | None, data_dir: Path) -> Path:
    from tessera.checkpoint import tessera_home

    where = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]  # different data, different entry
    tag = f"{task.name}-limit{limit or 'all'}-v{task.version}-{where}-code{scoring_version()}"
    return tessera_home() / "eval-cache" / fingerprint / f"{tag}.json"


def score_items(scorer: Scorer, items: list[Item], progress=None, task_id=None) -> list[dict[str, float]]:
    outcomes: list[dict[str, float] | None] = [None] * len(items)
    pending: list[int] = []

    def flush():
        pairs = [(c, t) for i in pending for c, t in zip(items[i].contexts, items[i].continuations)]
        scores = scorer.score_pairs(pairs)
        k = 0
        for i in pending:
            n = len(items[i].contexts)
            outcomes[i] = item_outcome(items[i], scores[k:k + n])
            k += n
        if progress is not None:
            progress.advance(task_id, len(pending))
        pending.clear()

    # Shared-context items in context order, so consecutive items share the longest prompt prefix (a few-shot
    # prompt, a subject header) and the scorer copies its K/V instead of recomputing it. Outcomes keep item order.
    shared = [len(it.contexts) > 1 and len(set(it.contexts)) == 1 for it in items]
    order = sorted(range(len(items)), key=lambda i: (not shared[i], items[i].contexts[0] if shared[i] else "", i))
    for i in order:
        item = items[i]
        if item.kind == "generate":
            raise ValueError("generative items go through generate_items")
        if shared[i]:
            outcomes[i] = item_outcome(item, scorer.score_shared(item.contexts[0], item.continuations))
            if progress is not None:
                progress.advance(task_id)
        else:
            pending.append(i)
            if len(pending) >= PAIR_CHUNK:
                flush()
    if pending:
        flush()
    return outcomes  # type: ignore[return-value]


# lm-eval's gsm8k stops at "Question:" (the next shot); a blank line ends an answer in the shots too.
GSM8K_UNTIL = ("Question:", "\n\n")


def generate_items(model: Transformer, items: list[Item], batch_size: int, max_new_tokens: int = 256,
                   progress=None, task_id=None) -> list[dict[str, float]]:
    """gsm8k-style: greedy generation until 'Question:' or a blank line, exact match on the final number."""
    from tessera.generate import cut_at_stop_strings, generate

    tok = model.tokenizer
    outcomes = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [tok(it.contexts[0], add_special_tokens=False)["input_ids"] for it in batch]
        for item, new in zip(batch, generate(model, prompts, max_new_tokens, stop_strings=GSM8K_UNTIL)):
            text = cut_at_stop_strings(tok.decode(new, skip_special_tokens=True), GSM8K_UNTIL)
            outcomes.append({"exact_match": float(extract_number(text) == item.target)})
        if progress is not None:
            progress.advance(task_id, len(batch))
    return outcomes


def evaluate_tasks(model: Transformer, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                   data_dir=None, use_cache: bool = True, progress: bool = True,
                   log_samples: bool = False) -> dict[str, dict]:
    """Metrics per task: acc (+ acc_norm where defined) with stderr, n and wall seconds. With `log_samples` (lm-eval's
    `--log_samples`), also each item's outcome in item order under "samples", so two models scored on the same
    items can be compared item by item (`tessera.evaluate.metrics.paired_difference`)."""
    from tessera.checkpoint import fingerprint

    root = bench_dir(data_dir)
    specs = [get_task(t) for t in tasks]  # fail on an unknown task before any work
    fp = fingerprint(model) if use_cache else ""
    scorer = Scorer(model, batch_size)
    results: dict[str, dict] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        for task in specs:
            path = cache_path(fp, task, limit, root) if use_cache else None
            if path is not None and path.is_file():
                cached = json.loads(path.read_text())
                if not log_samples or "samples" in cached:
                    if not log_samples:
                        cached.pop("samples", None)
                    results[task.name] = cached | {"cached": True}
                    continue
            items = load_items(task, root, limit)
            task_id = bar.add_task(task.name, total=len(items), rate="")
            t0 = time.perf_counter()
            with torch.inference_mode():
                if task.generative:
                    outcomes = generate_items(model, items, batch_size, progress=bar, task_id=task_id)
                else:
                    outcomes = score_items(scorer, items, bar, task_id)
            seconds = time.perf_counter() - t0
            bar.update(task_id, rate=f"{len(items) / max(seconds, 1e-9):.1f} items/s")
            metrics = aggregate(items, outcomes, task.metrics) | {"seconds": round(seconds, 2), "limit": limit,
                                                                  "task_version": task.version,
                                                                  "scoring_version": scoring_version()}
            if fp:
                metrics["model_fingerprint"] = fp
            if log_samples:
                metrics["samples"] = outcomes
            results[task.name] = metrics
            if path is not None:
                atomic_write_json(path, metrics)
    return results
