"""Puzzle stages 2-3: blockwise local distillation (decoupled, resumable, split across processes) and
replace-1-block scoring (KL to the parent, cached), on tiny random parents."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tessera
from helpers import random_model, tiny_arch
from tessera.arch import AttentionSpec, FFNSpec
from tessera.data import DataSplit
from tessera.errors import TesseraError
from tessera.evaluate.kld import mean_kld
from tessera.model import Transformer
from tessera.puzzle.bld import BLDConfig, is_trained, load_report, normalised_mse, run_bld, trainable, variant_state
from tessera.puzzle.library import LibraryConfig, Variant, build_library, init_variant, parent_variants
from tessera.puzzle.scoring import ScoreTable, load_scores, rich_score_table, score_library, score_rows

LIB_CFG = LibraryConfig(ffn_fractions=(0.5, 0.25), ffn_multiple=8)
BLD_CFG = BLDConfig(tokens=10**6, batch=4, lr=1e-3, warmup_steps=5, save_every=3)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 96, (40, 16), generator=g), torch.randint(0, 96, (8, 16), generator=g)


@pytest.fixture
def lib(teacher, tmp_path):
    train, _ = data()
    return build_library(teacher, LIB_CFG, train[:16], tmp_path / "lib", parent_source="tiny")


def bld_weights(library) -> dict[str, dict[str, torch.Tensor]]:
    root = Path(library.path) / "bld"
    return {str(f.relative_to(root)): load_file(str(f)) for f in sorted(root.glob("layer-*/*.safetensors"))}


def test_bld_lowers_every_variants_normalised_mse(teacher, lib):
    train, held_out = data()
    before = normalised_mse(lib, teacher, held_out, trained=False)
    report = run_bld(lib, teacher, train, BLD_CFG, progress=False)
    after = normalised_mse(lib, teacher, held_out)
    trained = {(i, v.key) for i in range(4) for v in trainable(lib, i)}
    assert trained and set(report.variants) == trained
    for k in trained:
        assert after[k] < before[k], (k, before[k], after[k])
        assert report.variants[k]["steps"] == 10
    for i in range(4):  # the parent's own sub-blocks are exact and left alone
        for v in parent_variants(lib.arch, i):
            assert before[(i, v.key)] == 0.0 and after[(i, v.key)] == 0.0 and not is_trained(lib, i, v)
    # a no_op attention has no weights: replacing the layer's attention by nothing is not trained, and scores > 0
    assert (0, "attn.no_op") not in trained
    saved = load_report(lib)
    assert saved is not None and set(saved.variants) == trained and saved.data["used_chunks"] == 40


def test_variant_state_is_trained_weights_else_the_initialisation(teacher, lib):
    train, _ = data()
    v = Variant("ffn", FFNSpec("swiglu", 32))
    init = init_variant(teacher, 1, v, lib.stats)
    assert all(torch.equal(init[k], t) for k, t in variant_state(lib, teacher, 1, v).items())
    run_bld(lib, teacher, train, BLD_CFG, layers=[1], progress=False)
    state = variant_state(lib, teacher, 1, v)
    assert set(state) == set(init) and not torch.equal(state["mlp.up_proj.weight"], init["mlp.up_proj.weight"])
    assert state["mlp.up_proj.weight"].dtype == teacher.model.embed_tokens.weight.dtype
    assert not is_trained(lib, 0, v) and is_trained(lib, 1, v)
    assert load_report(lib) is None  # not every layer is trained yet


def test_killed_bld_resumes_to_the_same_weights(teacher, lib, tmp_path):
    train, _ = data()
    shutil.copytree(lib.path, tmp_path / "lib2")
    lib2 = type(lib).load(tmp_path / "lib2")
    run_bld(lib, teacher, train, BLD_CFG, progress=False)
    want = bld_weights(lib)

    class Killed(Exception):
        pass

    def kill(layer, batch):
        if (layer, batch) == (2, 7):  # after the checkpoint at step 6, before the one at 9
            raise Killed

    with pytest.raises(Killed):
        run_bld(lib2, teacher, train, BLD_CFG, progress=False, on_step=kill)
    root = Path(lib2.path) / "bld"
    assert (root / "layer-001" / "layer.json").is_file() and not (root / "layer-002" / "layer.json").exists()
    resume = sorted((root / "layer-002").glob("*.resume.pt"))
    assert resume and torch.load(resume[0], weights_only=True)["step"] == 6
    steps = []
    run_bld(lib2, teacher, train, BLD_CFG, progress=False, on_step=lambda i, b: steps.append((i, b)))
    assert steps[0] == (2, 6)  # layers 0-1 were done; layer 2 restarts from its checkpoint
    got = bld_weights(lib2)
    assert set(got) == set(want)
    for name in want:
        for k in want[name]:
            assert torch.equal(got[name][k], want[name][k]), (name, k)
    assert not list(root.glob("layer-*/*.resume.pt"))


def test_bld_refuses_a_changed_config_and_held_out_data(teacher, lib):
    train, _ = data()
    run_bld(lib, teacher, train, BLD_CFG, layers=[0], progress=False)
    with pytest.raises(TesseraError, match=r"different config\.lr.*--force"):
        run_bld(lib, teacher, train, BLDConfig(tokens=10**6, batch=4, lr=2e-3, warmup_steps=5), progress=False)
    # save_every does not change the weights: a resumed run may change it
    run_bld(lib, teacher, train, BLDConfig(tokens=10**6, batch=4, lr=1e-3, warmup_steps=5, save_every=5),
            layers=[1], progress=False)
    selection = DataSplit("selection", train, "corpus.txt", "abc", 16)
    with pytest.raises(TesseraError, match="calibration split"):
        run_bld(lib, teacher, selection, BLD_CFG, progress=False, force=True)
    with pytest.raises(TesseraError, match="tokens"):
        BLDConfig(tokens=0)


def swapped_parent(parent: Transformer, layer: int, variant: Variant, state: dict) -> Transformer:
    """The parent with one sub-block of `layer` replaced, built as a whole model (the slow way scoring avoids)."""
    block = parent.arch.blocks[layer]
    spec = block.__class__(variant.spec, block.ffn) if variant.part == "attention" else block.__class__(
        block.attention, variant.spec)
    arch = parent.arch.with_blocks(tuple(spec if i == layer else b for i, b in enumerate(parent.arch.blocks)))
    child = Transformer(arch)
    sd = {k: v for k, v in parent.state_dict().items() if not k.startswith(f"model.layers.{layer}.")}
    own = "attention" if variant.part == "ffn" else "ffn"
    keep = parent_variants(parent.arch, layer)[0 if own == "attention" else 1]
    sd.update({f"model.layers.{layer}.{k}": v for k, v in init_variant(parent, layer, keep, {}).items()})
    sd.update({f"model.layers.{layer}.{k}": v for k, v in state.items()})
    child.load_state_dict(sd, strict=True)
    return child.eval()


def test_replace_one_block_scores(teacher, lib, tmp_path):
    train, held_out = data()
    run_bld(lib, teacher, train, BLD_CFG, layers=[1, 2], progress=False)
    table = score_library(lib, teacher, held_out, tmp_path / "scores", batch_size=3, max_branches=7, progress=False)
    assert set(table.kl) == {(i, v.key) for i in range(4) for v in lib.variants(i)}
    for i in range(4):
        for v in parent_variants(lib.arch, i):  # the parent's own sub-block scores exactly 0
            assert table.kl[(i, v.key)] == 0.0
            assert table.lm_loss[(i, v.key)] == pytest.approx(table.parent_lm_loss, abs=1e-6)
        assert table.kl[(i, "attn.no_op")] > 0 and table.kl[(i, "ffn.no_op")] > 0
    # each score is the KL of the whole swapped model, trained (layer 2) or untrained (layer 0) weights
    for layer, key in ((2, "attn.gqa-kv1"), (2, "ffn.swiglu-16"), (0, "ffn.linear"), (3, "attn.no_op")):
        v = Variant.from_key(key)
        child = swapped_parent(teacher, layer, v, variant_state(lib, teacher, layer, v))
        want = mean_kld(teacher, child, held_out, batch_size=3).kld
        assert table.kl[(layer, key)] == pytest.approx(want, rel=1e-4, abs=1e-7)
    # cached: a second call computes nothing, and the file round-trips
    import tessera.stream

    def boom(*a, **k):
        raise AssertionError("recomputed a cached score")

    orig = tessera.stream.run_layers
    tessera.stream.run_layers = boom
    try:
        again = score_library(lib, teacher, held_out, tmp_path / "scores", progress=False)
    finally:
        tessera.stream.run_layers = orig
    assert again.kl == table.kl
    assert load_scores(tmp_path / "scores").kl == table.kl
    # a variant retrained by BLD is rescored (its weights hash changed); the others stay cached
    run_bld(lib, teacher, train, BLD_CFG, layers=[3], progress=False)
    calls = []
    tessera.stream.run_layers = lambda *a, **k: calls.append(k.get("branches")) or orig(*a, **k)
    try:
        third = score_library(lib, teacher, held_out, tmp_path / "scores", progress=False)
    finally:
        tessera.stream.run_layers = orig
    rescored = {b.name for b in calls[0]}
    assert rescored == {f"3:{v.key}" for v in trainable(lib, 3)}
    assert third.kl[(3, "attn.gqa-kv1")] != table.kl[(3, "attn.gqa-kv1")]


def test_score_table_feeds_the_mip_and_prints(teacher, lib, tmp_path):
    from rich.console import Console

    from tessera.plots import plot_score_heatmap
    from tessera.puzzle.costs import Target, predicted_costs
    from tessera.puzzle.mip import Constraint, solve

    _, held_out = data()
    table = score_library(lib, teacher, held_out, tmp_path / "s", layers=[0, 1, 2, 3], progress=False)
    assert isinstance(table, ScoreTable)
    variants = {v for i in range(4) for v in lib.variants(i)}
    costs = predicted_costs(lib.arch, variants, Target("h100", "bf16", "128/128", 1))
    # unconstrained, the best child is the parent (score 0); with half the parameters it must give some up
    assert solve(table.kl, costs)[0].objective == 0.0
    half = solve(table.kl, costs, [Constraint("params", costs.parent.params * 0.6)])[0]
    assert half.objective > 0
    keys, rows = score_rows(table, lib)
    assert len(rows) == 4 and "attn.no_op" in keys and rows[0][keys.index("attn.no_op")] > 0
    console = Console(width=250, record=True)
    console.print(rich_score_table(table, lib))
    assert "attn.gqa-kv1" in console.export_text()
    png = plot_score_heatmap(rows, keys, tmp_path / "heat.png")
    assert png.stat().st_size > 1000


def test_scoring_refuses_calibration_data_and_overlap(teacher, lib, tmp_path):
    train, _ = data()
    calibration = DataSplit("calibration", train, "corpus.txt", "abc", 16)
    with pytest.raises(TesseraError, match="selection split"):
        score_library(lib, teacher, calibration, tmp_path / "s", progress=False)
    run_bld(lib, teacher, train, BLD_CFG, layers=[0], progress=False)
    with pytest.raises(TesseraError, match="overlap"):
        score_library(lib, teacher, train, tmp_path / "s", progress=False)
    other = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64), seed=5)
    with pytest.raises(TesseraError, match="different parent"):
        score_library(lib, other, data()[1], tmp_path / "s", progress=False)


def test_scores_of_a_streamed_parent_equal_in_memory(teacher, lib, tmp_path):
    from tessera.stream import open_streamed

    train, held_out = data()
    run_bld(lib, teacher, train, BLD_CFG, layers=[1], progress=False)
    tessera.save(teacher, tmp_path / "parent", max_shard_bytes=20_000)
    streamed = open_streamed(tmp_path / "parent")
    want = score_library(lib, teacher, held_out, tmp_path / "a", layers=[1, 2], progress=False)
    got = score_library(lib, streamed, held_out, tmp_path / "b", layers=[1, 2], progress=False)
    assert got.kl == want.kl and got.lm_loss == want.lm_loss


@pytest.mark.slow
def test_two_process_bld_matches_one_process(tmp_path):
    """torchrun with 2 gloo processes (rank r takes layers r::2) writes the same weights as one process."""
    worker = Path(__file__).parent / "puzzle_bld_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(tessera.__file__).parents[1])}
    one = subprocess.run([sys.executable, str(worker), str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
           str(worker), str(tmp_path / "two")]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    lib_one = tessera.puzzle.library.Library.load(tmp_path / "one")
    lib_two = tessera.puzzle.library.Library.load(tmp_path / "two")
    a, b = bld_weights(lib_one), bld_weights(lib_two)
    assert a and set(a) == set(b)
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    report = json.loads((tmp_path / "two" / "bld" / "bld.json").read_text())
    assert len(report["variants"]) == len(a)


def test_attention_variant_trains_beside_the_parent_ffn(teacher, lib):
    """Decoupled BLD: an attention variant's loss goes through the parent's FFN; GQA with fewer KV heads keeps
    the parent's query and output projections as its starting point."""
    v = Variant("attention", AttentionSpec("gqa", 1))
    assert v in trainable(lib, 0) and Variant("attention", AttentionSpec("no_op")) not in trainable(lib, 0)
    state = init_variant(teacher, 0, v, lib.stats)
    assert torch.equal(state["self_attn.q_proj.weight"], teacher.model.layers[0].self_attn.q_proj.weight)


