"""Text data for calibration, distillation, perplexity and KLD: files -> token ids -> fixed-length chunks.

A text file is read whole; a `.jsonl` file contributes the `text` field of each row. Token ids are cut into
non-overlapping chunks of `seq_len` (the tail that does not fill a chunk is dropped). A deterministic split
keeps held-out chunks (for KLD / validation) apart from training / calibration chunks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TokenChunks:
    """Fixed-length token chunks, split deterministically into train (calibration) and held-out sets."""

    train: torch.Tensor  # (N, seq_len)
    heldout: torch.Tensor  # (M, seq_len)


def chunk(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def load_chunks(tokenizer, path: str | Path | None = None, *, seq_len: int = 256, max_tokens: int | None = None,
                heldout_fraction: float = 0.05, min_chunks: int = 1) -> TokenChunks:
    """Read, tokenize and chunk a data file (default: the shared corpus); the last chunks are held out."""
    path = Path(path) if path is not None else default_corpus()
    if seq_len < 2:
        raise TesseraError(f"seq_len must be >= 2, got {seq_len}")
    chunks = chunk(tokenize(tokenizer, read_text(path), max_tokens), seq_len)
    if len(chunks) < min_chunks:
        raise TesseraError(f"{path}: too short: {len(chunks)} chunks of {seq_len} tokens, need at least "
                           f"{min_chunks}; give more text or a smaller --seq-len")
    n_held = min(len(chunks) - 1, max(1, round(len(chunks) * heldout_fraction))) if len(chunks) > 1 else 0
    return TokenChunks(train=chunks[: len(chunks) - n_held], heldout=chunks[len(chunks) - n_held:])
