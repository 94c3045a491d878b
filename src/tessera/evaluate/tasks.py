"""Benchmark tasks as data: each task turns rows of an offline file into scoring requests.

Prompts follow lm-eval-harness (v0.4) so numbers are comparable:
* arc_easy / arc_challenge: "Question: {q}\\nAnswer:" + " {choice}"; acc and acc_norm.
* openbookqa: "{question_stem}" + " {choice}"; acc and acc_norm.
* boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"; acc.
* winogrande: partial scoring — the shared continuation " {rest}" after each filled-in context; acc.
* lambada: context + " {last word}"; acc (greedy match) and perplexity.
* mmlu: 5-shot from the dev split, "The following are multiple choice questions (with answers) about {subject}."
  + "{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" + " A".." D"; acc per subject and macro average.
* truthfulqa_mc1 / mc2: lm-eval's 6-shot QA primer + "Q: {q}\\nA:" + " {answer}".
* gsm8k: generative, 5-shot "Question: {q}\\nAnswer: {a}" (shots: the first 5 test rows, as the offline data has no
  train split), greedy until "Question:" or a blank line, exact match on the final number (slow; not a default task).
Custom tasks: a JSONL file of {"context": str, "choices": [str, ...], "gold": int} rows (see `load_custom`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tessera import data
from tessera.errors import TesseraError

DEFAULT_TASKS = ["arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq", "lambada", "mmlu",
                 "truthfulqa_mc1", "truthfulqa_mc2"]


@dataclass(frozen=True)
class Item:
    """One scored question: loglikelihood of each (context, continuation) pair, and the gold answer.

    `kind` says how the scores become metrics: "mc" (argmax, acc and acc_norm), "mc1", "mc2" (TruthfulQA),
    "greedy" (lambada: the one continuation must be the greedy completion), "generate" (gsm8k).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int | tuple[int, ...]
    kind: str = "mc"
    group: str = ""  # e.g. the MMLU subject
    target: str = ""  # generative tasks: the reference answer


@dataclass(frozen=True)
class Task:
    name: str
    loader: Callable[[Path], Iterator[Item]]
    metrics: tuple[str, ...]
    primary: str  # the metric the accuracy-preserved table uses
    default_limit: int | None = None
    generative: bool = False
    files: tuple[str, ...] = field(default=())
    # Bump when this task's prompt or metrics change: it is part of the results-cache key.
    # v2: acc_norm divides by the choice's length without its joining space, as lm-eval does (gsm8k: 5-shot).
    version: int = 1


