import json

import pytest
import torch

from helpers import tiny_tokenizer
from tessera.data import SPLITS, check_disjoint, interleave, load_split, read_text, split_ranges, split_text, text_blocks
from tessera.errors import TesseraError


def numbered_corpus(path, n_words=6000, per_line=12, seed=0):
    """Lines of seeded random words: any 8 consecutive words occur once in the whole text."""
    ids = torch.randint(4, 96, (n_words,), generator=torch.Generator().manual_seed(seed)).tolist()
    words = [f"w{i - 4}" for i in ids]
    lines = [" ".join(words[i:i + per_line]) for i in range(0, n_words, per_line)]
    path.write_text("\n".join(lines))
    return path


def test_splits_tile_the_text_disjointly_and_sample_all_of_it(tmp_path):
    text = read_text(numbered_corpus(tmp_path / "c.txt"))
    ranges = {s: split_ranges(text, s) for s in SPLITS}
    covered = sorted(r for rs in ranges.values() for r in rs)
    assert covered == text_blocks(text) and covered[0][0] == 0 and covered[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    chars = {s: sum(b - a for a, b in rs) for s, rs in ranges.items()}
    assert chars["calibration"] > 6 * chars["reporting"] and abs(chars["selection"] - chars["reporting"]) < 0.05 * len(text)
    # every split reaches the end of the text (interleaved blocks, not a head/tail cut)
    assert all(rs[-1][1] > 0.75 * len(text) and rs[0][0] < 0.25 * len(text) for rs in ranges.values())
    assert all(text[b - 1] in "\n " for a, b in covered[:-1])  # blocks end at line breaks or spaces


def test_split_chunks_never_overlap_and_records_name_split_size_and_hash(tmp_path):
    """Calibration, selection and reporting never share a token window: no 8-gram of one split occurs in another."""
    path = tmp_path / "c.jsonl"
    words = read_text(numbered_corpus(tmp_path / "c.txt")).split()
    path.write_text("\n".join(json.dumps({"text": " ".join(words[i:i + 60])}) for i in range(0, len(words), 60)))
    tok = tiny_tokenizer()
    splits = {s: load_split(tok, s, path, seq_len=16) for s in SPLITS}
    text_words = read_text(path).split()
    grams = {}
    for name, sp in splits.items():
        ids = sp.chunks.flatten().tolist()
        grams[name] = {tuple(ids[i:i + 8]) for i in range(len(ids) - 8)}
        assert len(sp) > 0 and sp.chunks.shape[1] == 16
    # the word stream is aperiodic over 8-grams, so a shared 8-gram would mean shared text
    all_grams = [tuple(text_words[i:i + 8]) for i in range(len(text_words) - 8)]
    assert len(set(all_grams)) == len(all_grams)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                shared = grams[a] & grams[b]
                assert not shared, (a, b, len(shared))
    rec = splits["reporting"].record()
    assert rec["split"] == "reporting" and rec["tokens"] == splits["reporting"].tokens == 16 * len(splits["reporting"])
    assert rec["sha256"] != splits["selection"].record()["sha256"] and rec["source_sha256"] == \
        splits["selection"].record()["source_sha256"]
    again = load_split(tok, "reporting", path, seq_len=16)
    assert torch.equal(again.chunks, splits["reporting"].chunks) and again.record() == rec  # deterministic
    assert splits["reporting"].take(2).record()["tokens"] == 32


def test_check_disjoint_refuses_the_same_split_in_two_roles(tmp_path):
    path = numbered_corpus(tmp_path / "c.txt")
    tok = tiny_tokenizer()
    sel, rep = load_split(tok, "selection", path, seq_len=16), load_split(tok, "reporting", path, seq_len=16)
    check_disjoint({"selection": sel.record(), "reporting": rep.record()})
    with pytest.raises(TesseraError, match="selection and reporting data overlap"):
        check_disjoint({"selection": sel.record(), "reporting": sel.take(3).record()})
    with pytest.raises(TesseraError, match="overlap"):
        check_disjoint({"calibration": load_split(tok, "all", path, seq_len=16).record(), "reporting": rep.record()})


def test_jsonl_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(f"w{i % 50}" for i in range(j, j + 40))}) for j in range(5)))
    assert read_text(path).count("\n\n") == 4
    everything = load_split(tiny_tokenizer(), "all", path, seq_len=16)
    assert len(everything) == 200 // 16 and everything.record()["split"] == "all"


@pytest.mark.parametrize("content, name, needle", [
    ("", "e.txt", "data file is empty"),
    ("   \n\n", "e.jsonl", "data file is empty"),
    ('{"text": "w1"}\n{"txt": "w2"}\n', "bad.jsonl", "bad.jsonl:2: row needs 'text'"),
    ("w1 w2 w3", "short.txt", "too short: the calibration split"),
])
def test_bad_or_short_data(tmp_path, content, name, needle):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TesseraError, match=needle):
        load_split(tiny_tokenizer(), "calibration", path, seq_len=16)


def test_unknown_split_and_missing_file(tmp_path):
    with pytest.raises(TesseraError, match="unknown data split 'test'"):
        load_split(tiny_tokenizer(), "test", numbered_corpus(tmp_path / "c.txt"))
    with pytest.raises(TesseraError, match="no such data file"):
        read_text(tmp_path / "nope.txt")


def test_interleaved_mix_gives_every_split_an_equal_share_of_each_text(tmp_path):
    """A mix of two texts: blocks alternate, it stops when the shorter runs out, and each split of the mix file
    holds both texts in about equal shares (so a search on the mix sees both in calibration and selection)."""
    books = read_text(numbered_corpus(tmp_path / "a.txt", n_words=12000, seed=1))
    qa = "\n".join(f"Question: q{i}?\nAnswer: a{i}" for i in range(3000))
    mix = interleave([books, qa])
    assert 1.9 * len(books) < len(mix) < 2.1 * len(books)  # equal shares: the shorter text sets the length
    path = tmp_path / "mix.txt"
    path.write_text(mix)
    for split in ("calibration", "selection"):
        part = split_text(path, split)
        q_chars = sum(len(line) + 1 for line in part.splitlines() if line.startswith(("Question:", "Answer:")))
        assert 0.35 < q_chars / len(part) < 0.65, (split, q_chars / len(part))
    assert split_text(path, "all") == mix
    with pytest.raises(TesseraError, match="at least two non-empty texts"):
        interleave([books, "  "])


def test_items_text_is_the_gold_answer_of_each_item():
    from tessera.evaluate.tasks import Item, items_text

    mc = Item(("Q: sky?\nAnswer:",) * 2, (" green", " blue"), 1)
    pair = Item(("Tom fed the cat", "Tom fed the dog"), (" because it was hungry",) * 2, 0)
    done = Item(("He opened the",), (" door",), 0, kind="greedy")
    assert items_text([mc, pair, done]) == ["Q: sky?\nAnswer: blue", "Tom fed the cat because it was hungry",
                                            "He opened the door"]
    with pytest.raises(TesseraError, match="no single gold text"):
        items_text([Item(("q",), (" a", " b"), (0, 1), kind="mc2")])


def test_answer_split_packs_items_and_marks_the_positions_predicting_their_answers(tmp_path):
    from tessera.evaluate.tasks import answer_split, parse_item_spans
    from test_gguf_export import bpe_tokenizer

    tok = bpe_tokenizer()
    rows = [{"context": f"the cat sat {'on the mat ' * (k % 3)}and", "choices": [" the dog", " the cat ran"],
             "gold": k % 2} for k in range(12)]
    rows.append({"context": "the mat " * 40, "choices": [" a", " b"], "gold": 0})  # longer than a row
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split = answer_split(tok, parse_item_spans(f"{task}:2-13"), 32, data_dir=tmp_path)
    assert split.chunks.shape[1] == 32 and split.mask.shape == split.chunks.shape and len(split) > 1
    assert "(1 items left out: longer than a row" in split.source
    # the marked positions predict exactly the gold answers' tokens, item after item
    want = [t for r in rows[2:12] for t in tok(r["context"] + r["choices"][r["gold"]], add_special_tokens=False)[
        "input_ids"][len(tok(r["context"], add_special_tokens=False)["input_ids"]):]]
    assert split.chunks.roll(-1, 1)[split.mask].tolist() == want
    assert not split.mask[:, -1].any() and split.record()["positions"] == len(want)
    fewer = answer_split(tok, parse_item_spans(f"{task}:2-11"), 32, data_dir=tmp_path)
    assert split.record()["sha256"] != fewer.record()["sha256"]
    for bad in ("arc_easy:5", "arc_easy:9-3", "nope:0-4", ""):
        with pytest.raises(TesseraError):
            parse_item_spans(bad)
