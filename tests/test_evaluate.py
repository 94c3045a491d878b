import json
import math

import pytest
import torch

from helpers import random_model, tiny_arch, tiny_tokenizer
from tessera.errors import TesseraError
from tessera.evaluate import accuracy_preserved, evaluate_tasks, mean_kld, render_preserved_markdown
from tessera.evaluate.harness import TesseraLM
from tessera.evaluate.metrics import aggregate, extract_number, item_outcome, mean_stderr, paired_difference
from tessera.evaluate.perplexity import rolling_nll
from tessera.evaluate.scoring import Score, Scorer
from tessera.evaluate.tasks import Item, load_gsm8k, mmlu_prompt

FAVOURITE = 40  # token "w36"


@pytest.fixture
def model():
    m = random_model(tiny_arch(layers=2))
    m.tokenizer = tiny_tokenizer()
    return m


@pytest.fixture
def planted():
    """A model that prefers token FAVOURITE after any context: blocks are identities, the final hidden state
    has a large shared component, and only FAVOURITE's output row reads it."""
    m = random_model(tiny_arch(layers=2))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.model.embed_tokens.weight[:, 0] = 8.0
        m.lm_head.weight[:, 0] = 0.0
        m.lm_head.weight[FAVOURITE, 0] = 3.0
    m.tokenizer = tiny_tokenizer()
    return m


def brute_loglik(model, context_ids, cont_ids):
    seq = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq)[0].float(), -1)
    return sum(lp[len(context_ids) - 1 + j, t].item() for j, t in enumerate(cont_ids))


def test_shared_context_and_pair_paths_equal_brute_force(model):
    scorer = Scorer(model, batch_size=3)
    ctx = "w1 w2 w3 w4 w5"
    conts = [" w6", " w7 w8 w9", " w10 w11"]
    shared = scorer.score_shared(ctx, conts)
    pairs = scorer.score_pairs([(ctx, c) for c in conts])
    for c, s, p in zip(conts, shared, pairs):
        ref = brute_loglik(model, scorer.encode(ctx), scorer.encode(c))
        assert s.loglik == pytest.approx(ref, abs=1e-4) and p.loglik == pytest.approx(ref, abs=1e-4)
        assert s.n_tokens == len(c.split())


def test_shared_prefix_of_consecutive_contexts_is_reused_exactly(model, monkeypatch):
    """A context sharing >= MIN_REUSE leading tokens with the previous one runs only its new tokens (the rest is
    copied from the previous cache), and scores what a fresh computation scores."""
    from tessera.evaluate import scoring

    shots = " ".join(f"w{i % 50 + 1}" for i in range(scoring.MIN_REUSE + 8))  # a shared few-shot prefix
    contexts = [shots + " w3 w4", shots + " w7 w8 w9", "w2 " + shots]  # the last shares no prefix
    conts = [" w6", " w7 w8", " w10"]
    ran = []
    hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda ids, *a, **k: ran.append(ids.shape[1]) or hidden(ids, *a, **k))
    scorer = Scorer(model)
    reused = [scorer.score_shared(c, conts) for c in contexts]
    ctx_lens = [len(scorer.encode(c)) for c in contexts]
    assert ran[0::2] == [ctx_lens[0], 3, ctx_lens[2]]  # the 2nd context ran only " w7 w8 w9"
    for ctx, scores in zip(contexts, reused):
        for cont, s in zip(conts, scores):
            assert s.loglik == pytest.approx(brute_loglik(model, scorer.encode(ctx), scorer.encode(cont)), abs=1e-4)


