"""Streaming execution (tessera.stream): a model read layer by layer from its shards gives the numbers of the model
loaded whole, spilled activations give the numbers of activations in RAM, and a broken checkpoint is one line."""

import json

import pytest
import torch

import tessera
from helpers import assert_one_line_error, cli, mixed_arch, random_model, tiny_arch, tiny_tokenizer
from tessera.errors import TesseraError
from tessera.stream import Branch, Budget, LazyLogits, open_streamed, run_layers, should_stream
from tessera.stream.model import load_model


def files_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def saved(tmp_path):
    """A 4-layer tiny parent saved in several shards (bf16 and fp32 copies)."""
    model = random_model(tiny_arch(layers=4, heads=4, kv_heads=2, ffn=64))
    model.tokenizer = tiny_tokenizer()
    tessera.save(model, tmp_path / "fp32", max_shard_bytes=30_000)
    tessera.save(model.to(torch.bfloat16), tmp_path / "bf16", max_shard_bytes=15_000)
    return tmp_path


@pytest.mark.parametrize("arch", [tiny_arch(layers=3, tied=True), mixed_arch()], ids=["tied", "heterogeneous"])
def test_streamed_model_equals_loaded(tmp_path, arch):
    model = random_model(arch)
    tessera.save(model, tmp_path / "m", max_shard_bytes=10_000)
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    streamed = open_streamed(tmp_path / "m")
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tessera.load(tmp_path / "m")(ids)
        got = streamed(ids)  # plain forward: each layer materialised in turn and let go
    assert torch.equal(got, want)
    assert streamed.streamed.loads == arch.num_layers
    assert all(p.is_meta for p in streamed.model.layers.parameters())  # nothing stays behind
    assert tessera.fingerprint(streamed) == tessera.fingerprint(tessera.load(tmp_path / "m"))


@pytest.mark.parametrize("source, dtype", [("bf16", None), ("bf16", torch.float32)])
def test_streamed_dtype_follows_load(saved, source, dtype):
    """The checkpoint's dtype by default (bf16 included), or the requested one, exactly as tessera.load does."""
    loaded = tessera.load(saved / source, dtype=dtype)
    streamed = open_streamed(saved / source, dtype=dtype)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(streamed(ids), loaded(ids))
    with streamed.streamed.layer(1) as block:
        assert block.mlp.up_proj.weight.dtype == loaded.dtype
        assert torch.equal(block.mlp.up_proj.weight, loaded.model.layers[1].mlp.up_proj.weight)
    assert tessera.fingerprint(streamed) == tessera.fingerprint(loaded)


@pytest.mark.parametrize("budget", [None, 0], ids=["ram", "spilled"])
def test_run_layers_equals_batched_forward(saved, budget):
    """Layer-major execution (each layer once, every batch through it) = batch-major `model(ids)`, bit for bit,
    with activations in RAM or spilled to disk."""
    loaded = tessera.load(saved / "fp32")
    streamed = open_streamed(saved / "fp32")
    chunks = torch.randint(0, 96, (7, 12), generator=torch.Generator().manual_seed(3))
    spill = Budget(budget) if budget is not None else Budget()
    fwd = run_layers(streamed, chunks, batch_size=3, budget=spill)
    assert spill.spilled == (1 if budget == 0 else 0) and fwd.main.spilled == (budget == 0)
    assert streamed.streamed.loads == 4 and fwd.layers_read == 4
    with torch.no_grad():
        for b, s in enumerate(fwd.batches):
            assert torch.equal(fwd.logits(b), loaded(chunks[s]))
    fwd.close()
    spill.close()


def test_branches_equal_ablated_models(saved):
    """A branch that skips layer 1 (on the first 5 sequences) ends where the model without layer 1 ends."""
    from tessera.importance import ablated

    loaded = tessera.load(saved / "fp32")
    streamed = open_streamed(saved / "fp32")
    chunks = torch.randint(0, 96, (7, 12), generator=torch.Generator().manual_seed(4))
    skip = Branch("skip1", 1, lambda block, x, cos, sin: x, rows=5)
    fwd = run_layers(streamed, chunks, batch_size=3, branches=[skip], budget=Budget(0))
    assert streamed.streamed.loads == 4  # one read per layer, branch or not
    assert [tuple(s) for s in fwd.branches["skip1"].shapes] == [(3, 12, 32), (2, 12, 32)]
    with torch.no_grad(), ablated(loaded, 1):
        assert torch.equal(fwd.logits(0, "skip1"), loaded(chunks[0:3]))
        assert torch.equal(fwd.logits(1, "skip1"), loaded(chunks[3:5]))


