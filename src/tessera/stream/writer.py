"""Writing a checkpoint tensor by tensor: a child of a streamed parent is never whole in memory.

    with checkpoint_writer(out, arch, dtype=torch.bfloat16, provenance=[...], tokenizer=tok) as w:
        w.add("lm_head.weight", head)              # names in tessera.save's order (see `save_order`)
        w.add("model.embed_tokens.weight", emb)
        for i, layer in enumerate(...):
            for name, t in layer.items(): w.add(f"model.layers.{i}.{name}", t)
        w.add("model.norm.weight", norm)

Shards are saved as they fill (`tessera.checkpoint.ShardWriter`, the writer `tessera.save` uses too), so memory holds
at most one shard; with the tensors added in `save_order` the directory is byte for byte what `tessera.save` writes
for the same model. The directory appears atomically (`tessera.io.atomic_dir`) when the block ends without error,
and an existing one is replaced only with `force`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tessera.arch import ArchSpec
from tessera.checkpoint import MAX_SHARD_BYTES, ShardWriter, _natural_key, write_model_files
from tessera.errors import TesseraError
from tessera.io import atomic_dir


def save_order(names) -> list[str]:
    """The order `tessera.save` writes tensors in (layers by number, not as strings)."""
    return sorted(names, key=_natural_key)


class OrderedShardWriter(ShardWriter):
    """A ShardWriter that checks the tensors arrive in `save_order` and with the arch's names, once each."""

    def __init__(self, directory: Path, expected: dict[str, tuple[int, ...]], max_shard_bytes: int):
        super().__init__(directory, max_shard_bytes)
        self.expected = expected
        self._order = save_order(expected)
        self._next = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing more"
            raise RuntimeError(f"streamed save: got {name}, expected {want}")
        if tuple(tensor.shape) != tuple(self.expected[name]):
            raise RuntimeError(f"streamed save: {name} has shape {tuple(tensor.shape)}, the architecture says "
                               f"{tuple(self.expected[name])}")
        self._next += 1
        super().add(name, tensor)

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"streamed save: {len(self._order) - self._next} tensors never written "
                               f"(next: {self._order[self._next]})")
        super().close()


def expected_tensors(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `arch` holds (the output head left out when tied)."""
    from tessera.model import Transformer

    with torch.device("meta"):
        state = Transformer(arch).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if arch.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


@contextmanager
def checkpoint_writer(out: str | os.PathLike, arch: ArchSpec, *, dtype: torch.dtype, provenance: list,
                      tokenizer=None, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                      extra_files: dict | None = None) -> Iterator[OrderedShardWriter]:
    """A checkpoint directory written tensor by tensor (see the module doc)."""
    out = Path(out).expanduser()
    with atomic_dir(out, force=force) as tmp:
        writer = OrderedShardWriter(tmp, expected_tensors(arch), max_shard_bytes)
        yield writer
        writer.close()
        write_model_files(tmp, arch, dtype=dtype, provenance=provenance, tokenizer=tokenizer,
                          extra_files=extra_files)


def check_space(out: str | os.PathLike, nbytes: int) -> None:
    """One line, before hours of work, when the output's filesystem cannot hold `nbytes` more."""
    import shutil

    parent = Path(out).expanduser().resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < nbytes:
        raise TesseraError(f"{out}: needs {nbytes / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB are free there; "
                           "free space or write elsewhere")
