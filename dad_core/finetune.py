"""Fine-tune the CLIP teacher on the training set, starting from its zero-shot head (WiSE-FT style).

The reference teacher is an ImageNet-fine-tuned CLIP (dad_method.md §1.2). Where no fine-tuned checkpoint
exists for a label set, this step makes one: AdamW with a small learning rate, cosine schedule with warmup,
the zero-shot head as the classifier's initialization, and optional weight-space interpolation with the
zero-shot weights (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dad_core.config import DADConfig
from dad_core.data import create_eval_transform, create_train_transform, open_split
from dad_core.distributed import set_seed
from dad_core.io import sha256_file
from dad_core.teacher import create_clip_classifier, save_teacher_checkpoint

__all__ = ["accuracy", "finetune_teacher", "wise_interpolate"]

_logger = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images.to(device)).argmax(-1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(total, 1)


def wise_interpolate(
    zero_shot: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` for floating tensors; others from ``fine_tuned``."""
    return {k: (1 - alpha) * zero_shot[k] + alpha * v if v.is_floating_point() else v for k, v in fine_tuned.items()}


def finetune_teacher(
    cfg: DADConfig,
    data_root: str | Path,
    output_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``cfg.teacher`` on ``data_root``'s train split and save a checkpoint ``create_clip_teacher`` loads.

    Returns:
        A JSON-able report: zero-shot and fine-tuned val top-1, epochs, images/s, output path and sha256.
    """
    ft, device = cfg.finetune, torch.device(device)
    set_seed(ft.seed)
    size = cfg.data.image_size
    train = open_split(
        data_root, "train", create_train_transform(size, scale=cfg.train.crop_scale, hflip=cfg.train.hflip)
    )
    val = open_split(data_root, "val", create_eval_transform(size))
    classnames = _classnames(data_root)
    model = create_clip_classifier(
        cfg.teacher.model_name, cfg.teacher.pretrained, classnames, cfg.teacher.templates, device=device
    )
    zero_shot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(ft.seed)
    train_loader = DataLoader(
        train, batch_size=ft.batch_size, shuffle=True, generator=gen, drop_last=True, num_workers=cfg.data.num_workers
    )
    val_loader = DataLoader(val, batch_size=256, num_workers=cfg.data.num_workers)
    zero_shot_top1 = accuracy(model, val_loader, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
    total = ft.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, ft.warmup_steps, total))
    seen, start = 0, time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune teacher", disable=not progress)
    for epoch in range(ft.epochs):
        model.train()
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device), label_smoothing=ft.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(labels)
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    if ft.wise_alpha < 1.0:
        model.load_state_dict(wise_interpolate(zero_shot, model.state_dict(), ft.wise_alpha))
    top1 = accuracy(model, val_loader, device)
    _logger.info("teacher val top-1: zero-shot %.2f%% -> fine-tuned %.2f%%", zero_shot_top1, top1)
    out = save_teacher_checkpoint(model, output_path, extra={"zero_shot_top1": zero_shot_top1, "top1": top1})
    return {
        "zero_shot_top1": zero_shot_top1,
        "top1": top1,
        "epochs": ft.epochs,
        "steps": total,
        "images_per_s": round(seen / max(seconds, 1e-9), 2),
        "seconds": round(seconds, 2),
        "wise_alpha": ft.wise_alpha,
        "output": str(out),
        "sha256": sha256_file(out),
    }


def _classnames(data_root: str | Path) -> list[str]:
    from dad_core.data import read_classes

    return list(read_classes(Path(data_root) / "classes.txt").names)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