def test_streamed_save_is_byte_identical(saved, tmp_path):
    """Written tensor by tensor (shard by shard), a checkpoint is byte for byte what tessera.save writes."""
    from tessera.stream.writer import checkpoint_writer, save_order

    model = tessera.load(saved / "bf16")
    tessera.save(model, tmp_path / "whole", max_shard_bytes=15_000)
    state = model.state_dict()
    with checkpoint_writer(tmp_path / "parts", model.arch, dtype=model.dtype, provenance=model.provenance,
                           tokenizer=model.tokenizer, max_shard_bytes=15_000) as w:
        for name in save_order(w.expected):
            w.add(name, state[name])
    assert len(list((tmp_path / "parts").glob("*.safetensors"))) > 2
    assert files_bytes(tmp_path / "parts") == files_bytes(tmp_path / "whole")


def test_streamed_save_refuses_wrong_order_and_leaves_nothing(saved, tmp_path):
    from tessera.stream.writer import checkpoint_writer

    model = tessera.load(saved / "fp32")
    with pytest.raises(RuntimeError, match="expected lm_head.weight"):
        with checkpoint_writer(tmp_path / "x", model.arch, dtype=model.dtype, provenance=[]) as w:
            w.add("model.norm.weight", model.model.norm.weight)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))


def test_kld_streamed_equals_in_memory(saved, tmp_path):
    """KL(parent || child) with the parent streamed (and with both streamed) = with both loaded whole."""
    from tessera.evaluate import mean_kld
    from tessera.importance import random_importance
    from tessera.prune import PruneTarget, prune

    parent = tessera.load(saved / "fp32")
    child = prune(parent, random_importance(parent), PruneTarget(ffn=40, hidden=24))
    tessera.save(child, tmp_path / "child", max_shard_bytes=8_000)
    chunks = torch.randint(0, 96, (5, 16), generator=torch.Generator().manual_seed(5))
    want = mean_kld(parent, child, chunks, batch_size=2)
    assert want.kld > 0.01
    assert mean_kld(open_streamed(saved / "fp32"), child, chunks, batch_size=2) == want
    assert mean_kld(open_streamed(saved / "fp32"), open_streamed(tmp_path / "child"), chunks, batch_size=2) == want


def test_lazy_logits_is_indexed_by_batch(saved):
    fwd = run_layers(open_streamed(saved / "fp32"), torch.zeros(5, 4, dtype=torch.long), batch_size=2)
    logits = LazyLogits(fwd)
    assert len(logits) == 3 and logits[2].shape == (1, 4, 96)


