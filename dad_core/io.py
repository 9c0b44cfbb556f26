"""Small file helpers: atomic writes and content hashes. A killed step leaves the old file or the new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "save_torch",
    "sha256_file",
    "sha256_if_file",
]


def _umask_mode(mode: int) -> int:
    """``mode`` masked by the process umask, as ``open()``/``mkdir()`` would create it.

    ``mkstemp``/``mkdtemp`` create 0600 files and 0700 directories; renamed into place unchanged, outputs
    would be unreadable to a later step running under another user (a different pod's ``runAsUser``).
    """
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_path(path: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(_umask_mode(0o666))
    try:
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_path(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class atomic_dir:  # noqa: N801 - used like a function: ``with atomic_dir(out) as tmp: ...``
    """Context manager yielding a temporary directory that replaces ``path`` when the block succeeds."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self.tmp.chmod(_umask_mode(0o777))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save`` to ``path`` atomically, with the same bytes for the same object on every run.

    Writing through a file object matters: given a path, torch names the archive's records after the file name,
    which is a random temporary name here, so equal objects would get different checksums.
    """
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    return atomic_path(Path(path), write)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_if_file(path: str | Path | None) -> str | None:
    """Hex SHA-256 of a local file, or None for no path, a remote URI or a missing file (nothing to check here)."""
    return sha256_file(Path(path)) if path and Path(path).is_file() else None