def test_planted_preference_wins_every_metric(planted):
    scorer = Scorer(planted)
    fav = f" w{FAVOURITE - 4}"
    item = Item(("w1 w2 w3",) * 3, (" w10", fav, " w11 w12"), 1)
    scores = scorer.score_shared(item.contexts[0], item.continuations)
    assert item_outcome(item, scores) == {"acc": 1.0, "acc_norm": 1.0}
    assert scores[1].is_greedy and not scores[0].is_greedy
    wrong = Item(item.contexts, item.continuations, 0)
    assert item_outcome(wrong, scores)["acc"] == 0.0
    # lambada-style: the greedy continuation counts as correct, any other as wrong
    assert item_outcome(Item(("w1",), (fav,), 0, kind="greedy"), scorer.score_pairs([("w1", fav)]))["acc"] == 1.0
    assert item_outcome(Item(("w1",), (" w9",), 0, kind="greedy"), scorer.score_pairs([("w1", " w9")]))["acc"] == 0.0


def test_acc_norm_divides_by_continuation_characters():
    item = Item(("q",) * 2, (" ab", " a much longer answer"), 1)
    scores = [Score(-6.0, False, 1), Score(-10.0, False, 5)]  # -2.0/char vs -0.48/char
    assert item_outcome(item, scores) == {"acc": 0.0, "acc_norm": 1.0}
    # lm-eval divides by len(choice) without the joining space: -4/2 < -5.5/3, though -4/3 > -5.5/4
    close = Item(("q",) * 2, (" ab", " abc"), 1)
    assert item_outcome(close, [Score(-4.0, False, 1), Score(-5.5, False, 1)]) == {"acc": 0.0, "acc_norm": 1.0}


def test_truthfulqa_mc1_and_mc2():
    scores = [Score(math.log(0.2), False, 1), Score(math.log(0.3), False, 1), Score(math.log(0.5), False, 1)]
    assert item_outcome(Item(("q",) * 3, ("a", "b", "c"), 0, kind="mc1"), scores) == {"acc": 0.0}
    mc2 = item_outcome(Item(("q",) * 3, ("a", "b", "c"), (0, 1), kind="mc2"), scores)
    assert mc2["acc"] == pytest.approx(0.5)


def test_aggregate_stderr_groups_and_perplexity():
    assert mean_stderr([1, 0, 1, 0]) == pytest.approx((0.5, math.sqrt(1 / 3 / 4)))
    items = [Item(("c",), ("x",), 0, group=g) for g in ("a", "a", "b")]
    out = aggregate(items, [{"acc": 1.0}, {"acc": 0.0}, {"acc": 1.0}])
    assert out["groups"] == {"a": {"acc": 0.5, "n": 2}, "b": {"acc": 1.0, "n": 1}}
    assert out["acc_macro"] == pytest.approx(0.75) and out["acc"] == pytest.approx(2 / 3)
    lam = aggregate([Item(("c",), ("x",), 0, kind="greedy")] * 2,
                    [{"acc": 1.0, "loglik": -1.0}, {"acc": 0.0, "loglik": -3.0}])
    assert lam["perplexity"] == pytest.approx(math.exp(2.0))


def test_mmlu_prompt_format():
    shot = {"question": "2+2?", "choice0": "3", "choice1": "4", "choice2": "5", "choice3": "6", "answer": "1"}
    row = {"question": "1+1?", "choice0": "2", "choice1": "3", "choice2": "4", "choice3": "5", "answer": "0"}
    assert mmlu_prompt("high_school_math", [shot], row) == (
        "The following are multiple choice questions (with answers) about high school math.\n\n"
        "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"
    )


def test_gsm8k_number_extraction():
    assert extract_number("so she makes 18 dollars.") == "18"
    assert extract_number("#### 1,234") == "1234"
    assert extract_number("no numbers") is None