# ---------------------------------------------------------------------------- stages on a streamed parent
def assert_same_importance(a, b):
    assert a.meta == b.meta
    for kind in ("heads", "head_drop_kl", "neurons"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert set(x) == set(y) and all(torch.equal(x[i], y[i]) for i in x), kind
    for name in ("channels", "block_importance", "drop_loss", "drop_kl"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), name


@pytest.mark.parametrize("source, dtype", [("fp32", None), ("bf16", None), ("bf16", torch.float32)])
def test_importance_streamed_equals_in_memory(saved, source, dtype):
    """Every activation score (heads, neurons, channels, BI, drop-one-layer loss/KL, drop-one-head KL) of a parent
    streamed layer by layer, its activations spilled to disk, equals the scores of the parent loaded whole."""
    from tessera.importance import activation_importance

    chunks = torch.randint(0, 96, (7, 12), generator=torch.Generator().manual_seed(6))
    loaded = tessera.load(saved / source, dtype=dtype)
    want = activation_importance(loaded, chunks, batch_size=3, with_drop_loss=True, with_head_drop=True,
                                 drop_samples=4)
    streamed = open_streamed(saved / source, dtype=dtype)
    got = activation_importance(streamed, chunks, batch_size=3, with_drop_loss=True, with_head_drop=True,
                                drop_samples=4, budget=Budget(0))
    assert_same_importance(got, want)
    assert float(want.drop_kl.min()) > 0 and len(want.head_drop_kl) == 4 and want.channels.shape == (32,)
    assert streamed.streamed.loads == 4  # one read of each layer for all the statistics and branches together
    assert all(p.is_meta for p in streamed.model.layers.parameters())


def test_drop_scores_equal_ablated_forwards(saved):
    """The branch-based drop scores are what a whole forward of the ablated model gives."""
    from tessera.importance import ablated, drop_head_scores, drop_layer_scores, lm_loss

    model = tessera.load(saved / "fp32")
    chunks = torch.randint(0, 96, (5, 10), generator=torch.Generator().manual_seed(7))
    loss, kl = drop_layer_scores(model, chunks, batch_size=2)
    heads = drop_head_scores(model, chunks, batch_size=2)
    with torch.no_grad():
        ref = [torch.log_softmax(model(chunks[s:s + 2])[:, :-1].float(), -1) for s in range(0, 5, 2)]
        base, _ = lm_loss(model, chunks, 2)
        for i in (0, 3):
            with ablated(model, i):
                got_loss, got_kl = lm_loss(model, chunks, 2, reference=ref)
            assert loss[i].item() == pytest.approx(got_loss - base, rel=1e-4, abs=1e-6)
            assert kl[i].item() == pytest.approx(got_kl, rel=1e-4, abs=1e-7)
        with ablated(model, 2, 1):
            assert heads[2][1].item() == pytest.approx(lm_loss(model, chunks, 2, reference=ref)[1], rel=1e-4, abs=1e-7)


TARGETS = [dict(ffn=40, hidden=24), dict(heads=2, kv_heads=1, ffn=(48, 32, 40), layers=3, head_metric="drop_kl"),
           dict(drop_layers=(0,), hidden=16)]


@pytest.mark.parametrize("target", TARGETS, ids=["width", "heads-kv-depth", "depth-hidden"])
@pytest.mark.parametrize("source", ["fp32", "bf16"])
def test_prune_streamed_equals_in_memory(saved, tmp_path, source, target):
    """A streamed parent pruned and written layer by layer, shard by shard, gives byte for byte the checkpoint of
    the parent loaded whole, pruned in memory and saved."""
    from tessera.importance import activation_importance
    from tessera.prune import PruneTarget, prune, prune_to

    chunks = torch.randint(0, 96, (6, 12), generator=torch.Generator().manual_seed(8))
    loaded = tessera.load(saved / source)
    imp = activation_importance(loaded, chunks, with_head_drop=True)
    t = PruneTarget(**target)
    tessera.save(prune(loaded, imp, t), tmp_path / "whole", max_shard_bytes=6_000)
    streamed = open_streamed(saved / source)
    plan = prune_to(streamed, imp, t, tmp_path / "parts", max_shard_bytes=6_000)
    assert files_bytes(tmp_path / "parts") == files_bytes(tmp_path / "whole")
    assert len(list((tmp_path / "parts").glob("*.safetensors"))) > 1
    assert plan.arch == tessera.load(tmp_path / "parts").arch
    assert all(p.is_meta for p in streamed.model.layers.parameters())  # no parent layer stayed behind
    assert streamed.streamed.loads == 0  # layers read tensor by tensor (state), the model's layers never built


def test_cli_importance_and_prune_stream_on_equal_off(saved, tmp_path):
    from tessera.importance import Importance

    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"w{i % 90}" for i in range(4000)))
    common = ["--data", data, "--samples", 4, "--seq-len", 16, "--drop-samples", 2]
    for mode in ("on", "off"):
        r = cli("importance", saved / "bf16", "--out", tmp_path / f"{mode}.safetensors", *common, "--stream", mode)
        assert r.exit_code == 0, r.output
    assert_same_importance(Importance.load(tmp_path / "on.safetensors"), Importance.load(tmp_path / "off.safetensors"))
    for mode in ("on", "off"):
        r = cli("prune", saved / "bf16", "--out", tmp_path / f"child-{mode}", "--scores", tmp_path / "on.safetensors",
                "--ffn", 32, "--hidden", 24, "--stream", mode)
        assert r.exit_code == 0, r.output
    assert files_bytes(tmp_path / "child-on") == files_bytes(tmp_path / "child-off")
    r = cli("prune", saved / "bf16", "--out", tmp_path / "x", "--target-params", 0.5, "--stream", "on", *common)
    assert_one_line_error(r, "--target-params")