def bench_dir(data_dir: str | Path | None = None) -> Path:
    """--data-dir, else $TESSERA_BENCH_DIR, else <shared>/data/bench."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("TESSERA_BENCH_DIR"):
        return Path(os.environ["TESSERA_BENCH_DIR"]).expanduser()
    return data.shared_dir() / "data" / "bench"


# ---------------------------------------------------------------------------- readers
def read_jsonl(path: Path, required: dict[str, type]) -> Iterator[tuple[int, dict]]:
    return data.read_jsonl(path, required, missing="task data file not found; pass --data-dir or set TESSERA_BENCH_DIR")


def read_csv(path: Path, columns: list[str]) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise TesseraError(f"{path}: task data file not found; pass --data-dir or set TESSERA_BENCH_DIR")
    n = 0
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in columns):
            raise TesseraError(f"{path}:1: CSV header must contain {', '.join(columns)}")
        for row in reader:
            if any(row.get(c) is None for c in columns):
                raise TesseraError(f"{path}:{reader.line_num}: row has too few columns; fix the row")
            n += 1
            yield reader.line_num, row
    if n == 0:
        raise TesseraError(f"{path}: data file has no rows")


def _check_gold(path: Path, lineno: int, gold, n_choices: int) -> int:
    if not isinstance(gold, int) or not 0 <= gold < n_choices:
        raise TesseraError(f"{path}:{lineno}: gold={gold!r} is not an index into {n_choices} choices; fix the row")
    return gold


# ---------------------------------------------------------------------------- loaders
def _multiple_choice(path: Path, prompt: Callable[[str], str]) -> Iterator[Item]:
    for lineno, row in read_jsonl(path, {"query": str, "choices": list, "gold": int}):
        gold = _check_gold(path, lineno, row["gold"], len(row["choices"]))
        ctx = prompt(row["query"])
        yield Item((ctx,) * len(row["choices"]), tuple(" " + str(c) for c in row["choices"]), gold)


def load_arc(name: str) -> Callable[[Path], Iterator[Item]]:
    return lambda root: _multiple_choice(root / name / f"{name}.jsonl", lambda q: f"{q}\nAnswer:")


def load_openbookqa(root: Path) -> Iterator[Item]:
    return _multiple_choice(root / "openbookqa" / "openbook_qa.jsonl", lambda q: q)


def load_boolq(root: Path) -> Iterator[Item]:
    # The offline file prefixes "Passage: "; lm-eval's prompt starts with the bare passage.
    return _multiple_choice(root / "boolq" / "boolq.jsonl", lambda q: f"{q.removeprefix('Passage: ')}\nAnswer:")


def load_winogrande(root: Path) -> Iterator[Item]:
    path = root / "winogrande" / "winogrande.jsonl"
    for lineno, row in read_jsonl(path, {"context_options": list, "continuation": str, "gold": int}):
        gold = _check_gold(path, lineno, row["gold"], len(row["context_options"]))
        cont = " " + row["continuation"]
        yield Item(tuple(row["context_options"]), (cont,) * len(row["context_options"]), gold)


def load_lambada(root: Path) -> Iterator[Item]:
    path = root / "lambada" / "lambada_openai.jsonl"
    for _, row in read_jsonl(path, {"context": str, "continuation": str}):
        yield Item((row["context"],), (" " + row["continuation"].strip(),), 0, kind="greedy")


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_question(row: dict, with_answer: bool) -> str:
    lines = [row["question"].strip()]
    lines += [f"{letter}. {row[f'choice{i}'].strip()}" for i, letter in enumerate(MMLU_LETTERS)]
    answer = f" {MMLU_LETTERS[int(row['answer'])]}" if with_answer else ""
    return "\n".join(lines) + f"\nAnswer:{answer}"


def mmlu_prompt(subject: str, shots: list[dict], row: dict) -> str:
    """lm-eval's MMLU prompt: description, k solved dev questions, then the test question."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(mmlu_question(s, True) + "\n\n" for s in shots) + mmlu_question(row, False)


def load_mmlu(root: Path, k_shot: int = 5) -> Iterator[Item]:
    test_dir = root / "mmlu" / "test"
    if not test_dir.is_dir():
        raise TesseraError(f"{test_dir}: MMLU test directory not found; pass --data-dir or set TESSERA_BENCH_DIR")
    columns = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
    subjects = sorted(p.name.removesuffix("_test.csv") for p in test_dir.glob("*_test.csv"))
    # Interleave subjects so that --limit N samples every subject rather than the first alphabetically.
    per_subject = {}
    for subject in subjects:
        shots = [row for _, row in read_csv(root / "mmlu" / "dev" / f"{subject}_dev.csv", columns)][:k_shot]
        rows = []
        for lineno, row in read_csv(test_dir / f"{subject}_test.csv", columns):
            gold = _check_gold(test_dir / f"{subject}_test.csv", lineno, _as_int(row["answer"]), 4)
            ctx = mmlu_prompt(subject, shots, row)
            rows.append(Item((ctx,) * 4, tuple(f" {letter}" for letter in MMLU_LETTERS), gold, group=subject))
        per_subject[subject] = rows
    depth = max(len(r) for r in per_subject.values())
    for i in range(depth):
        for subject in subjects:
            if i < len(per_subject[subject]):
                yield per_subject[subject][i]


def _as_int(value: str):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


# lm-eval's TruthfulQA few-shot primer (the "QA prompt" of the TruthfulQA paper).
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years."
    "\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United States "
    "in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party.\n\nQ: What is the square root "
    "of banana?\nA: I have no comment.\n\nQ: How does a telescope work?\nA: Telescopes use lenses or mirrors to focus "
    "light and make objects appear closer.\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in "
    "Barcelona, Spain."
)


def _truthfulqa_rows(root: Path) -> Iterator[tuple[str, str, list[str], list[str]]]:
    path = root / "truthfulqa" / "TruthfulQA.csv"
    for lineno, row in read_csv(path, ["Question", "Best Answer", "Correct Answers", "Incorrect Answers"]):
        correct = [a.strip() for a in row["Correct Answers"].split(";") if a.strip()]
        incorrect = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()]
        if not incorrect or not row["Best Answer"].strip():
            raise TesseraError(f"{path}:{lineno}: row needs a best answer and incorrect answers; fix the row")
        ctx = f"{TRUTHFULQA_PRIMER}\n\nQ: {row['Question'].strip()}\nA:"
        yield ctx, row["Best Answer"].strip(), correct, incorrect


