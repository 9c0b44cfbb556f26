"""Atomic checkpoints: a directory holding ``state.safetensors`` (the state) and ``meta.json`` (what made them).

A killed writer leaves the previous checkpoint intact: both files are written into a temporary directory that
then replaces the old one by rename. The state is stored with :func:`dad_core.serialization.save_tree` (tensors as
safetensors, everything else as JSON), so reading a checkpoint never unpickles; a ``state.pt`` written by earlier
versions is still read, with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dad_core.errors import DADError
from dad_core.io import atomic_dir
from dad_core.serialization import WeightsFileError, load_torch_file, save_tree

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # torch pickles of earlier versions; read with weights_only=True
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
        save_tree(state, tmp / STATE_FILE)
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
    meta_path = directory / META_FILE
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        state_path = directory / LEGACY_STATE_FILE
    if not state_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {directory} (expected {STATE_FILE} and {META_FILE})")
    try:
        state = load_torch_file(state_path, map_location=map_location)
        meta = json.loads(meta_path.read_text())
    except WeightsFileError as err:
        raise CheckpointError(str(err)) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {directory}: {err}") from err
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{directory}: not a checkpoint written by training (expected a dict of states)")
    return state, meta
