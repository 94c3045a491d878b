"""Where every tensor of a safetensors checkpoint lives, read from the headers only, and reading a few at a time.

`WeightIndex(path)` reads the header of every shard (single `model.safetensors`, an index with shards, or loose
`*.safetensors` files, as `tessera.load` does), without touching the data, and checks the checkpoint against its
`config.json`: a shard that is missing, truncated or corrupt, a layer with no tensors at all, a missing, extra or
misshapen tensor is refused with one line before any compute starts.

`read(names)` yields the named tensors memory-mapped from their shards (safetensors `safe_open`; zero-copy while
the dtype is kept) and unmaps them when the block ends, so a process holds the pages of the tensors it is using and
no others.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tessera.arch import ArchSpec
from tessera.errors import TesseraError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in the order `tessera.load` reads them."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise TesseraError(f"{index}: invalid shard index ({exc}); regenerate it or re-save the model") from None
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if (path / "pytorch_model.bin").is_file():
        raise TesseraError(f"{path}: streaming reads safetensors shards, this checkpoint is pytorch_model.bin; "
                           "convert it first with `tessera convert` or load it whole (--stream off)")
    raise TesseraError(f"{path}: no weights found (model.safetensors or sharded safetensors)")


def _open(file: Path):
    if not file.is_file():
        raise TesseraError(f"{file}: shard listed in the index is missing; copy the whole checkpoint directory")
    try:
        return safe_open(str(file), "pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TesseraError(f"{file}: truncated or corrupt safetensors file ({msg}); re-download or re-save it") from None


class WeightIndex:
    """Name -> (shard, shape, dtype) of every tensor of a checkpoint directory, from the shard headers."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.files = shard_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            with _open(file) as fh:
                for name in fh.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    piece = fh.get_slice(name)
                    dtype = _DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise TesseraError(f"{file}: tensor {name} has dtype {piece.get_dtype()}, which tessera does not "
                                           "read; convert the checkpoint to bf16 / fp16 / fp32")
                    self.tensors[name] = TensorInfo(file, tuple(piece.get_shape()), dtype)

    # ------------------------------------------------------------------ facts
    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype(self) -> torch.dtype:
        """The dtype `tessera.load` gives the model: the tensors' own, or the widest when they are mixed."""
        from tessera.checkpoint import common_dtype

        return common_dtype({t.dtype for t in self.tensors.values()})

    def check(self, arch: ArchSpec, expected: dict[str, tuple[int, ...]]) -> None:
        """One line for the first thing wrong: a whole layer missing, a missing / extra / misshapen tensor."""
        have = set(self.tensors)
        want = set(expected)
        missing, extra = sorted(want - have), sorted(have - want)
        where = f"{self.path}"
        if missing:
            layers = sorted({int(n.split(".")[2]) for n in missing if n.startswith("model.layers.")})
            whole = [i for i in layers if not any(k.startswith(f"model.layers.{i}.") for k in have)]
            if whole:
                listed = ", ".join(map(str, whole[:5])) + (f" (+{len(whole) - 5} more)" if len(whole) > 5 else "")
                raise TesseraError(f"{where}: layer{'s' if len(whole) > 1 else ''} {listed} of {arch.num_layers} "
                                   f"{'have' if len(whole) > 1 else 'has'} no tensors in any shard; the checkpoint is "
                                   "incomplete: copy every shard (and the index) of the model")
            raise TesseraError(f"{where}: weights do not match config.json: missing tensors {_few(missing)}; "
                               "the config and weights must come from the same model")
        if extra:
            raise TesseraError(f"{where}: weights do not match config.json: unexpected tensors {_few(extra)}; "
                               "the config and weights must come from the same model")
        for name, shape in expected.items():
            got = self.tensors[name].shape
            if tuple(got) != tuple(shape):
                raise TesseraError(f"{where}: tensor {name} has shape {tuple(got)} but config.json implies "
                                   f"{tuple(shape)}; the config and weights must come from the same model")

    # ------------------------------------------------------------------ reading
    @contextmanager
    def read(self, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The named tensors, memory-mapped from their shards while the block runs (each shard opened once)."""
        names = list(names)
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.tensors[n].file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            for file, group in by_file.items():
                fh = stack.enter_context(_open(file))
                for n in group:
                    try:
                        out[n] = fh.get_tensor(n)
                    except (SafetensorError, OSError, RuntimeError) as exc:  # a shard changed since the index was read
                        raise TesseraError(f"{file}: cannot read tensor {n} ({str(exc).splitlines()[0]}); the file "
                                           "changed or is damaged: re-download or re-save it") from None
            yield out
            out.clear()


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")