def test_prune_to_writes_the_requested_dtype(saved, tmp_path):
    """A bf16 parent computed in fp32 (a CPU) and pruned streaming can be written in bf16: the fp32 child cast."""
    from tessera.importance import random_importance
    from tessera.prune import PruneTarget, prune, prune_to

    streamed = open_streamed(saved / "bf16", dtype=torch.float32)
    imp = random_importance(streamed)
    imp.meta["fingerprint"] = tessera.fingerprint(streamed)
    t = PruneTarget(ffn=40, hidden=24, kv_heads=1)
    prune_to(streamed, imp, t, tmp_path / "c", dtype=torch.bfloat16)
    got = tessera.load(tmp_path / "c")
    want = prune(tessera.load(saved / "bf16", dtype=torch.float32), imp, t)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert got.dtype == torch.bfloat16 and config["torch_dtype"] == "bfloat16"
    for k, v in want.state_dict().items():
        assert torch.equal(got.state_dict()[k], v.to(torch.bfloat16)), k


def test_fingerprint_of_a_streamed_model_is_hashed_once(saved, monkeypatch):
    streamed = open_streamed(saved / "bf16")
    first = tessera.fingerprint(streamed)
    assert first == tessera.fingerprint(tessera.load(saved / "bf16"))
    monkeypatch.setattr(streamed.streamed, "named_tensors", lambda: pytest.fail("the weights were hashed again"))
    assert tessera.fingerprint(streamed) == first == streamed.streamed.fingerprint()


def test_tensor_reads_one_weight_of_a_streamed_model(saved):
    from tessera.stream.model import tensor

    loaded, streamed = tessera.load(saved / "bf16"), open_streamed(saved / "bf16")
    for name in ("model.layers.2.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(tensor(streamed, name), loaded.state_dict()[name]) and tensor(loaded, name) is not None
    assert streamed.streamed.loads == 0 and all(p.is_meta for p in streamed.model.layers.parameters())


def test_puzzle_calibration_streamed_equals_in_memory(saved):
    """The Puzzle library's calibration (FFN channel contributions, linear-FFN fits, head importance) of a streamed
    parent equals the parent's loaded whole."""
    from tessera.puzzle.library import calibrate

    chunks = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(9))
    want = calibrate(tessera.load(saved / "fp32"), chunks, batch_size=2)
    got = calibrate(open_streamed(saved / "fp32"), chunks, batch_size=2)
    assert set(got) == set(want) and {k.split(".")[0] for k in want} >= {"ffn_contribution", "linear_ffn"}
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_puzzle_linear_fits_are_solved_layer_by_layer(saved, monkeypatch):
    """The library's float64 normal equations exist for one layer at a time (8.6 GB for every layer of an 8B
    parent): each layer's fit is solved as the pass moves on to the next layer."""
    from tessera.puzzle import library

    pending = []
    solve = library._LinearFit._solve_pending
    monkeypatch.setattr(library._LinearFit, "_solve_pending", lambda self: (pending.append(len(self.gram)), solve(self)))
    chunks = torch.randint(0, 96, (5, 12), generator=torch.Generator().manual_seed(9))
    stats = library.calibrate(open_streamed(saved / "fp32"), chunks, batch_size=2)
    assert pending == [0, 1, 1, 1, 1]  # layer 0 starts with none pending; then one layer each time
    assert sorted(k for k in stats if k.startswith("linear_ffn.")) == [f"linear_ffn.{i}" for i in range(4)]


