"""A `Transformer` whose decoder layers stay in their safetensors shards until they are used.

`open_streamed(path)` builds the model on the meta device (the model's own modules: `Transformer`, `Block`, ...),
materialises what every token needs (the embedding, the final norm, the output head) and leaves each decoder layer
on disk. A layer is materialised in place, in the model's dtype, by `model.streamed.layer(i)` (for as long as the
`with` block runs) or, for code that simply calls the model, by a hook around the layer's forward that loads it
and lets it go again, so `model(ids)`, evaluation and KLD run unchanged on a model that never fits in memory
(each call re-reads every layer: the layer-by-layer executor in `tessera.stream.executor` reads each layer once
for a whole calibration set, which is what the heavy stages use).

Hooks registered on the layers' modules stay attached while their weights come and go, so statistics that
stages collect with forward hooks work on a streamed model as on one loaded whole.

Memory: the resident tensors + one layer (its tensors memory-mapped when the model keeps the checkpoint's dtype,
a converted copy otherwise) + whatever the caller keeps (activations).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tessera.errors import TesseraError
from tessera.model import Block, Transformer
from tessera.stream.weights import WeightIndex

RESIDENT = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
STREAM_MODES = ("auto", "on", "off")
# auto streams a checkpoint whose weights (in the dtype they would be loaded in) exceed this fraction of the memory
# available when the command starts: loading it whole would leave too little for a pruned copy, a child or a
# second model beside it.
AUTO_FRACTION = 0.25


class LayerStream:
    """The streaming side of a streamed model: where its layers are, and bringing one in and out."""

    def __init__(self, model: Transformer, index: WeightIndex, dtype: torch.dtype, device: torch.device):
        self.model, self.index, self.dtype, self.device = model, index, dtype, device
        self.source_dtype = index.dtype()
        self.path = index.path
        self._pinned: set[int] = set()
        self._live: set[int] = set()
        self.cached_fingerprint: str | None = None  # set by tessera.fingerprint (hashing reads every weight)
        self.loads = 0  # layers materialised so far (a test and a progress figure)
        for i, block in enumerate(model.model.layers):
            block.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            block.register_forward_hook(lambda _m, _a, _o, i=i: self._leave(i))

    # ------------------------------------------------------------------ one layer
    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        """As `tessera.load` would hold it: the checkpoint's common dtype, then the requested dtype and device."""
        return t.to(self.source_dtype).to(self.dtype).to(self.device)

    def layer_names(self, i: int) -> list[str]:
        return [f"model.layers.{i}.{k}" for k in self.model.model.layers[i].state_dict()]

    def materialise(self, i: int) -> Block:
        block = self.model.model.layers[i]
        if i in self._live:
            return block
        prefix = f"model.layers.{i}."
        with self.index.read(self.layer_names(i)) as tensors:
            state = {k[len(prefix):]: self._convert(t) for k, t in tensors.items()}
        block.load_state_dict(state, strict=True, assign=True)
        self._live.add(i)
        self.loads += 1
        return block

    def release(self, i: int) -> None:
        if i in self._live:
            self.model.model.layers[i].to_empty(device="meta")
            self._live.discard(i)

    @contextmanager
    def layer(self, i: int) -> Iterator[Block]:
        """Layer `i` materialised for the duration of the block (and released after, unless it already was)."""
        if not 0 <= i < self.model.arch.num_layers:
            raise IndexError(f"layer {i} of a {self.model.arch.num_layers}-layer model")
        was_live = i in self._live
        self._pinned.add(i)
        try:
            yield self.materialise(i)
        finally:
            self._pinned.discard(i)
            if not was_live:
                self.release(i)

    def _enter(self, i: int) -> None:
        if i not in self._live:
            self.materialise(i)

    def _leave(self, i: int) -> None:
        if i not in self._pinned:
            self.release(i)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor of the model by its full name, converted, read alone from its shard when it is not resident."""
        t = self.model.state_dict()[name]
        if not t.is_meta:
            return t
        with self.index.read([name]) as got:
            return self._convert(got[name]).clone()

    def state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer `i`'s tensors (names relative to the block), converted, without touching the model."""
        prefix = f"model.layers.{i}."
        with self.index.read(self.layer_names(i)) as tensors:
            return {k[len(prefix):]: self._convert(t) for k, t in tensors.items()}

    # ------------------------------------------------------------------ whole-model facts
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the model's whole state dict in sorted order, reading layers one tensor at a time:
        what `tessera.fingerprint` hashes, without holding the model."""
        resident = dict(self.model.state_dict())
        for name in sorted(resident):
            t = resident[name]
            if t.is_meta:
                with self.index.read([name]) as got:
                    yield name, self._convert(got[name])
            else:
                yield name, t

    def fingerprint(self) -> str:
        from tessera.checkpoint import fingerprint

        return fingerprint(self.model)

    @property
    def layer_bytes(self) -> int:
        """Bytes of the largest layer in the model's dtype (what one materialised layer costs)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return max(sum(t.numel() for t in b.state_dict().values()) for b in self.model.model.layers) * size