def test_bld_of_a_streamed_parent_equals_in_memory(teacher, lib, tmp_path):
    from tessera.stream import open_streamed

    train, _ = data()
    shutil.copytree(lib.path, tmp_path / "lib2")
    lib2 = type(lib).load(tmp_path / "lib2")
    tessera.save(teacher, tmp_path / "parent", max_shard_bytes=20_000)
    streamed = open_streamed(tmp_path / "parent")
    run_bld(lib, teacher, train, BLD_CFG, layers=[0, 2], progress=False)
    run_bld(lib2, streamed, train, BLD_CFG, layers=[0, 2], progress=False)
    want, got = bld_weights(lib), bld_weights(lib2)
    assert want and set(got) == set(want)
    for name in want:
        for k in want[name]:
            assert torch.equal(got[name][k], want[name][k]), (name, k)
    v = Variant("attention", AttentionSpec("gqa", 1))
    assert all(torch.equal(a, b) for a, b in zip(variant_state(lib2, streamed, 1, v).values(),
                                                  variant_state(lib, teacher, 1, v).values(), strict=True))


def test_bld_of_a_heterogeneous_parent(tmp_path):
    """Parent layers with linear / no-op sub-blocks: the FFN's input is taken where the parent has one (after a
    linear attention, the layer input after a no-op one) and every offered variant still gets better."""
    from helpers import mixed_arch

    parent = random_model(mixed_arch())
    train, held_out = data()
    lib = build_library(parent, LIB_CFG, train[:16], tmp_path / "lib", parent_source="mixed")
    before = normalised_mse(lib, parent, held_out, trained=False)
    run_bld(lib, parent, train, BLD_CFG, progress=False)
    after = normalised_mse(lib, parent, held_out)
    trained = {(i, v.key) for i in range(parent.arch.num_layers) for v in trainable(lib, i)}
    # layer 3: no-op attention (FFN variants see the layer input), layer 4: no FFN (attention variants alone);
    # layer 2 (linear + linear) offers nothing to train beyond the parent's own and no-ops
    assert {i for i, _ in trained} == {0, 1, 3, 4}
    assert (3, "ffn.linear") in trained and (4, "attn.gqa-kv1") in trained
    for k in trained:
        assert after[k] < before[k], (k, before[k], after[k])


