"""Text data for calibration, distillation, perplexity and KLD: files -> three disjoint splits -> token chunks.

A text file is read whole; a `.jsonl` file contributes the `text` field of each row. Every corpus is dealt into
three disjoint splits, so that no number is reported on the text it was chosen or fitted on:

* `calibration` (80 %): importance scores, distillation and teacher-correction training, quantization scales;
* `selection`   (10 %): choices among candidates (the width/depth search, Puzzle's block scores, validation
  during distillation);
* `reporting`   (10 %): the KLD / perplexity a benchmark or `tessera kld` reports.

The text is cut into blocks of about `BLOCK_CHARS` characters at line breaks, and block j goes to the split of
`j % 10` (8 blocks of 10 to calibration, one each to selection and reporting), so every split samples the whole
corpus and the splits never share a character, whatever the tokenizer or sequence length. A split's blocks are
joined, tokenized (up to `max_tokens`) and cut into non-overlapping chunks of `seq_len` tokens (the tail that does
not fill a chunk is dropped). `split="all"` is the whole file, for a text the user names for one measurement.

Every `DataSplit` has a `record()` (source file and its hash, split, chunks, tokens, content hash of the token ids)
that stages write into their outputs; `check_disjoint` refuses records of one source whose roles share a split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tessera.errors import TesseraError

DEFAULT_CORPUS_REL = Path("data") / "corpus" / "big.txt"


def shared_dir() -> Path:
    """`$TESSERA_SHARED`, else `../shared` beside the repository checkout, else `./shared`."""
    env = os.environ.get("TESSERA_SHARED")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo.parent / "shared", repo / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"):
        if (candidate / "data").is_dir():
            return candidate
    return repo.parent / "shared"


def default_corpus() -> Path:
    path = shared_dir() / DEFAULT_CORPUS_REL
    if not path.is_file():
        raise TesseraError(f"{path}: default calibration corpus not found; pass --data FILE or set TESSERA_SHARED")
    return path


def read_jsonl(path: Path, required: dict[str, type], missing: str = "file not found; pass an existing file"):
    """(line number, row) of each non-blank line; one clear error naming file and line for any bad row."""
    if not path.is_file():
        raise TesseraError(f"{path}: {missing}")
    n = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TesseraError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove the line") from None
            for key, typ in required.items():
                if not isinstance(row, dict) or not isinstance(row.get(key), typ):
                    raise TesseraError(f"{path}:{lineno}: row needs '{key}' of type {typ.__name__}; fix the row")
            n += 1
            yield lineno, row
    if n == 0:
        raise TesseraError(f"{path}: data file is empty; it needs one JSON object per line")


def read_text(path: str | Path) -> str:
    """All text of a plain-text file, or the `text` fields of a JSONL file, joined by blank lines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TesseraError(f"{path}: no such data file; pass a text or JSONL file")
    if path.suffix == ".jsonl":
        text = "\n\n".join(row["text"] for _, row in read_jsonl(path, {"text": str}))
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TesseraError(f"{path}: data file is empty; give a file with text in it")
    return text


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids (1-D long tensor) of `text`; long texts are encoded in pieces to bound memory."""
    if tokenizer is None:
        raise TesseraError("this model has no tokenizer; load it from a directory that has tokenizer files")
    ids: list[int] = []
    piece = 200_000  # characters per encode call
    for start in range(0, len(text), piece):
        ids.extend(tokenizer(text[start:start + piece], add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    out = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    return out


SPLITS = ("calibration", "selection", "reporting")
# position of each block within a period of 10 -> split (8 x calibration, 1 x selection, 1 x reporting)
_PATTERN = ("calibration",) * 4 + ("selection",) + ("calibration",) * 4 + ("reporting",)
BLOCK_CHARS = 4096
MIN_BLOCKS = 40  # a short text is cut into smaller blocks, so that each split gets several


def text_blocks(text: str, size: int | None = None) -> list[tuple[int, int]]:
    """(start, end) character ranges of consecutive blocks that tile `text`: about `size` characters (default
    BLOCK_CHARS, fewer for a text shorter than MIN_BLOCKS blocks), each ending at a line break, else a space, in its
    second half."""
    size = size or _block_size(len(text))
    blocks, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            for sep in ("\n", " "):
                cut = text.rfind(sep, start + size // 2, end)
                if cut >= 0:
                    end = cut + 1
                    break
        blocks.append((start, end))
        start = end
    return blocks


def _block_size(chars: int) -> int:
    return max(32, min(BLOCK_CHARS, chars // MIN_BLOCKS))


def split_ranges(text: str, split: str) -> list[tuple[int, int]]:
    """The character ranges of `text` that belong to `split` (all of it for "all")."""
    if split == "all":
        return [(0, len(text))]
    if split not in SPLITS:
        raise TesseraError(f"unknown data split {split!r}; use one of {', '.join(SPLITS)} or all")
    return [r for j, r in enumerate(text_blocks(text)) if _PATTERN[j % len(_PATTERN)] == split]


def split_text(path: str | Path, split: str) -> str:
    """The text of one split of a data file (its blocks joined by line breaks), as `load_split` tokenizes it."""
    return _split_part(read_text(path), split)


def _split_part(text: str, split: str) -> str:
    return "\n".join(text[a:b] for a, b in split_ranges(text, split))


def interleave(texts: Sequence[str]) -> str:
    """One text that alternates blocks (`text_blocks` of one size) of each of `texts` in turn and
    stops when the shortest runs out: an equal-share mix (e.g. books and question-answer text) whose every split
    samples each part. A mix file is written once and then read like any corpus (`--data`)."""
    if len(texts) < 2 or any(not t.strip() for t in texts):
        raise TesseraError("a mix needs at least two non-empty texts")
    size = _block_size(min(len(t) for t in texts))
    blocks = [[t[a:b] for a, b in text_blocks(t, size)] for t in texts]
    n = min(len(b) for b in blocks)
    return "".join(b[j].rstrip("\n") + "\n" for j in range(n) for b in blocks)


def sha256_ids(ids: torch.Tensor) -> str:
    """Content hash of token ids (independent of the tensor's shape and device)."""
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class DataSplit:
    """Token chunks (N, seq_len) of one split of one source, and where they came from. `mask` (N, seq_len, bool),
    when given, marks the positions whose next-token prediction counts (e.g. those predicting the answer tokens of
    task items, `tessera.evaluate.tasks.answer_split`); None: every position."""

    name: str  # calibration | selection | reporting | all | answers
    chunks: torch.Tensor
    source: str  # file path, or a description for in-memory data
    source_sha256: str  # hash of the source text
    seq_len: int
    mask: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.chunks.numel()

    def __len__(self) -> int:
        return len(self.chunks)

    def take(self, n: int) -> DataSplit:
        """The first `n` chunks (the record says how many were used)."""
        return replace(self, chunks=self.chunks[:n], mask=None if self.mask is None else self.mask[:n])

    def record(self) -> dict:
        """What an output says about the data it used: which split, how many tokens, their hash (of the tokens and,
        with a mask, of the positions that count too, and how many those are)."""
        rec = {"split": self.name, "source": self.source, "source_sha256": self.source_sha256,
               "chunks": len(self.chunks), "seq_len": self.seq_len, "tokens": self.tokens}
        if self.mask is None:
            return {**rec, "sha256": sha256_ids(self.chunks)}
        return {**rec, "positions": int(self.mask.sum()),
                "sha256": sha256_ids(torch.cat([self.chunks, self.mask.long()], dim=1))}


def chunk(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def load_split(tokenizer, split: str, path: str | Path | None = None, *, seq_len: int | None = 256,
               max_tokens: int | None = None, min_chunks: int = 1) -> DataSplit:
    """Chunks of one split of a data file (default: the shared corpus); see the module docstring.
    `seq_len=None` keeps the split's tokens as one row (for sliding-window perplexity)."""
    path = Path(path).expanduser() if path is not None else default_corpus()
    if seq_len is not None and seq_len < 2:
        raise TesseraError(f"seq_len must be >= 2, got {seq_len}")
    text = read_text(path)
    part = _split_part(text, split)
    ids = tokenize(tokenizer, part, max_tokens) if part.strip() else torch.zeros(0, dtype=torch.long)
    if seq_len is None:
        seq_len = max(ids.numel(), 1)
    chunks = chunk(ids, seq_len)
    if len(chunks) < min_chunks:
        where = f"the {split} split ({len(part):,} of {len(text):,} characters) of " if split != "all" else ""
        raise TesseraError(f"{path}: too short: {where}it gives {len(chunks)} chunks of {seq_len} tokens, need at "
                           f"least {min_chunks}; give more text or a smaller --seq-len")
    source_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return DataSplit(split, chunks, str(path), source_hash, seq_len)


def check_disjoint(records: dict[str, dict]) -> None:
    """Refuse data records (role -> `DataSplit.record()`) where two roles used the same split of one source, or
    the same tokens: e.g. candidates selected on the text their result is reported on."""
    roles = list(records)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            ra, rb = records[a], records[b]
            same_source = ra.get("source_sha256") == rb.get("source_sha256")
            if ra.get("sha256") == rb.get("sha256") or same_source and (
                    ra.get("split") == rb.get("split") or "all" in (ra.get("split"), rb.get("split"))):
                raise TesseraError(f"{a} and {b} data overlap (both use the {ra.get('split')} split of "
                                   f"{ra.get('source')}); use disjoint splits")