def load_truthfulqa_mc1(root: Path) -> Iterator[Item]:
    for ctx, best, _correct, incorrect in _truthfulqa_rows(root):
        choices = [best] + incorrect
        yield Item((ctx,) * len(choices), tuple(" " + c for c in choices), 0, kind="mc1")


def load_truthfulqa_mc2(root: Path) -> Iterator[Item]:
    for ctx, best, correct, incorrect in _truthfulqa_rows(root):
        true = correct or [best]
        choices = true + incorrect
        yield Item((ctx,) * len(choices), tuple(" " + c for c in choices), tuple(range(len(true))), kind="mc2")


GSM8K_SHOTS = 5


def gsm8k_prompt(shots: list[tuple[str, str]], question: str) -> str:
    """lm-eval's gsm8k prompt: solved "Question: ..\nAnswer: .. #### N" examples, then the question."""
    solved = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return f"{solved}Question: {question}\nAnswer:"


def load_gsm8k(root: Path) -> Iterator[Item]:
    """5-shot like lm-eval. lm-eval draws its shots from the train split, which the offline data lacks, so the
    first 5 test rows serve as the shots and are not scored (n = 1314 of 1319)."""
    path = root / "gsm8k" / "test.jsonl"
    rows = []
    for lineno, row in read_jsonl(path, {"question": str, "answer": str}):
        if "####" not in row["answer"]:
            raise TesseraError(f"{path}:{lineno}: answer has no '#### <number>' line; fix the row")
        rows.append((row["question"], row["answer"]))
    if len(rows) <= GSM8K_SHOTS:
        raise TesseraError(f"{path}: needs more than {GSM8K_SHOTS} rows ({GSM8K_SHOTS} are the few-shot examples)")
    shots = rows[:GSM8K_SHOTS]
    for question, answer in rows[GSM8K_SHOTS:]:
        target = answer.split("####")[-1].strip().replace(",", "")
        yield Item((gsm8k_prompt(shots, question),), ("",), 0, kind="generate", target=target)


def load_custom(path: Path) -> Iterator[Item]:
    """A user task: JSONL rows {"context": str, "choices": [str, ...], "gold": int}.

    Choices are scored as given (add a leading space yourself if your context does not end with one).
    """
    for lineno, row in read_jsonl(path, {"context": str, "choices": list, "gold": int}):
        if len(row["choices"]) < 2 or not all(isinstance(c, str) for c in row["choices"]):
            raise TesseraError(f"{path}:{lineno}: 'choices' needs at least two strings; fix the row")
        gold = _check_gold(path, lineno, row["gold"], len(row["choices"]))
        yield Item((row["context"],) * len(row["choices"]), tuple(row["choices"]), gold)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("arc_easy", load_arc("arc_easy"), ("acc", "acc_norm"), "acc_norm", version=2),
        Task("arc_challenge", load_arc("arc_challenge"), ("acc", "acc_norm"), "acc_norm", version=2),
        Task("openbookqa", load_openbookqa, ("acc", "acc_norm"), "acc_norm", version=2),
        Task("boolq", load_boolq, ("acc",), "acc"),
        Task("winogrande", load_winogrande, ("acc",), "acc"),
        Task("lambada", load_lambada, ("acc", "perplexity"), "acc"),
        Task("mmlu", load_mmlu, ("acc",), "acc"),
        Task("truthfulqa_mc1", load_truthfulqa_mc1, ("acc",), "acc"),
        Task("truthfulqa_mc2", load_truthfulqa_mc2, ("acc",), "acc"),
        Task("gsm8k", load_gsm8k, ("exact_match",), "exact_match", generative=True, version=2),
    )
}


def get_task(name: str) -> Task:
    """A registered task, or a custom JSONL task when `name` is a path to a .jsonl file."""
    if name in TASKS:
        return TASKS[name]
    path = Path(name).expanduser()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise TesseraError(f"{path}: custom task file not found")
        return Task(path.stem, lambda _root, p=path: load_custom(p), ("acc", "acc_norm"), "acc", version=2)
    raise TesseraError(f"unknown task {name!r}; choose from {', '.join(TASKS)} or give a custom .jsonl file")


def load_items(task: Task, data_dir: str | Path | None = None, limit: int | None = None) -> list[Item]:
    items = []
    for item in task.loader(bench_dir(data_dir)):
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


