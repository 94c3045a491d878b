"""The run directory's manifest and lock.

`RUN_DIR/manifest.json` records, per stage: status (pending | running | done | failed), the hash of what the
stage was told to do and of every input it read (the recipe table, the outputs of earlier stages, the parent's
files), its outputs with their content hashes, wall time, tokens processed and peak memory. It is rewritten
atomically (`tessera.io.atomic_write_json`) after every change, so a reader sees the previous or the next state,
never a half-written file.

A stage's outputs live in `RUN_DIR/<stage>/` and are written with `tessera.io.atomic_dir`: a stage killed before
its directory is renamed into place leaves only a `.stage.tmp-PID` (removed by the next run) and a `running`
entry, which the next run treats as not done.

`RunLock` is an exclusive `flock` on `RUN_DIR/.lock`: the kernel drops it when its process dies (SIGKILL
included), so a dead run never blocks the next one; the file holds the owner's pid for the refusal message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError
from tessera.io import atomic_write_json, read_json

MANIFEST = "manifest.json"
LOCK = ".lock"
VERSION = 1


def hash_path(path: str | os.PathLike) -> str:
    """A content hash of a file or a directory tree (relative names and bytes; temp leftovers skipped)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and ".tmp-" not in p.name)
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class StageRecord:
    status: str = "pending"  # pending | running | done | failed
    config_hash: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> content hash
    outputs: dict[str, Any] = field(default_factory=dict)  # path relative to the run dir, hash, summary
    wall_s: float | None = None
    tokens: int | None = None
    peak_memory_bytes: int | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    resumed_from: int | None = None  # the checkpoint step a resumed stage continued from
    error: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Manifest:
    """`RUN_DIR/manifest.json`: the recipe the run follows and one `StageRecord` per stage."""

    def __init__(self, run_dir: Path, data: dict | None = None):
        self.run_dir = Path(run_dir)
        data = data or {}
        self.recipe: dict = data.get("recipe", {})
        self.meta: dict = data.get("meta", {})
        self.stages: dict[str, StageRecord] = {k: StageRecord(**v) for k, v in data.get("stages", {}).items()}

    @property
    def path(self) -> Path:
        return self.run_dir / MANIFEST

    @staticmethod
    def load(run_dir: str | os.PathLike) -> Manifest:
        run_dir = Path(run_dir)
        path = run_dir / MANIFEST
        if not path.is_file():
            return Manifest(run_dir)
        # bad JSON cannot come from atomic writes; say so in one line if someone edited it
        data = read_json(path, fix="restore it or start over with --force")
        if data.get("version") != VERSION:
            raise TesseraError(f"{path}: manifest version {data.get('version')} is not {VERSION}; start over with --force")
        return Manifest(run_dir, data)

    def exists(self) -> bool:
        return self.path.is_file()

    def stage(self, name: str) -> StageRecord:
        return self.stages.setdefault(name, StageRecord())

    def save(self) -> None:
        atomic_write_json(self.path, {"version": VERSION, "recipe": self.recipe, "meta": self.meta,
                                      "stages": {k: v.as_dict() for k, v in self.stages.items()}})

    def done(self) -> list[str]:
        return [k for k, v in self.stages.items() if v.status == "done"]


class RunLock:
    """An exclusive lock on a run directory that a dead process does not hold (flock is released on exit)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            raise TesseraError(f"{self.path.parent}: another tessera run (pid {owner}) is using this run directory; "
                               "wait for it to finish or pass another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def peak_memory_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss), or the CUDA peak when a GPU was used."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = max(peak, torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    return int(peak)


def now() -> float:
    return round(time.time(), 3)
