"""Activations of a calibration set between two layers: in RAM while they fit a budget, in a file when they do not.

An `Activations` holds one stream's hidden states batch by batch ((B, T, hidden) each). A `Budget` hands them out:
each new store goes to RAM if its bytes fit what is left of the budget, else to a file under `spill_dir`, written
and read with plain file I/O (never memory-mapped), so spilled activations sit in the page cache, which the kernel
may drop, not in the process's resident memory. Files are deleted when their store is closed.

The budget defaults to a quarter of the memory available when it is created; `TESSERA_ACTIVATION_BUDGET` (bytes,
or with a K/M/G suffix) sets it, and `0` spills everything (what the tests use to compare the two).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from tessera.errors import TesseraError

ENV_BUDGET = "TESSERA_ACTIVATION_BUDGET"


def parse_bytes(text: str) -> int:
    """'2G' / '512M' / '1000' -> bytes."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if mult > 1 else s)
    except ValueError:
        raise TesseraError(f"{ENV_BUDGET}={text!r}: give bytes, e.g. 2G, 512M or 0 (spill everything)") from None
    if value < 0:
        raise TesseraError(f"{ENV_BUDGET}={text!r} is negative; give bytes, e.g. 2G, or 0 to spill everything")
    return int(value * mult)


class Budget:
    """RAM allowed for activations; what does not fit is spilled to files in `spill_dir`."""

    def __init__(self, nbytes: int | None = None, spill_dir: str | Path | None = None):
        if nbytes is None:
            env = os.environ.get(ENV_BUDGET)
            if env is not None and env.strip():
                nbytes = parse_bytes(env)
            else:
                from tessera.stream.model import available_memory

                nbytes = available_memory() // 4
        self.total = int(nbytes)
        self.used = 0
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.spilled = 0  # stores that went to disk (reported by stages, checked by tests)

    def _dir(self) -> Path:
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            return self.spill_dir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tessera-activations-")
        return Path(self._tmp.name)

    def new(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device | str = "cpu") -> Activations:
        size = torch.empty((), dtype=dtype).element_size()
        nbytes = sum(_numel(s) for s in shapes) * size
        if nbytes <= self.total - self.used:
            self.used += nbytes
            return Activations(shapes, dtype, device, None, self, nbytes)
        self.spilled += 1
        fd, name = tempfile.mkstemp(prefix="acts-", suffix=".bin", dir=self._dir())
        os.close(fd)
        return Activations(shapes, dtype, device, Path(name), self, 0)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Activations:
    """One stream's per-batch activations; `acts[b]` reads batch b, `acts[b] = t` replaces it."""

    def __init__(self, shapes, dtype, device, file: Path | None, budget: Budget, ram_bytes: int):
        self.shapes = [tuple(s) for s in shapes]
        self.dtype, self.device, self.file = dtype, torch.device(device), file
        self._budget, self._ram_bytes = budget, ram_bytes
        self._ram: list[torch.Tensor | None] = [None] * len(self.shapes)
        size = torch.empty((), dtype=dtype).element_size()
        self._offsets = [0]
        for s in self.shapes:
            self._offsets.append(self._offsets[-1] + _numel(s) * size)
        self._written = [False] * len(self.shapes)
        self._fd = os.open(file, os.O_RDWR) if file is not None else None

    @property
    def spilled(self) -> bool:
        return self.file is not None

    def __len__(self) -> int:
        return len(self.shapes)

    def __setitem__(self, b: int, t: torch.Tensor) -> None:
        if tuple(t.shape) != self.shapes[b]:
            raise ValueError(f"batch {b}: shape {tuple(t.shape)}, expected {self.shapes[b]}")
        if self._fd is None:
            self._ram[b] = t.detach()
            return
        data = t.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        view, off = memoryview(data).cast("B"), self._offsets[b]
        while view.nbytes:
            n = os.pwrite(self._fd, view, off)
            view, off = view[n:], off + n
        self._written[b] = True

    def __getitem__(self, b: int) -> torch.Tensor:
        if self._fd is None:
            t = self._ram[b]
            if t is None:
                raise KeyError(f"batch {b} has not been written")
            return t
        if not self._written[b]:
            raise KeyError(f"batch {b} has not been written")
        out = torch.empty(self.shapes[b], dtype=self.dtype)
        view, off = memoryview(out.view(torch.uint8).numpy()).cast("B"), self._offsets[b]
        while view.nbytes:
            n = os.preadv(self._fd, [view], off)
            if n <= 0:
                raise TesseraError(f"{self.file}: spilled activations were cut short (disk full or file removed); "
                                   "free space in the spill directory and rerun")
            view, off = view[n:], off + n
        return out.to(self.device)

    def close(self) -> None:
        self._ram = [None] * len(self.shapes)
        self._budget.used -= self._ram_bytes
        self._ram_bytes = 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.file.unlink(missing_ok=True)
