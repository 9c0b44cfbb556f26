"""Atomic checkpoints: a directory holding ``state.pt`` (tensors) and ``meta.json`` (what made them).

A killed writer leaves the previous checkpoint intact: both files are written into a temporary directory that
then replaces the old one by rename.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from dad_core.errors import DADError
from dad_core.io import atomic_dir

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(DADError):
    """A checkpoint directory is missing, incomplete or unreadable."""


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Write ``state`` (a dict of state dicts / tensors / plain values) and JSON ``meta`` atomically.

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        with open(tmp / STATE_FILE, "wb") as handle:  # a file object keeps the bytes independent of the name
            torch.save(state, handle)
        (tmp / META_FILE).write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str) + "\n")
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(state, meta)``.

    Raises:
        CheckpointError: the directory or one of its files is missing or unreadable.
    """
    directory = Path(directory)
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    if not state_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {directory} (expected {STATE_FILE} and {META_FILE})")
    try:
        state = torch.load(state_path, map_location=map_location, weights_only=False)
        meta = json.loads(meta_path.read_text())
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read checkpoint {directory}: {err}") from err
    return state, meta