def test_gsm8k_is_5_shot_from_the_first_rows_which_are_not_scored(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": f"q{i}?", "answer": f"work {i}\n#### {i},000"} for i in range(7)]
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(load_gsm8k(tmp_path))
    assert [it.target for it in items] == ["5000", "6000"]  # rows 0-4 are the shots
    shots = "".join(f"Question: q{i}?\nAnswer: work {i}\n#### {i},000\n\n" for i in range(5))
    assert items[0].contexts == (shots + "Question: q5?\nAnswer:",)
    (tmp_path / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    with pytest.raises(TesseraError, match="more than 5 rows"):
        list(load_gsm8k(tmp_path))


def test_perplexity_full_window_is_exact_and_windows_score_every_token_once(model):
    ids = torch.randint(3, 96, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = -brute_loglik(model, [2], ids)
    assert rolling_nll(model, ids, max_len=64) == pytest.approx(ref, abs=1e-3)
    # with windows: the first window is the same as the full computation for its tokens
    first = -brute_loglik(model, [2], ids[:20])
    calls = []
    orig = model.hidden

    def counting(x, *a, **k):
        calls.append(x.shape[1])
        return orig(x, *a, **k)

    model.hidden = counting
    total = rolling_nll(model, ids, max_len=20, stride=7)
    assert total > first and calls[0] == 20 and len(calls) == 1 + math.ceil((50 - 20) / 7)


def test_kld_zero_for_identical_and_matches_formula(model):
    other = random_model(tiny_arch(layers=2), seed=3)
    chunks = torch.randint(0, 96, (3, 16))
    same = mean_kld(model, model, chunks)
    assert same.kld == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0 and same.tokens == 48
    r = mean_kld(model, other, chunks, batch_size=2)
    with torch.no_grad():
        p, q = torch.log_softmax(model(chunks), -1), torch.log_softmax(other(chunks), -1)
    assert r.kld == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-5)


def test_paired_difference_leaves_out_what_the_items_share():
    a, b = [1, 1, 0, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 0, 1, 1]  # b misses one item a gets; otherwise the same
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(1 / 8) and se == pytest.approx(mean_stderr([0, 1, 0, 0, 0, 0, 0, 0])[1])
    unpaired = math.hypot(mean_stderr(a)[1], mean_stderr(b)[1])
    assert se < unpaired / 2
    with pytest.raises(ValueError, match="same items: 8 against 7"):
        paired_difference(a, b[:7])


def test_accuracy_preserved_table():
    child = {"arc_easy": {"acc_norm": 0.5, "acc": 0.6}, "boolq": {"acc": 0.6}}
    parent = {"arc_easy": {"acc_norm": 0.5, "acc": 0.7}, "boolq": {"acc": 0.8}, "mmlu": {"acc": 0.3}}
    table = accuracy_preserved(child, parent)
    assert [r["preserved"] for r in table["rows"]] == pytest.approx([1.0, 0.75])
    assert table["average"]["preserved"] == pytest.approx(0.55 / 0.65)
    md = render_preserved_markdown(table)
    assert "| boolq | acc | 60.00 | 80.00 | 75.0% |" in md and "average" in md
    assert "diff" not in table["average"] and "paired" not in md  # no per-item outcomes: no paired column


def test_accuracy_preserved_pairs_child_and_parent_item_by_item():
    def res(arc, boolq):
        return {"arc_easy": {"acc_norm": sum(arc) / 4, "samples": [{"acc": 0.0, "acc_norm": v} for v in arc]},
                "boolq": {"acc": sum(boolq) / 4, "samples": [{"acc": v} for v in boolq]}}

    table = accuracy_preserved(res([1, 0, 1, 1], [1, 1, 0, 0]), res([1, 1, 1, 1], [1, 1, 0, 0]))
    arc, boolq = table["rows"]
    assert arc["diff"] == pytest.approx(-0.25) and arc["diff_stderr"] == pytest.approx(0.25)  # acc_norm, not acc
    assert (boolq["diff"], boolq["diff_stderr"]) == (0.0, 0.0)
    assert table["average"]["diff"] == pytest.approx(-0.125) and table["average"]["diff_stderr"] == pytest.approx(0.125)
    md = render_preserved_markdown(table)
    assert "child - parent ± se (paired) |" in md
    assert "| arc_easy | acc_norm | 75.00 | 100.00 | 75.0% | -25.00 ± 25.00 |" in md


@pytest.fixture
def custom_task(tmp_path):
    rows = [{"context": "w1 w2", "choices": [" w3", f" w{FAVOURITE - 4}"], "gold": 1}] * 3
    rows.append({"context": "w5", "choices": [f" w{FAVOURITE - 4}", " w9 w9"], "gold": 0})
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_cache_is_keyed_by_scoring_code_and_results_say_what_made_them(planted, custom_task, tmp_path, monkeypatch):
    import tessera.evaluate.run as run
    from tessera.checkpoint import fingerprint

    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    first = evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]
    assert first["scoring_version"] == run.scoring_version() and first["model_fingerprint"] == fingerprint(planted)
    assert first["task_version"] == 2
    assert evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]["cached"]
    monkeypatch.setattr(run, "scoring_version", lambda: "changed-code")  # e.g. a fix to acc_norm
    again = evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]
    assert "cached" not in again and again["scoring_version"] == "changed-code"


