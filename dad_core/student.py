"""Students: any timm model, wrapped to take [0, 1] images and normalize them itself (STYLE rule 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dad_core.checkpoint import CheckpointError, load_checkpoint
from dad_core.serialization import state_dict_mismatch

__all__ = ["Student", "create_student", "load_student", "unwrap_model"]


class Student(nn.Module):
    """``Normalize(mean, std) -> timm model``. Input ``[B, 3, H, W]`` in [0, 1]; output ``[B, K]`` logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))


def create_student(
    name: str, num_classes: int, *, pretrained: bool = False, drop_path: float = 0.0, image_size: int | None = None
) -> Student:
    """Build a timm model by name (``timm.create_model``) inside a normalizing wrapper.

    ViT-style models get ``img_size=image_size`` so small inputs (32 px digits) work.
    """
    import timm

    kwargs: dict[str, Any] = {"pretrained": pretrained, "num_classes": num_classes}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if image_size is not None and _takes_img_size(name):
        kwargs["img_size"] = image_size
    return Student(timm.create_model(name, **kwargs))


def _takes_img_size(name: str) -> bool:
    return any(key in name for key in ("vit", "deit", "swin", "eva", "beit", "maxvit", "coatnet"))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def load_student(path: str | Path, device: str | torch.device = "cpu", *, use_ema: bool = True) -> Student:
    """Load a trained student from a checkpoint directory written by training (state.safetensors + meta.json).

    Uses the EMA weights when the checkpoint has them and ``use_ema`` is set.

    Raises:
        CheckpointError: the directory is not a student checkpoint, or its weights do not fit the model it names.
    """
    state, meta = load_checkpoint(path, map_location="cpu")
    missing = [key for key in ("model", "num_classes") if key not in meta]
    if missing or not isinstance(state.get("model"), dict):
        raise CheckpointError(
            f"{path}: not a student checkpoint (meta.json lacks {missing or 'nothing'}, state has "
            f"{'no' if not isinstance(state.get('model'), dict) else 'a'} 'model')"
        )
    student = create_student(meta["model"], meta["num_classes"], image_size=meta.get("image_size"))
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    try:
        student.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit {meta['model']} ({state_dict_mismatch(err)})") from None
    return student.to(device).eval()
