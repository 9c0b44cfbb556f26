"""The one place that reads the process environment: torchrun's variables, and a few service settings.

Without ``RANK``/``WORLD_SIZE`` set, every helper here behaves as a single process on rank 0, so the same
code runs under ``python``, ``torchrun --nproc_per_node N``, a Kubeflow Trainer pod and a unit test. The device
helpers (which device, how a host tensor gets there without waiting) live here too.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "WorldInfo",
    "barrier",
    "cleanup_distributed",
    "copy_arrays_to_device",
    "copy_to_device",
    "getenv",
    "init_distributed",
    "is_primary",
    "resolve_device",
    "set_seed",
    "world_info_from_env",
]


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def getenv(name: str, default: str | None = None) -> str | None:
    """Read one environment variable (service settings such as ``MLFLOW_TRACKING_URI``)."""
    return os.environ.get(name, default)


def world_info_from_env() -> WorldInfo:
    """Rank, local rank and world size as torchrun (or a Trainer/PyTorchJob pod) exports them."""
    return WorldInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def resolve_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """``device`` as given, else this process's GPU when one is present, else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def copy_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor goes to a GPU through pinned memory, without blocking: a plain copy from
    pageable memory waits for everything queued on the GPU, which would stall a training step that queues work
    ahead. Anything else is ``t.to(device)`` (nothing to do for a tensor already there)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def copy_arrays_to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays on ``device`` in one :func:`copy_to_device` (one copy, not one per array, each a launch): packed
    as float64, which holds float32 values and integers below 2**53 exactly, and returned as float64 views in each
    array's shape."""
    packed = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    parts = copy_to_device(torch.from_numpy(packed), device).split([a.size for a in arrays])
    return [part.view(a.shape) for part, a in zip(parts, arrays, strict=True)]


def init_distributed(device: str | None = None) -> tuple[WorldInfo, torch.device]:
    """Join the process group when launched by torchrun (nccl on GPU, gloo on CPU); a no-op otherwise.

    Returns:
        The world info and the device this process should use.
    """
    info = world_info_from_env()
    dev = resolve_device(device, info.local_rank)
    if info.distributed and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_primary() -> bool:
    """True on rank 0 (and in a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return world_info_from_env().rank == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def set_seed(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch with ``seed + rank`` so ranks draw different augmentations."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % (2**32))
    torch.manual_seed(value)