def test_log_samples_gives_each_items_outcome_and_the_cache_keeps_them(planted, custom_task, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    with torch.no_grad():
        planted.lm_head.weight[FAVOURITE - 4, 0] = -3.0  # " w{FAVOURITE-4}" no longer wins: items differ
    plain = evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]
    assert "samples" not in plain
    logged = evaluate_tasks(planted, [str(custom_task)], progress=False, log_samples=True)["mine"]
    assert "cached" not in logged  # the plain entry has no samples: scored again
    acc = [o["acc"] for o in logged["samples"]]
    assert len(acc) == 4 and sum(acc) / 4 == pytest.approx(logged["acc"]) and acc[:3] == [acc[0]] * 3
    again = evaluate_tasks(planted, [str(custom_task)], progress=False, log_samples=True)["mine"]
    assert again["cached"] and [o["acc"] for o in again["samples"]] == acc
    assert "samples" not in evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]


def test_custom_task_end_to_end_and_cache(planted, custom_task, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    first = evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]
    assert first["acc"] == 1.0 and first["n"] == 4 and "cached" not in first
    again = evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]
    assert again["cached"] and again["acc"] == 1.0
    with torch.no_grad():
        planted.lm_head.weight[FAVOURITE, 0] = -3.0  # new weights, new fingerprint: recomputed
    changed = evaluate_tasks(planted, [str(custom_task)], progress=False)["mine"]
    assert "cached" not in changed and changed["acc"] == 0.0


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"context": "w1", "choices": [" w2", " w3"], "gold": 0}\n{"context": "w1", "choices": " w2"',
         "mine.jsonl:2: malformed JSON"),
        ('{"context": "w1", "choices": [" w2", " w3"], "gold": 5}\n', "mine.jsonl:1: gold=5"),
        ('{"context": "w1", "gold": 0}\n', "mine.jsonl:1: row needs 'choices'"),
        ("\n\n", "mine.jsonl: data file is empty"),
    ],
)
def test_bad_task_data_names_file_and_line(planted, tmp_path, content, needle):
    path = tmp_path / "mine.jsonl"
    path.write_text(content)
    with pytest.raises(TesseraError, match=needle):
        evaluate_tasks(planted, [str(path)], progress=False, use_cache=False)


def test_unknown_task(planted):
    with pytest.raises(TesseraError, match="unknown task 'hellaswag'"):
        evaluate_tasks(planted, ["hellaswag"], progress=False)


def test_missing_data_dir_is_one_line(planted, tmp_path):
    with pytest.raises(TesseraError, match="task data file not found"):
        evaluate_tasks(planted, ["arc_easy"], data_dir=tmp_path, progress=False, use_cache=False)


class Req:
    def __init__(self, *args):
        self.args = args


