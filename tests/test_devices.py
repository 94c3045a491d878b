"""One device/dtype vocabulary: resolution (auto, LOCAL_RANK under torchrun), the collective backend, and every
compute command putting the model and each batch on the requested device in the requested dtype."""

import json

import pytest
import torch

import tessera
from helpers import assert_one_line_error, cli, random_model, tiny_arch, tiny_tokenizer
from tessera import devices
from tessera.errors import TesseraError
from tessera.model import Transformer


def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_resolve_device(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fake_gpus(monkeypatch, 0)
    assert devices.resolve_device("auto") == devices.resolve_device(None) == torch.device("cpu")
    with pytest.raises(TesseraError, match="no CUDA device is visible; use --device cpu"):
        devices.resolve_device("cuda")
    with pytest.raises(TesseraError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu")
    fake_gpus(monkeypatch, 2)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each rank takes the GPU of its LOCAL_RANK
    assert devices.resolve_device("auto") == devices.resolve_device("cuda") == torch.device("cuda", 1)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(TesseraError, match="only 2 CUDA devices"):
        devices.resolve_device("cuda:5")
    assert devices.default_dtype(torch.device("cuda", 0)) == "bf16" and devices.default_dtype(torch.device("cpu")) == "fp32"


def test_dtype_vocabulary():
    assert devices.torch_dtype("bf16") == devices.torch_dtype("bfloat16") == torch.bfloat16
    assert devices.format_name(torch.float16) == "fp16" and devices.format_name("float32") == "fp32"
    with pytest.raises(TesseraError, match="unknown dtype 'fp7'"):
        devices.torch_dtype("fp7")


def test_collectives_use_gloo_for_cpu_tensors_even_when_a_gpu_is_visible(monkeypatch):
    import torch.distributed as dist

    fake_gpus(monkeypatch, 1)
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: backends.append(backend))
    assert devices.init_distributed("cpu") == (0, 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: backends.append(str(d)))
    devices.init_distributed("cuda")
    assert backends == ["gloo", "cuda:0", "nccl"]


@pytest.fixture
def saved(tmp_path):
    m = random_model(tiny_arch(layers=2))
    m.tokenizer = tiny_tokenizer()
    tessera.save(m, tmp_path / "m")
    ids = torch.randint(4, 96, (4000,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "c.txt").write_text(" ".join(f"w{i - 4}" for i in ids.tolist()))
    return tmp_path


@pytest.fixture
def forwards(monkeypatch):
    """Every forward pass of any model: (weights device, weights dtype, input device)."""
    seen = []
    hidden = Transformer.hidden

    def spy(self, input_ids, *args, **kwargs):
        seen.append((self.model.embed_tokens.weight.device, self.model.embed_tokens.weight.dtype, input_ids.device))
        return hidden(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Transformer, "hidden", spy)
    import tessera.stream as stream

    run_layers = stream.run_layers

    def spy_layers(model, chunks, *args, **kwargs):  # the layer-by-layer executor (importance, streamed KLD)
        w = model.model.embed_tokens.weight
        out = run_layers(model, chunks, *args, **kwargs)
        seen.append((w.device, w.dtype, out.main[0].device))
        return out

    monkeypatch.setattr(stream, "run_layers", spy_layers)
    return seen


@pytest.mark.parametrize("command", ["importance", "prune", "eval", "kld", "perplexity", "generate", "distill"])
def test_compute_commands_put_model_and_batches_on_the_requested_device_and_dtype(saved, forwards, command,
                                                                                  monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(saved / "home"))
    m, data = saved / "m", saved / "c.txt"
    task = saved / "task.jsonl"
    task.write_text(json.dumps({"context": "w1 w2", "choices": [" w3", " w4"], "gold": 0}) + "\n")
    small = ["--data", data, "--seq-len", 16, "--samples", 4, "--drop-samples", 1]
    args = {
        "importance": [m, "--out", saved / "s.safetensors", *small],
        "prune": [m, "--out", saved / "p", "--ffn", 16, *small],
        "eval": [m, "--tasks", task, "--no-cache"],
        "kld": [m, m, data, "--seq-len", 16],
        "perplexity": [m, data, "--max-tokens", 64, "--max-len", 32],
        "generate": [m, "-p", "w1 w2", "-n", 2],
        "distill": ["--teacher", m, "--student", m, "--out", saved / "d", "--data", data, "--seq-len", 16, "--batch",
                    2, "--tokens", 64, "--eval-every", 1],
    }[command]
    assert_one_line_error(cli(command, *args, "--device", "cuda:0") if torch.cuda.device_count() == 0
                          else cli(command, *args, "--device", "tpu"), "device")
    assert not forwards
    r = cli(command, *args, "--device", "cpu", "--dtype", "bf16", *([] if command == "generate" else ["--json"]))
    assert r.exit_code == 0, r.output
    if command != "generate":  # every command that prints numbers has --json: one JSON document on stdout
        assert isinstance(json.loads(r.output), dict)
    assert forwards and all(w == x == torch.device("cpu") for w, _, x in forwards)
    dtypes = {dt for _, dt, _ in forwards}
    # distillation trains fp32 master weights (under bf16 autocast) beside a bf16 teacher
    assert dtypes == ({torch.bfloat16, torch.float32} if command == "distill" else {torch.bfloat16}), dtypes
