"""Fine-tune the CLIP teacher on the training set, starting from its zero-shot head (WiSE-FT style).

The reference teacher is an ImageNet-fine-tuned CLIP (dad_method.md §1.2). Where no fine-tuned checkpoint
exists for a label set, this step makes one: AdamW with a small learning rate, cosine schedule with warmup,
the zero-shot head as the classifier's initialization, and optional weight-space interpolation with the
zero-shot weights (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022).

The reference teacher owes its out-of-distribution robustness to CLIP's web-scale pretraining, which a tiny
random-init CLIP does not have. ``finetune.augment: broad`` stands in for it: :func:`broad_augment` trains the
teacher on one family of shifts (geometry, colour casts, Gaussian blur, speckle noise, occlusion) and the
evaluation suites' own shifts stay held out: no ImageNet-C corruption of :mod:`dad_core.corruptions` and no
digits-R rendition is ever applied here (the README lists what overlaps in kind). The report then states the
teacher's own top-1 on every evaluation suite, so a run shows how much robustness there is to distil.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dad_core.config import DADConfig
from dad_core.data import create_eval_transform, create_train_transform, open_split
from dad_core.distributed import set_seed
from dad_core.evaluate import evaluate_ood
from dad_core.io import sha256_file
from dad_core.progress import progress_bar
from dad_core.teacher import create_clip_classifier, save_teacher_checkpoint

__all__ = ["accuracy", "broad_augment", "finetune_teacher", "wise_interpolate"]

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


def broad_augment(images: Tensor, *, generator: torch.Generator) -> Tensor:
    """The teacher's training shifts, drawn per image from ``generator``; a new ``[0, 1]`` batch of the same shape.

    In order, each with its own probability: a random affine warp (rotation, scale, shear, translation; never a
    flip, which changes a digit's meaning), a colour cast (background and foreground colours per channel, the
    foreground kept brighter in every channel, so polarity never flips), Gaussian blur and speckle noise (two of
    ImageNet-C's four *validation* corruptions, which Hendrycks & Dietterich set aside for tuning because they are
    not among the 15 test corruptions), and random erasing with noise. The same generator state gives the same
    batch; ``images`` is not modified.

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        generator: a CPU ``torch.Generator``, the only source of randomness.
    """
    b, c, h, w = images.shape
    device, dtype = images.device, images.dtype

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return (torch.rand(b, *shape, generator=generator) * (hi - lo) + lo).to(device, dtype)

    def chosen(p: float) -> Tensor:
        return (torch.rand(b, generator=generator) < p).to(device).view(b, 1, 1, 1)

    x = images
    # affine warp about the centre: rotation +-15 deg, scale 0.85-1.15, shear +-0.15, shift +-10 %
    angle, scale, shear = uniform(-math.pi / 12, math.pi / 12), uniform(0.85, 1.15), uniform(-0.15, 0.15)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear * cos, uniform(-0.2, 0.2)], 1), torch.stack([sin, cos, uniform(-0.2, 0.2)], 1)],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.where(chosen(0.7), F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False), x)
    # colour cast: x -> bg + x * (fg - bg) per channel, bg in [0, 0.4], fg in [0.6, 1]
    bg, fg = uniform(0.0, 0.4, c, 1, 1), uniform(0.6, 1.0, c, 1, 1)
    x = torch.where(chosen(0.5), bg + x * (fg - bg), x)
    # Gaussian blur, sigma 0.3-1.2 px (5x5 separable kernel per image)
    offsets = torch.arange(-2, 3, device=device, dtype=dtype)
    kernel = torch.exp(-(offsets**2) / (2 * uniform(0.3, 1.2, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B * C, 5]
    flat = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, 5), groups=b * c)
    blurred = F.conv2d(flat, kernel.view(b * c, 1, 5, 1), groups=b * c).view(b, c, h, w)
    x = torch.where(chosen(0.3), blurred, x)
    # speckle noise: x + x * N(0, s^2), s in 0.05-0.35
    noise = torch.randn(b, c, h, w, generator=generator).to(device, dtype)
    x = torch.where(chosen(0.3), x + x * noise * uniform(0.05, 0.35, 1, 1, 1), x)
    # random erasing: one rectangle (2-20 % of the area, aspect 1:3-3:1) filled with uniform noise
    area, aspect = uniform(0.02, 0.2) * h * w, torch.exp(uniform(-math.log(3), math.log(3)))
    eh, ew = (area * aspect).sqrt().clamp(1, h), (area / aspect).sqrt().clamp(1, w)
    top, left = uniform(0, 1) * (h - eh), uniform(0, 1) * (w - ew)
    rows = torch.arange(h, device=device, dtype=dtype).view(1, h, 1)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, 1, w)
    inside = (rows >= top.view(b, 1, 1)) & (rows < (top + eh).view(b, 1, 1))
    inside = inside & (cols >= left.view(b, 1, 1)) & (cols < (left + ew).view(b, 1, 1))
    fill = torch.rand(b, c, h, w, generator=generator).to(device, dtype)
    x = torch.where(chosen(0.2) & inside.unsqueeze(1), fill, x)
    return x.clamp(0, 1)


def finetune_teacher(
    cfg: DADConfig,
    data_root: str | Path,
    output_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``cfg.teacher`` on ``data_root``'s train split and save a checkpoint ``create_clip_teacher`` loads.

    Training images go through :func:`broad_augment` when ``cfg.finetune.augment`` is ``broad``; validation and
    the suites never do. With ``cfg.finetune.eval_suites`` the fine-tuned teacher is scored on the evaluation
    suites (:func:`dad_core.evaluate.evaluate_ood` with ``data.root`` set to ``data_root``).

    Returns:
        A JSON-able report: zero-shot and fine-tuned val top-1, the suites' top-1 (``suites``, ``clean_top1``,
        ``ood_mean_top1``; also stored in the checkpoint), epochs, images/s, output path and sha256.
    """
    ft, device = cfg.finetune, torch.device(device)
    set_seed(ft.seed)
    size = cfg.data.image_size
    if ft.augment == "broad":  # broad_augment does the geometry: its affine warp replaces the random crop
        train = open_split(data_root, "train", create_eval_transform(size))
    else:
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
    augment_gen = torch.Generator().manual_seed(ft.seed + 1)
    seen, start = 0, time.perf_counter()
    bar = progress_bar(total=total, desc="fine-tune teacher", unit="step", enabled=progress)
    for epoch in range(ft.epochs):
        model.train()
        for images, labels in train_loader:
            if ft.augment == "broad":
                images = broad_augment(images, generator=augment_gen)
            loss = F.cross_entropy(model(images.to(device)), labels.to(device), label_smoothing=ft.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(labels)
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    if ft.wise_alpha < 1.0:
        model.load_state_dict(wise_interpolate(zero_shot, model.state_dict(), ft.wise_alpha))
    top1 = accuracy(model, val_loader, device)
    _logger.info("teacher val top-1: zero-shot %.2f%% -> fine-tuned %.2f%%", zero_shot_top1, top1)
    ood = _suite_top1(model, cfg, data_root, device) if ft.eval_suites else {}
    out = save_teacher_checkpoint(
        model, output_path, extra={"zero_shot_top1": zero_shot_top1, "top1": top1, "augment": ft.augment, **ood}
    )
    return {
        "zero_shot_top1": zero_shot_top1,
        "top1": top1,
        **ood,
        "augment": ft.augment,
        "epochs": ft.epochs,
        "steps": total,
        "images_per_s": round(seen / max(seconds, 1e-9), 2),
        "seconds": round(seconds, 2),
        "wise_alpha": ft.wise_alpha,
        "output": str(out),
        "sha256": sha256_file(out),
    }


def _suite_top1(model: nn.Module, cfg: DADConfig, data_root: str | Path, device: torch.device) -> dict[str, Any]:
    """The teacher's top-1 on each evaluation suite that ran, the clean top-1 and the OOD mean, as evaluate reports."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    report = evaluate_ood(model, cfg, device=device)
    suites = {name: r["top1"] for name, r in report["suites"].items() if r.get("status") == "ok"}
    _logger.info("teacher suite top-1: %s", ", ".join(f"{name} {top1:.2f}%" for name, top1 in suites.items()))
    return {"suites": suites, "clean_top1": report["clean_top1"], "ood_mean_top1": report["ood_mean_top1"]}


def _classnames(data_root: str | Path) -> list[str]:
    from dad_core.data import read_classes

    return list(read_classes(Path(data_root) / "classes.txt").names)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