def test_lm_eval_adapter_methods(planted):
    lm = TesseraLM(planted)
    fav = f" w{FAVOURITE - 4}"
    (ll_fav, greedy_fav), (ll_other, greedy_other) = lm.loglikelihood([Req("w1 w2", fav), Req("w1 w2", " w3")])
    assert greedy_fav and not greedy_other and ll_fav > ll_other
    rolling = lm.loglikelihood_rolling([Req("w1 w2 w3")])[0]
    assert rolling == pytest.approx(brute_loglik(planted, [2], [5, 6, 7]), abs=1e-4)
    text = lm.generate_until([Req("w1 w2", {"until": [" w99"], "max_gen_toks": 3})])[0]
    assert text.split() == [fav.strip()] * 3


def test_real_tasks_load_and_score(shared_dir, planted):
    from tessera.evaluate.tasks import TASKS, load_items

    root = shared_dir / "data" / "bench"
    results = evaluate_tasks(planted, ["arc_easy", "winogrande", "mmlu"], limit=3, progress=False, use_cache=False,
                             data_dir=root)
    scorer = Scorer(planted)
    by_hand = [item_outcome(it, [Score(brute_loglik(planted, *scorer.split(c, t)), False, 0)
                                 for c, t in zip(it.contexts, it.continuations)])
               for it in load_items(TASKS["arc_easy"], root, limit=3)]
    assert results["arc_easy"]["n"] == 3
    assert results["arc_easy"]["acc_norm"] == pytest.approx(sum(o["acc_norm"] for o in by_hand) / 3)
    assert results["arc_easy"]["acc"] == pytest.approx(sum(o["acc"] for o in by_hand) / 3)
    assert "acc_norm" not in results["winogrande"]
    assert len(results["mmlu"]["groups"]) == 3  # subjects are interleaved: 3 items, 3 subjects


@pytest.mark.integration
def test_default_parent_real_prompts_shared_equals_full_forward(default_parent, shared_dir):
    """On the real tokenizer (BPE merges at the boundary) and real prompts, the KV-cache fork path, the batched
    pair path and one plain forward pass over context+continuation give the same loglikelihoods."""
    from tessera.evaluate.tasks import TASKS, load_items

    scorer = Scorer(default_parent, batch_size=4)
    root = shared_dir / "data" / "bench"
    for task in ("arc_easy", "mmlu"):
        item = load_items(TASKS[task], root, limit=1)[0]
        shared = scorer.score_shared(item.contexts[0], item.continuations)
        pairs = scorer.score_pairs(list(zip(item.contexts, item.continuations)))
        for cont, s, p in zip(item.continuations, shared, pairs):
            ctx_ids, cont_ids = scorer.split(item.contexts[0], cont)
            assert ctx_ids + cont_ids == scorer.encode(item.contexts[0] + cont)  # the boundary matches lm-eval's
            ref = brute_loglik(default_parent, ctx_ids, cont_ids)
            assert s.loglik == pytest.approx(ref, abs=2e-3) and p.loglik == pytest.approx(ref, abs=2e-3)


def test_eval_cli_writes_results_and_table_and_refuses_to_overwrite(planted, custom_task, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tessera.checkpoint import save
    from tessera.cli import app

    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    save(planted, tmp_path / "m")
    out = tmp_path / "res.json"
    args = ["eval", str(tmp_path / "m"), "--tasks", str(custom_task), "--baseline", str(tmp_path / "m"), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["results"]["mine"]["acc"] == 1.0 and payload["preserved"]["average"]["preserved"] == 1.0
    assert "| mine | acc_norm | 100.00 | 100.00 | 100.0% | +0.00 ± 0.00 |" in out.with_suffix(".md").read_text()
    assert "samples" not in payload["results"]["mine"] and payload["preserved"]["average"]["diff"] == 0.0
    out.write_text("keep me")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "pass --force" in res.output and out.read_text() == "keep me"
    assert CliRunner().invoke(app, args + ["--force"]).exit_code == 0 and json.loads(out.read_text())["results"]
