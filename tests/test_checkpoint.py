import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import tessera
from helpers import mixed_arch, random_model, tiny_arch, tiny_tokenizer
from tessera.errors import TesseraError


def files_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("arch", [tiny_arch(tied=True), mixed_arch()], ids=["llama-tied", "mixed"])
def test_save_load_save_is_byte_identical(tmp_path, arch):
    model = random_model(arch)
    model.tokenizer = tiny_tokenizer()
    model.provenance = [{"stage": "test"}]
    tessera.save(model, tmp_path / "a")
    loaded = tessera.load(tmp_path / "a")
    tessera.save(loaded, tmp_path / "b")
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")
    assert loaded.arch == arch and loaded.provenance == [{"stage": "test"}]
    assert loaded.tokenizer("w5 w6")["input_ids"] == [9, 10]
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
    if arch.tie_word_embeddings:
        assert "lm_head.weight" not in load_file(tmp_path / "a" / "model.safetensors")
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_save_loads(tmp_path):
    model = random_model(tiny_arch(layers=4))
    tessera.save(model, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "m" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(tessera.load(tmp_path / "m")(ids), model(ids), atol=0, rtol=0)


@pytest.mark.parametrize("case, expected_class", [("mixed", "DeciLMForCausalLM"), ("mixed-tied", "DeciLMForCausalLM"),
                                                  ("llama-rope-scaling", "LlamaForCausalLM")])
def test_transformers_automodel_loads_saved_model(tmp_path, case, expected_class):
    """A heterogeneous child loads as DeciLM (registered by `import tessera`), a homogeneous one as plain Llama."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    arch = {"mixed": mixed_arch(), "mixed-tied": replace(mixed_arch(), tie_word_embeddings=True),
            "llama-rope-scaling": tiny_arch(rope_scaling=True)}[case]
    model = random_model(arch)
    tessera.save(model, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == expected_class
    ids = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_refuses_to_overwrite_without_force(tmp_path):
    model = random_model(tiny_arch())
    tessera.save(model, tmp_path / "m")
    with pytest.raises(TesseraError, match="already exists.*--force"):
        tessera.save(model, tmp_path / "m")
    tessera.save(random_model(tiny_arch(), seed=5), tmp_path / "m", force=True)
    assert not torch.equal(tessera.load(tmp_path / "m").lm_head.weight, model.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old directories left behind


@pytest.fixture
def saved(tmp_path):
    model = random_model(tiny_arch())
    return tessera.save(model, tmp_path / "m")


def test_missing_path(tmp_path):
    with pytest.raises(TesseraError, match="no such file or directory"):
        tessera.load(tmp_path / "nope")


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TesseraError, match="truncated or corrupt safetensors"):
        tessera.load(saved)


def test_missing_and_extra_tensors(saved):
    f = saved / "model.safetensors"
    state = load_file(f)
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(state, f)
    with pytest.raises(TesseraError, match="missing tensors model.layers.1.mlp.up_proj.weight; unexpected tensors"):
        tessera.load(saved)


def test_shape_mismatch(saved):
    f = saved / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(63, 32)
    save_file(state, f)
    with pytest.raises(TesseraError, match=r"up_proj.weight has shape \(63, 32\)"):
        tessera.load(saved)


def test_unsupported_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TesseraError, match="unsupported architecture model_type='gpt2'"):
        tessera.load(saved)


class Boom:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(saved, capsys):
    (saved / "model.safetensors").unlink()
    with open(saved / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Boom()}, fh)
    with pytest.raises(TesseraError, match="cannot be read as plain tensors"):
        tessera.load(saved)
    assert "this must never run" not in capsys.readouterr().out


def test_weights_only_bin_loads(saved):
    state = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")
    assert tessera.load(saved).arch == tiny_arch()


def test_fingerprint_tracks_weights():
    a, b = random_model(tiny_arch()), random_model(tiny_arch())
    assert tessera.fingerprint(a) == tessera.fingerprint(b)
    with torch.no_grad():
        b.model.norm.weight[0] += 1e-3
    assert tessera.fingerprint(a) != tessera.fingerprint(b)


KILLED_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import tessera.checkpoint as ck
from helpers import random_model, tiny_arch

def die(*args, **kwargs):  # the process is killed while the weights are being written
    os.kill(os.getpid(), signal.SIGKILL)

ck._write_shards = die
ck.save(random_model(tiny_arch()), {out!r})
"""


def test_a_save_killed_midway_leaves_a_temp_dir_that_the_next_save_removes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = KILLED_SAVE.format(tests=str(Path(__file__).parent), out=str(tmp_path / "m"))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers == [f".m.tmp-{proc.pid}"] and (tmp_path / leftovers[0] / "config.json").is_file()
    tessera.save(random_model(tiny_arch()), tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


@pytest.mark.parametrize("damage, needle", [
    (lambda f: f.write_bytes(f.read_bytes()[:-100]), "file not fully covered"),
    (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 8), "file not fully covered"),
    (lambda f: f.write_bytes(f.read_bytes()[:5]), "header too small"),
    (lambda f: f.write_bytes(f.read_bytes()[:200]), "invalid header length"),
], ids=["truncated", "padded", "no-header", "cut-header"])
def test_inspect_checks_the_weights_without_loading_them(tmp_path, damage, needle, monkeypatch):
    from helpers import assert_one_line_error, cli

    path = tessera.save(random_model(mixed_arch()), tmp_path / "m")
    ok = cli("inspect", path)
    assert ok.exit_code == 0 and "headers, sizes and shapes match config.json" in ok.output
    n_tensors = len(random_model(mixed_arch()).state_dict())
    assert json.loads(cli("inspect", path, "--json").output)["weights"]["tensors"] == n_tensors
    monkeypatch.setattr("safetensors.torch.load_file", lambda *a, **k: pytest.fail("inspect loaded the weights"))
    damage(path / "model.safetensors")
    assert_one_line_error(cli("inspect", path), needle)
    assert_one_line_error(cli("inspect", path, "--json"), "truncated or corrupt")


def test_inspect_checks_names_and_shapes_against_the_config(saved):
    from helpers import assert_one_line_error, cli

    f = saved / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(63, 32)
    save_file(state, f)
    assert_one_line_error(cli("inspect", saved), "up_proj.weight has shape (63, 32)")
    state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, f)
    assert_one_line_error(cli("inspect", saved), "missing tensors model.layers.0.mlp.up_proj.weight")
    (saved / "model.safetensors").unlink()
    assert "weights: none here (config only)" in cli("inspect", saved).output
