"""The DAD training step as a module: ``DADTask(batch) -> {"loss", "output", <named terms>}``.

The training loop knows nothing about DAD (STYLE rule 10). The teacher lives here only in
``teacher_mode: online``; it is frozen and is never wrapped in DDP (only the student is).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dad_core.config import LossConfig
from dad_core.distributed import copy_to_device
from dad_core.losses import DADLoss, soften

__all__ = ["DADTask", "mix_batch", "random_erase"]


def mix_batch(
    tensors: list[Tensor], targets: Tensor, *, mixup: float, cutmix: float, rng: np.random.Generator
) -> tuple[list[Tensor], Tensor, Tensor, float]:
    """Mixup or cutmix (one, chosen at random when both are on), pairing sample i with sample B-1-i.

    Every image tensor in ``tensors`` gets the same mix, so a clean image and its DAD sample stay paired.

    Args:
        tensors: image tensors ``[B, C, H, W]`` mixed identically, and ``[B, K]`` distributions per sample (the
            teacher's cached probabilities), which mix as ``targets`` do: by lambda, the box's share under cutmix.
        targets: ``[B, K]`` soft targets (one-hot with label smoothing).
        mixup: Beta(alpha, alpha) parameter of mixup; 0 = off.
        cutmix: Beta(alpha, alpha) parameter of cutmix; 0 = off.
        rng: NumPy RNG (its state is checkpointed, so a resumed run mixes the same way).

    Returns:
        Mixed tensors, mixed targets, the pairing permutation, and lambda (the weight of the unpermuted batch).
    """
    # made on the device: indexing a GPU tensor with a host index copies it from pageable memory, which waits for
    # everything queued on the GPU, every step
    perm = torch.arange(targets.shape[0] - 1, -1, -1, device=targets.device)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    if use_cutmix:
        h, w = tensors[0].shape[-2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share of the image left unpermuted

    def blend(t: Tensor) -> Tensor:
        return lam * t + (1 - lam) * t[perm]

    mixed = []
    for t in tensors:
        if use_cutmix and t.dim() == 4:  # an image under cutmix: the box comes from the paired sample
            t = t.clone()
            t[..., y0:y1, x0:x1] = t[perm][..., y0:y1, x0:x1]
        else:  # mixup, or a distribution per sample (the cache's teacher probabilities): by lambda, as the targets
            t = blend(t)
        mixed.append(t)
    return mixed, blend(targets), perm, lam


def random_erase(
    tensors: list[Tensor], *, prob: float, rng: np.random.Generator, mean: Tensor, std: Tensor
) -> list[Tensor]:
    """timm's RandomErasing with DeiT's settings (``mode="pixel"``, one box), batched on the images' device.

    Each sample, with probability ``prob``, gets a box of 2-33 % of its area with aspect ratio in [0.3, 3.3] (ten
    tries, as timm), filled with per-pixel Gaussian noise that the student's normalization turns into N(0, 1): timm
    erases after normalizing, these images are normalized inside the student. Every tensor gets the sample's box (a
    clean image and its DAD sample alike), each its own noise. One difference of place: timm erases in the dataset
    transform, before mixup/cutmix blends the noise; :class:`DADTask` erases in the step, after mixing.

    Args:
        tensors: ``[B, C, H, W]`` images in [0, 1].
        prob: ``train.reprob``.
        rng: NumPy RNG (checkpointed with the run, so a resumed run erases the same boxes).
        mean, std: the student's input normalization, broadcastable to ``[C, 1, 1]``.

    Returns:
        New tensors (the inputs are left as they were).
    """
    b, _, h, w = tensors[0].shape
    boxes = []
    for i in range(b):
        if rng.random() >= prob:
            continue
        for _ in range(10):
            area = rng.uniform(0.02, 1 / 3) * h * w
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < eh < h and 0 < ew < w:
                boxes.append((i, int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)), eh, ew))
                break
    if not boxes:
        return tensors
    device = tensors[0].device
    # one mask for the batch, built from the boxes in one copy: a few batched ops instead of a few per box; the host's
    # copies pinned and non-blocking (from pageable memory a copy waits for the GPU's queue, every step)
    index, top, left, eh, ew = copy_to_device(torch.tensor(boxes), device).unbind(1)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=device)
    mask[index] = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(0, 2**63 - 1)))
    mean, std = copy_to_device(mean.reshape(1, -1, 1, 1), device), copy_to_device(std.reshape(1, -1, 1, 1), device)
    out = []
    for t in tensors:
        noise = torch.empty_like(t, dtype=torch.float32).normal_(generator=gen)  # empty_like: t's memory format
        out.append(torch.where(mask, (mean + std * noise).to(t.dtype), t))
    return out


class DADTask(nn.Module):
    """Student + loss (+ the teacher in online mode) for one step.

    Batch keys: ``clean``, ``dad`` (``[B, 3, H, W]`` in [0, 1]; not needed without ``use_dad``), ``label`` (``[B]``),
    and in cached mode ``t_clean``, ``t_dad`` (teacher probabilities at temperature T, ``[B, K]``). For plain CE
    (``loss_cfg.uses_teacher`` false) no teacher runs and no teacher probabilities are read.

    ``reprob`` > 0 erases a random box of the student's inputs (:func:`random_erase`) in training mode, after
    mixup/cutmix; the teacher's soft labels are those of the images before erasing, stored or (online) computed.
    """

    def __init__(
        self,
        student: nn.Module,
        loss_cfg: LossConfig,
        *,
        num_classes: int,
        teacher: nn.Module | None = None,
        use_dad: bool = True,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        reprob: float = 0.0,
        input_mean: Tensor | None = None,
        input_std: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher  # frozen; excluded from DDP because DDP wraps self.student only
        self.loss = DADLoss(loss_cfg)
        # DAD samples enter variant A only through their KL term: with its weight at 0 they are left out entirely
        # (not even through BatchNorm), so the weight alone decides their effect.
        self.use_dad = use_dad and (loss_cfg.variant == "C" or loss_cfg.kd_weights[1] > 0)
        self.num_classes = num_classes
        self.label_smoothing, self.mixup, self.cutmix = label_smoothing, mixup, cutmix
        self.reprob = reprob
        # the student's normalization (plain attributes, not buffers: they are no state of the task)
        self.input_mean = input_mean if input_mean is not None else torch.tensor([0.485, 0.456, 0.406])
        self.input_std = input_std if input_std is not None else torch.tensor([0.229, 0.224, 0.225])
        self.temperature = loss_cfg.temperature
        self.variant = loss_cfg.variant
        self.uses_teacher = loss_cfg.uses_teacher

    def _teacher_probs(self, batch: dict[str, Tensor], key: str, images: Tensor) -> Tensor:
        if self.teacher is None:
            return batch[key]
        with torch.no_grad():
            return soften(self.teacher(images), self.temperature)

    def forward(self, batch: dict[str, Tensor], rng: np.random.Generator | None = None) -> dict[str, Tensor]:
        clean, labels = batch["clean"], batch["label"]
        targets: Tensor = labels
        images = [clean, batch["dad"]] if self.use_dad else [clean]
        cached = self.teacher is None and self.uses_teacher
        stored = [batch[k] for k in ("t_clean", "t_dad")[: len(images)]] if cached else []
        if self.mixup > 0 or self.cutmix > 0:
            off = self.label_smoothing / self.num_classes
            one_hot = F.one_hot(labels, self.num_classes).float() * (1 - self.label_smoothing) + off
            mixed, targets, perm, lam = mix_batch(
                images + stored, one_hot, mixup=self.mixup, cutmix=self.cutmix, rng=rng or np.random.default_rng()
            )
            images, stored = mixed[: len(images)], mixed[len(images) :]
        t_clean = None  # plain CE
        if self.uses_teacher:
            t_clean = stored[0] if stored else self._teacher_probs(batch, "t_clean", images[0])
        student_in = images
        if self.reprob > 0 and self.training:
            student_in = random_erase(
                images, prob=self.reprob, rng=rng or np.random.default_rng(), mean=self.input_mean, std=self.input_std
            )
        # One forward pass over clean + DAD: faster than two, and BatchNorm sees both (as in variant C).
        logits = self.student(torch.cat(student_in))
        s_clean = logits[: clean.shape[0]]
        if not self.use_dad:
            out = self.loss(s_clean, targets, t_clean)
        elif self.variant == "C":
            t_dad = stored[1] if stored else self._teacher_probs(batch, "t_dad", images[1])
            out = self.loss(logits, torch.cat([targets, targets]), torch.cat([t_clean, t_dad]))
        else:
            t_dad = stored[1] if stored else self._teacher_probs(batch, "t_dad", images[1])
            out = self.loss(s_clean, targets, t_clean, student_dad=logits[clean.shape[0] :], teacher_dad=t_dad)
        return {**out, "output": s_clean}
