import json

import pytest

from helpers import tiny_tokenizer
from tessera.data import load_chunks, read_text
from tessera.errors import TesseraError


def test_jsonl_text_and_chunks(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(f"w{i % 50}" for i in range(j, j + 40))}) for j in range(5)))
    assert read_text(path).count("\n\n") == 4
    chunks = load_chunks(tiny_tokenizer(), path, seq_len=16, heldout_fraction=0.2)
    assert chunks.train.shape[1] == 16 and len(chunks.train) + len(chunks.heldout) == 200 // 16
    assert len(chunks.heldout) == 2  # the last chunks are held out, deterministically
    again = load_chunks(tiny_tokenizer(), path, seq_len=16, heldout_fraction=0.2)
    assert (again.heldout == chunks.heldout).all()


@pytest.mark.parametrize("content, name, needle", [
    ("", "e.txt", "data file is empty"),
    ("   \n\n", "e.jsonl", "data file is empty"),
    ('{"text": "w1"}\n{"txt": "w2"}\n', "bad.jsonl", "bad.jsonl:2: row needs 'text'"),
    ("w1 w2 w3", "short.txt", "too short: 0 chunks of 16 tokens"),
])
def test_bad_or_short_data(tmp_path, content, name, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TesseraError, match=needle):
        load_chunks(tiny_tokenizer(), path, seq_len=16)


def test_missing_file(tmp_path):
    with pytest.raises(TesseraError, match="no such data file"):
        read_text(tmp_path / "nope.txt")