def is_streamed(model) -> bool:
    return getattr(model, "streamed", None) is not None


def tensor(model: Transformer, name: str) -> torch.Tensor:
    """The tensor `name` of a model's state dict (e.g. `model.layers.3.mlp.down_proj.weight`), whether the model
    is loaded whole or streamed (then read alone from its shard): for statistics that need a few weights of every
    layer after a pass, without materialising each layer again."""
    if is_streamed(model):
        return model.streamed.tensor(name)
    return model.state_dict()[name]


def open_streamed(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                  device: str | torch.device = "cpu", with_tokenizer: bool = True) -> Transformer:
    """A model whose decoder layers are read from `path`'s safetensors one at a time (see the module doc).

    Checks the shards' headers against config.json first (a truncated shard, a missing layer: one line)."""
    from tessera.checkpoint import PROVENANCE_FILE, _finish, load_tokenizer
    from tessera.devices import resolve_device, torch_dtype
    from tessera.formats import read_config

    path = Path(path).expanduser()
    config = path / "config.json"
    if not path.is_dir():
        raise TesseraError(f"{path}: streaming needs a model directory (config.json + safetensors shards)")
    if not config.is_file():
        raise TesseraError(f"{path}: no config.json; a model directory needs config.json plus safetensors weights")
    raw = json.loads(config.read_text())
    if "quantization_config" in raw or (path / "hf_quant_config.json").is_file():
        raise TesseraError(f"{path}: a quantized checkpoint cannot be streamed; load it whole (--stream off)")
    arch = read_config(config)
    index = WeightIndex(path)
    with torch.device("meta"):
        model = Transformer(arch)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if arch.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        index.tensors.pop("lm_head.weight", None)
    index.check(arch, expected)
    target = torch_dtype(dtype) if dtype is not None else index.dtype()
    dev = resolve_device(device)
    resident = [n for n in RESIDENT if n in expected]
    source = index.dtype()
    with index.read(resident) as tensors:
        state = {k: t.to(source).to(target).to(dev) for k, t in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model = _finish(model)
    model.inv_freq = model.inv_freq.float()
    prov = path / PROVENANCE_FILE
    if prov.is_file():
        model.provenance = json.loads(prov.read_text()).get("history", [])
    stream = LayerStream(model, index, target, dev)
    model.streamed = stream
    model.tokenizer = load_tokenizer(path) if with_tokenizer else None
    model.eval()
    return model


# ---------------------------------------------------------------------------- choosing
def available_memory() -> int:
    """Bytes the system can give a new process now (MemAvailable on Linux; total RAM / 2 elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def should_stream(source: str | os.PathLike, mode: str = "auto", dtype: torch.dtype | str | None = None) -> bool:
    """Whether a stage should stream `source`: `on` / `off` as told; `auto` streams a safetensors directory whose
    weights, in the dtype they would be loaded in, exceed AUTO_FRACTION of the memory available now."""
    if mode not in STREAM_MODES:
        raise TesseraError(f"--stream {mode!r}: use auto, on or off")
    if mode == "off":
        return False
    path = Path(str(source)).expanduser()
    streamable = path.is_dir() and (path / "config.json").is_file()
    if mode == "on":
        if not streamable:
            raise TesseraError(f"{source}: --stream on needs a model directory with safetensors shards "
                               "('default' and .gguf files load whole)")
        return True
    if not streamable or not any(path.glob("*.safetensors")):
        return False
    return weight_bytes(path, dtype) > AUTO_FRACTION * available_memory()


def weight_bytes(path: Path, dtype: torch.dtype | str | None = None) -> int:
    """The bytes of a checkpoint's weights when loaded in `dtype` (default: their own)."""
    from tessera.devices import torch_dtype

    index = WeightIndex(path)
    if dtype is None:
        return index.nbytes
    size = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    return sum(t.nbytes // torch.empty((), dtype=t.dtype).element_size() * size for t in index.tensors.values())


def load_model(source: str | os.PathLike, *, stream: str = "auto", dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", with_tokenizer: bool = True) -> Transformer:
    """`tessera.load`, or `open_streamed` when `should_stream` says so: what every stage's CLI calls."""
    if should_stream(source, stream, dtype):
        return open_streamed(source, dtype=dtype, device=device, with_tokenizer=with_tokenizer)
    from tessera.checkpoint import load

    return load(source, dtype=dtype, device=device, with_tokenizer=with_tokenizer)


def describe(model: Transformer) -> str:
    """One line for logs: how the model is held."""
    if not is_streamed(model):
        return "loaded whole"
    s = model.streamed
    return (f"streamed layer by layer from {s.path} ({s.index.nbytes / 2**30:.1f} GiB on disk, "
            f"{s.layer_bytes / 2**30:.2f} GiB per layer in {str(s.dtype).removeprefix('torch.')})")
