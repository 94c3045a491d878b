import json

import pytest
import torch
from typer.testing import CliRunner

import tessera
from helpers import assert_one_line_error, mixed_arch, random_model, tiny_arch, tiny_tokenizer
from tessera.cli import app
from tessera.formats import config_json

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)



def test_inspect_json_on_config_only_directory(tmp_path):
    (tmp_path / "config.json").write_text(config_json(mixed_arch()))
    out = json.loads(run("inspect", tmp_path, "--json").output)
    assert [r["attention"] for r in out["layers"]] == ["gqa", "gqa", "linear", "no_op", "gqa"]
    assert [r["ffn_width"] for r in out["layers"]] == [64, 24, 0, 40, 0]
    assert out["totals"]["params"] == mixed_arch().num_params()
    assert out["layers"][1]["kv_bytes_per_token"] == 2 * 1 * 8 * 2


def test_inspect_table(tmp_path):
    (tmp_path / "config.json").write_text(config_json(mixed_arch()))
    result = run("inspect", tmp_path)
    assert result.exit_code == 0 and "linear" in result.output and "no_op" in result.output
    assert f"{mixed_arch().num_params():,}" in result.output


def test_convert_and_generate(tmp_path):
    model = random_model(tiny_arch())
    model.tokenizer = tiny_tokenizer()
    tessera.save(model, tmp_path / "src")
    assert run("convert", tmp_path / "src", tmp_path / "dst", "--dtype", "bfloat16").exit_code == 0
    assert tessera.load(tmp_path / "dst").dtype == torch.bfloat16
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_one_line_error(run("convert", tmp_path / "src", tmp_path / "dst"), "--force")
    result = run("generate", tmp_path / "src", "--prompt", "w1 w2 w3", "-n", "4")
    assert result.exit_code == 0 and result.output.startswith("w1 w2 w3")


@pytest.mark.parametrize("case", ["missing", "gpt2", "bad_blocks", "kv_heads", "truncated", "extra"])
def test_bad_input_gives_one_line(tmp_path, case):
    model = random_model(mixed_arch())
    path = tessera.save(model, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    if case == "missing":
        path = tmp_path / "does-not-exist"
        needle = "no such file"
    elif case == "gpt2":
        cfg["model_type"] = "gpt2"
        needle = "unsupported architecture"
    elif case == "bad_blocks":
        cfg["num_hidden_layers"] = 7
        needle = "block_configs has 5 entries but num_hidden_layers=7"
    elif case == "kv_heads":
        cfg["block_configs"][0]["attention"]["n_heads_in_group"] = 3
        needle = "does not divide"
    elif case == "truncated":
        (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:50])
        needle = "truncated or corrupt"
    else:
        import torch
        from safetensors.torch import load_file, save_file

        state = load_file(path / "model.safetensors") | {"model.extra.weight": torch.zeros(1)}
        save_file(state, path / "model.safetensors")
        needle = "unexpected tensors model.extra.weight"
    if case in ("gpt2", "bad_blocks", "kv_heads"):
        (path / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("generate", path, "--prompt", "w1"), needle)


def test_convert_and_demo_json(tmp_path):
    model = random_model(tiny_arch())
    model.tokenizer = tiny_tokenizer()
    tessera.save(model, tmp_path / "src")
    out = json.loads(run("convert", tmp_path / "src", tmp_path / "dst", "--json").output)
    assert out == {"out": str(tmp_path / "dst"), "params": model.num_params(), "dtype": "float32"}
    demo = json.loads(run("demo", tmp_path / "src", "--eval-limit", 0, "--json", "--device", "cpu").output)
    assert demo["params"] == model.num_params() and len(demo["layers"]) == 2
    assert demo["predicted"]["128/1024"]["output_tokens_per_s"] > 0


def test_output_without_a_terminal_is_not_wrapped(tmp_path):
    """Piped or logged output keeps long lines (paths) whole instead of folding them at 80 columns."""
    deep = tmp_path / ("a-directory-name-long-enough-to-pass-eighty-columns-on-its-own-" * 2) / "child"
    model = random_model(tiny_arch())
    model.tokenizer = tiny_tokenizer()
    tessera.save(model, tmp_path / "src")
    result = run("convert", tmp_path / "src", deep)
    assert result.exit_code == 0 and len(str(deep)) > 160
    assert f"to {deep}" in result.output.splitlines()[-1]
    from tessera.cli.app import console

    assert not console.is_terminal and console.width >= 200