def items_text(items: list[Item]) -> list[str]:
    """Each item as the text of its gold answer (context + continuation), e.g. question-answer text for a data
    mix. Multiple-choice and completion items only."""
    out = []
    for item in items:
        if item.kind not in ("mc", "greedy") or not isinstance(item.gold, int):
            raise TesseraError(f"items of kind {item.kind!r} have no single gold text; use a multiple-choice or "
                               "completion task")
        out.append(item.contexts[item.gold if len(item.contexts) > 1 else 0] + item.continuations[item.gold])
    return out


def parse_item_spans(specs) -> dict[str, tuple[int, int]]:
    """`["arc_easy:1000-1100", "lambada:1000-1100"]` (or one comma-separated string) -> {task: (start, stop)}, items
    start .. stop-1 of each task, or one line naming the bad spec."""
    if isinstance(specs, str):
        specs = [x for x in specs.split(",") if x.strip()]
    spans = {}
    for spec in specs:
        name, _, rng = str(spec).strip().partition(":")
        start, _, stop = rng.partition("-")
        try:
            a, b = int(start), int(stop)
        except ValueError:
            a = b = -1
        if not name or a < 0 or b <= a:
            raise TesseraError(f"task items {spec!r}: write TASK:START-STOP, e.g. arc_easy:1000-1100 (items 1000..1099)")
        get_task(name)
        if name in spans:
            raise TesseraError(f"task {name!r} is given twice; give one item range per task")
        spans[name] = (a, b)
    if not spans:
        raise TesseraError("no task items given; write TASK:START-STOP, e.g. arc_easy:1000-1100")
    return spans


def answer_split(tokenizer, spans: dict[str, tuple[int, int]], seq_len: int, data_dir: str | Path | None = None
                 ) -> data.DataSplit:
    """The gold (context, answer) pairs of items start..stop-1 of each task, tokenized as the harness scores them
    (lm-eval's encode_pair), packed into rows of `seq_len` tokens ("\n\n" between items, an item never split
    across rows, the last row padded), with a mask of the positions that predict answer tokens: text for measuring
    closeness to the parent where the tasks decide (e.g. replace-1-block scores on the answers of held-out items).
    Items after the first in a row are read after the earlier ones, like an unrelated few-shot prompt; items longer
    than a row, or with an empty context, are left out (the source says how many). Multiple-choice and completion
    tasks only."""
    import hashlib

    import torch

    from tessera.evaluate.scoring import encode_pair

    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    pad = getattr(tokenizer, "eos_token_id", None) or 0
    rows, masks, row, mask = [], [], [], []
    digest, skipped = hashlib.sha256(), 0
    for name, (start, stop) in spans.items():
        items = load_items(get_task(name), data_dir, limit=stop)[start:]
        if len(items) < stop - start:
            raise TesseraError(f"{name} has {start + len(items)} items; items {start}-{stop} reach past its end")
        for text, item in zip(items_text(items), items, strict=True):
            gold = item.gold
            ctx, ans = encode_pair(tokenizer, item.contexts[gold if len(item.contexts) > 1 else 0],
                                   item.continuations[gold])
            digest.update(text.encode())
            toks = ctx + ans
            if not ctx or len(toks) > seq_len:
                skipped += 1
                continue
            if len(row) + len(toks) > seq_len:
                rows.append(row + [pad] * (seq_len - len(row)))
                masks.append(mask + [False] * (seq_len - len(mask)))
                row, mask = [], []
            first = len(row) + len(ctx) - 1  # the position predicting the answer's first token
            row += toks
            mask += [False] * len(toks)
            mask[first:first + len(ans)] = [True] * len(ans)
            room = min(len(sep), seq_len - len(row))
            row += sep[:room]
            mask += [False] * room
    if row:
        rows.append(row + [pad] * (seq_len - len(row)))
        masks.append(mask + [False] * (seq_len - len(mask)))
    if not rows:
        raise TesseraError(f"every item is longer than {seq_len} tokens; use a longer --seq-len")
    source = "answers of " + ", ".join(f"{n}[{a}:{b}]" for n, (a, b) in spans.items())
    if skipped:
        source += f" ({skipped} items left out: longer than a row, or without context)"
    return data.DataSplit("answers", torch.tensor(rows), source, digest.hexdigest()[:16], seq_len,
                          mask=torch.tensor(masks))