def test_scale_benchmark_builds_a_streamable_parent_and_measures_a_child(tmp_path):
    """benchmarks/scale.py (not run in CI): its parent is written tensor by tensor in the asked shape and opens
    streamed; a stage's peak RSS is the child process's own."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    scale.build(tmp_path / "p", "tiny", max_shard_bytes=2_000_000, tokenizer=tiny_tokenizer())
    m = open_streamed(tmp_path / "p")
    assert m.dtype == torch.bfloat16 and m.arch.hidden_size == scale.SHAPES["tiny"]["hidden_size"]
    assert len(list((tmp_path / "p").glob("*.safetensors"))) > 1
    big = scale.SHAPES["8b"]
    assert (big["hidden_size"], big["num_layers"], big["intermediate_size"], big["vocab_size"]) == (4096, 32, 14336, 128256)
    row = scale.run_stage("alloc", [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                          dict(__import__("os").environ))
    # (a child's ru_maxrss starts at its parent's high-water mark, inherited through fork/exec: only a floor here)
    assert row["exit"] == 0 and row["peak_rss_gib"] > 0.29


# ---------------------------------------------------------------------------- quantization
def assert_same_quantized_dirs(a, b):
    """Two quantized checkpoints are the same: every tensor (weights, scales; tessera stores no zero points) equal,
    every file byte for byte, the provenance record equal but for the seconds it took."""
    from safetensors.torch import load_file

    fa, fb = files_bytes(a), files_bytes(b)
    assert fa.keys() == fb.keys()
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    for name in fa:
        if name == "tessera.json":
            ja, jb = json.loads(fa[name]), json.loads(fb[name])
            for j in (ja, jb):
                assert j["history"][-1]["stage"] == "quantize"
                j["history"][-1].pop("seconds")
            assert ja == jb
        else:
            assert fa[name] == fb[name], name
    return ta


QUANT_CASES = [  # scheme, gptq, observer, kv-cache scales, the scale tensors that must be there
    ("fp8", False, None, True, ("input_scale", "weight_scale", "k_scale")),
    ("fp8", True, "mse", False, ("input_scale", "weight_scale")),
    ("fp8-dynamic", False, None, False, ("weight_scale",)),
    ("fp8-dynamic", True, None, False, ("weight_scale",)),
    ("nvfp4", False, "mse", False, ("input_global_scale", "weight_global_scale", "weight_packed")),
    ("nvfp4", True, None, True, ("input_global_scale", "weight_global_scale", "weight_packed", "v_scale")),
]


@pytest.mark.parametrize("scheme, gptq, observer, kv, scales", QUANT_CASES,
                         ids=["fp8", "fp8-gptq-mse", "fp8-dynamic", "fp8-dynamic-gptq", "nvfp4-mse", "nvfp4-gptq-kv"])
@pytest.mark.parametrize("source", ["fp32", "bf16"])
def test_quantize_streamed_equals_in_memory(saved, tmp_path, source, scheme, gptq, observer, kv, scales):
    """Quantizing a streamed parent layer by layer (calibration, GPTQ and writing shard by shard in one pass) gives
    the scales, packed weights and files of quantizing it loaded whole."""
    from tessera.checkpoint import save
    from tessera.quantize import get_scheme
    from tessera.quantize.calibrate import CalibrationConfig, quantize_model
    from tessera.quantize.export import quantize_to_dir

    sch = get_scheme(scheme).with_options(observer=observer, kv_cache=kv or None)
    cfg = CalibrationConfig(samples=5, seq_len=12, batch_size=2, gptq=gptq)
    calib = torch.randint(4, 96, (5, 12), generator=torch.Generator().manual_seed(4))
    q = quantize_model(tessera.load(saved / source), sch, calib, config=cfg)
    save(q, tmp_path / "whole", max_shard_bytes=20_000)
    streamed = open_streamed(saved / source)
    rec = quantize_to_dir(streamed, sch, calib, tmp_path / "streamed", config=cfg, max_shard_bytes=20_000)
    assert rec["calibration"] == q.quantization["calibration"]
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1  # written shard by shard
    assert streamed.streamed.loads == streamed.arch.num_layers  # each layer read once, none left behind
    assert all(p.is_meta for p in streamed.model.layers.parameters())
    tensors = assert_same_quantized_dirs(tmp_path / "streamed", tmp_path / "whole")
    for leaf in scales:
        assert any(k.endswith(leaf) for k in tensors), leaf
    # the same function on the model loaded whole writes the same directory too
    quantize_to_dir(tessera.load(saved / source), sch, calib, tmp_path / "loaded", config=cfg, max_shard_bytes=20_000)
    assert_same_quantized_dirs(tmp_path / "loaded", tmp_path / "whole")
    from tessera.quantize import quant_layers

    assert len(quant_layers(tessera.load(tmp_path / "streamed"))) == len(quant_layers(q)) == 7 * 4


@pytest.mark.parametrize("args", [["--scheme", "fp8", "--kv-cache"], ["--scheme", "fp8-dynamic"],
                                  ["--scheme", "nvfp4", "--gptq", "--format", "modelopt"]],
                         ids=["fp8-kv", "fp8-dynamic", "nvfp4-gptq-modelopt"])
def test_cli_quantize_stream_on_equals_off(saved, tmp_path, args):
    data = tmp_path / "calib.txt"
    data.write_text(" ".join(f"w{i % 90}" for i in range(4000)))
    common = ["--calib-file", data, "--calib-samples", 4, "--calib-seq-len", 16, "--batch-size", 3, "--device", "cpu"]
    for mode in ("on", "off"):
        r = cli("quantize", saved / "bf16", *args, "--out", tmp_path / mode, *common, "--stream", mode, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["streamed"] is (mode == "on")
    assert_same_quantized_dirs(tmp_path / "on", tmp_path / "off")
    r = cli("quantize", "default", *args, "--out", tmp_path / "x", "--stream", "on")
    assert_one_line_error(r, "--stream on needs a model directory")


def test_streamed_quantize_refuses_targets_outside_the_layers(saved, tmp_path):
    from dataclasses import replace

    from tessera.quantize import get_scheme
    from tessera.quantize.export import quantize_to_dir

    sch = replace(get_scheme("fp8-dynamic"), targets=("re:lm_head",), ignore=())
    with pytest.raises(TesseraError, match="lm_head is outside the decoder layers"):
        quantize_to_dir(open_streamed(saved / "fp32"), sch, None, tmp_path / "q")
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------- broken checkpoints
def test_truncated_shard_is_one_line(saved):
    shard = sorted((saved / "bf16").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(TesseraError, match="truncated or corrupt"):
        open_streamed(saved / "bf16")
    assert_one_line_error(cli("kld", saved / "bf16", saved / "fp32", "--stream", "on"), shard.name)


def test_missing_layer_is_one_line(saved):
    """Remove every tensor of layer 2 from its shard (and the index): the layer is named."""
    from safetensors.torch import load_file, save_file

    root = saved / "fp32"
    index = json.loads((root / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(root / shard)
        save_file({k: v for k, v in state.items() if not k.startswith("model.layers.2.")}, root / shard,
                  metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.2.")}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TesseraError, match="layer 2 of 4 has no tensors"):
        open_streamed(root)
    assert_one_line_error(cli("kld", root, saved / "bf16", "--stream", "on"), "layer 2 of 4 has no tensors")


def test_missing_shard_is_one_line(saved):
    shard = sorted((saved / "fp32").glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(TesseraError, match="missing; copy the whole checkpoint"):
        open_streamed(saved / "fp32")


# ---------------------------------------------------------------------------- choosing
def test_should_stream(saved, monkeypatch):
    import tessera.stream.model as sm

    size = sm.weight_bytes(saved / "fp32")
    assert sm.weight_bytes(saved / "fp32", "bf16") == size // 2
    monkeypatch.setattr(sm, "available_memory", lambda: int(size / sm.AUTO_FRACTION) + 1)
    assert not should_stream(saved / "fp32", "auto")
    monkeypatch.setattr(sm, "available_memory", lambda: int(size / sm.AUTO_FRACTION) - 1)
    assert should_stream(saved / "fp32", "auto") and not should_stream(saved / "fp32", "off")
    assert not should_stream("default", "auto")
    assert sm.is_streamed(load_model(saved / "fp32", stream="auto"))
    with pytest.raises(TesseraError, match="needs a model directory"):
        should_stream("default", "on")
    with pytest.raises(TesseraError, match="use auto, on or off"):
        should_stream(saved / "fp32", "sometimes")