def test_masked_scores_count_only_the_marked_positions(teacher, lib, tmp_path):
    """A DataSplit mask (e.g. the answers of task items) restricts the KL and LM loss to the marked positions."""
    from tessera.evaluate.kld import kl_per_token

    _, held = data()
    mask = torch.zeros_like(held, dtype=torch.bool)
    mask[:, 3:9] = True
    mask[::2, 12] = True
    split = DataSplit("answers", held, "items", "abc", 16, mask=mask)
    table = score_library(lib, teacher, split, tmp_path / "m", batch_size=3, max_branches=5, progress=False)
    full = score_library(lib, teacher, held, tmp_path / "f", batch_size=3, progress=False)
    with torch.no_grad():
        ref = teacher(held)
        for layer, key in ((1, "attn.no_op"), (2, "ffn.linear"), (0, "attn.gqa-kv1")):
            v = Variant.from_key(key)
            child = swapped_parent(teacher, layer, v, variant_state(lib, teacher, layer, v))
            kl = kl_per_token(ref, child(held))
            assert table.kl[(layer, key)] == pytest.approx(kl[mask].mean().item(), rel=1e-4)
            assert table.kl[(layer, key)] != pytest.approx(full.kl[(layer, key)], rel=1e-3)
        nll = -torch.log_softmax(ref.float(), -1).gather(-1, held.roll(-1, 1)[..., None])[..., 0]
    assert table.parent_lm_loss == pytest.approx(nll[mask].mean().item(), rel=1e-5)
    assert table.tokens == int(mask.sum()) and table.data["positions"] == int(mask.sum())
    # every position that predicts a token: the unmasked LM losses (the unmasked KL also counts the last position)
    every = torch.ones_like(mask)
    every[:, -1] = False
    same = score_library(lib, teacher, DataSplit("answers", held, "items", "abc", 16, mask=every), tmp_path / "a",
                         batch_size=3, progress=False)
    assert same.lm_loss == pytest.approx(full.lm_loss, rel=1e-5) and same.parent_lm_loss == pytest.approx(
        full.parent_lm_loss, rel=1e-6)
    # a mask on a chunk's last position (it predicts no token) is refused
    with pytest.raises(TesseraError, match="never a chunk's last one"):
        score_library(lib, teacher, DataSplit("answers", held, "items", "abc", 16, mask=~every), tmp_path / "b",
                      progress=False)
