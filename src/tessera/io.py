"""Atomic outputs: every file and directory tessera writes appears whole or not at all.

A file is written to `.NAME.tmp-PID` beside its target and renamed into place (`os.replace` is atomic on one
filesystem); a directory is built as `.NAME.tmp-PID/` and renamed the same way. A process killed mid-write
leaves only its temp name behind, and the next write to the same target removes temp names whose process is
gone. Nothing is overwritten unless the caller says `force`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tessera.errors import TesseraError

TMP_MARK = ".tmp-"


def refuse_overwrite(path: str | os.PathLike, force: bool, what: str = "output") -> None:
    """One clear line when `path` exists and the user did not pass --force."""
    path = Path(path)
    if path.exists() and not force:
        raise TesseraError(f"{path}: already exists; choose another {what} path or pass --force to overwrite")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID*` / `.NAME.old-PID*` leftovers of `target` whose process no longer runs."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for mark in (TMP_MARK, ".old-"):
        prefix = f".{target.name}{mark}"
        for leftover in target.parent.glob(f"{prefix}*"):
            pid_text = leftover.name[len(prefix):].split(".")[0]
            if not pid_text.isdigit() or _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
                continue
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{os.getpid()}{target.suffix}"


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `target`; on success it is renamed onto `target`, on error removed.

    For writers that take a path (safetensors `save_file`, matplotlib `savefig`). The temp name keeps the
    target's suffix, so format detection by extension still works.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = _tmp_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_json(target: str | os.PathLike, payload: Any, *, indent: int = 2) -> Path:
    return atomic_write_text(target, json.dumps(payload, indent=indent, sort_keys=True, default=_json_default) + "\n")


def read_json(file: str | os.PathLike, *, fix: str, format: str | None = None, version: int | None = None,
              what: str = "a tessera file") -> dict:
    """A JSON file tessera wrote, parsed; when `format` is given, its `format` and `version` fields must match.
    Bad JSON or another format is one line naming the file, what is wrong and `fix` (what to do about it)."""
    file = Path(file)
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TesseraError(f"{file}: not valid JSON ({exc.msg}); {fix}") from None
    if format is not None and (not isinstance(raw, dict) or raw.get("format") != format
                               or raw.get("version") != version):
        raise TesseraError(f"{file}: not {what} of version {version}; {fix}")
    return raw


def _json_default(obj: Any):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


@contextmanager
def atomic_dir(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `target` (which must not exist unless `force`).

    The old directory is moved aside first and deleted only after the new one is in place, so at every instant
    `target` is either the complete old or the complete new directory.
    """
    target = Path(target).expanduser()
    refuse_overwrite(target, force, "output directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = target.parent / f".{target.name}{TMP_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save`, except that a full disk comes out as OSError(ENOSPC) naming the file: torch's zip writer
    reports it only as a RuntimeError ('unexpected pos ...'), which no caller could tell from a bug."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        st = os.statvfs(Path(path).parent)
        if st.f_bavail * st.f_frsize < 4 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise
