"""Augmented views that can be stored and replayed exactly: crop box, flip, and a photometric seed.

``teacher_mode: cached`` (the FKD idea, Shen & Xing, ECCV 2022) needs the training loader to rebuild the very
view the teacher saw at cache time. A view is ``(top, left, height, width, flip, seed)`` on the stored
no-augmentation image; :func:`apply_view` is the only function that turns one into pixels, and both the cache
writer and the training loader call it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dad_core.distributed import copy_to_device

__all__ = ["ViewSpec", "apply_view", "apply_views", "sample_view", "sample_views"]


@dataclass(frozen=True)
class ViewSpec:
    top: int
    left: int
    height: int
    width: int
    flip: bool
    seed: int  # seeds the photometric op (RandAugment) so it replays identically


def sample_view(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float],
    hflip: float,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> ViewSpec:
    """RandomResizedCrop-style box (area fraction in ``scale``, aspect ratio in ``ratio``), flip and seed."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            break
    else:  # fall back to the whole image, as torchvision does after ten misses
        top, left, h, w = 0, 0, height, width
    flip = bool(rng.random() < hflip)
    return ViewSpec(top, left, h, w, flip, int(rng.integers(0, 2**31 - 1)))


def sample_views(
    n: int, views: int, height: int, width: int, rng: np.random.Generator, *, scale: tuple[float, float], hflip: float
) -> Tensor:
    """``[n, views, 6]`` int64 table of (top, left, height, width, flip, seed)."""
    table = torch.zeros(n, views, 6, dtype=torch.int64)
    for i in range(n):
        for r in range(views):
            v = sample_view(height, width, rng, scale=scale, hflip=hflip)
            table[i, r] = torch.tensor([v.top, v.left, v.height, v.width, int(v.flip), v.seed])
    return table


def apply_view(
    image: Tensor, view: Tensor | ViewSpec, size: int, *, randaugment: str = "", backend: str = "pil"
) -> Tensor:
    """Crop, resize to ``size``, flip, then the seeded photometric op. ``image``: uint8 or float ``[3, H, W]``.

    ``backend`` (``train.randaugment_backend``) picks the RandAugment implementation: ``pil`` (timm's PIL ops, CPU)
    or ``tensor`` (:func:`dad_core.randaugment.rand_augment`, the one :func:`apply_views` replays on a device).

    Returns:
        float32 ``[3, size, size]`` in [0, 1].
    """
    if isinstance(view, ViewSpec):
        top, left, h, w, flip, seed = view.top, view.left, view.height, view.width, int(view.flip), view.seed
    else:
        top, left, h, w, flip, seed = (int(v) for v in view.tolist())
    x = image[:, top : top + h, left : left + w]
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if (h, w) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        x = x.flip(-1)
    if randaugment and backend == "tensor":
        from dad_core.randaugment import rand_augment

        x = rand_augment(x[None], [seed], randaugment)[0]
    elif randaugment:
        x = _photometric(x, seed, randaugment)
    return x.clamp(0, 1)


def apply_views(
    images: Sequence[Tensor], views: Tensor, size: int, *, randaugment: str = "", drawn: Tensor | None = None
) -> list[Tensor]:
    """:func:`apply_view` for a batch, on the images' device (``train.replay_on_device``), with the ``tensor``
    RandAugment backend.

    Each sample is cropped, resized with the same antialiased bilinear interpolation and flipped as
    :func:`apply_view` does, so on a CPU the result is bit-identical and on a GPU it differs only by the
    interpolation kernel's rounding. The crop boxes differ in size, so crop and resize run per sample (one call for
    that sample in every tensor of ``images``, e.g. its clean image and its DAD sample); the conversion to floats,
    the flips, RandAugment (:func:`dad_core.randaugment.rand_augment`, each view drawn from its seed) and the clamp
    are batched.
    timm's PIL RandAugment has no identical tensor version, so a run with ``train.randaugment_backend: pil``
    replays on the CPU (:class:`~dad_core.train_data.DADPairs`).

    Args:
        images: tensors of uint8 or float ``[B, C, H, W]`` images on one device, all viewed through ``views``.
        views: ``[B, 6]`` int rows ``(top, left, height, width, flip, seed)``; the seed draws the RandAugment ops
            (a negative seed: none).
        size: output side.
        randaugment: timm ``rand-...`` string for the tensor backend; "" for none.
        drawn: the views' RandAugment draws made in the loader (``[B, layers, 2]``,
            :func:`dad_core.randaugment.encode_ops` of each view's seed, on the host), or None to draw from the seeds.

    Returns:
        For each tensor of ``images``, float32 ``[B, C, size, size]`` in [0, 1].
    """
    stack = torch.stack(list(images))  # [G, B, C, H, W]
    # to [0, 1] floats in one op for the whole batch, the values apply_view makes of each crop: on a GPU the host's
    # launches are the cost, and a per-sample conversion was two of the few per sample (the price: the whole images
    # in float32 for the step, 4x their uint8 size, about 150 MB for 2 x 128 at 224 px)
    stack = stack.float().div_(255.0) if stack.dtype == torch.uint8 else stack.float()
    boxes = views.detach().to("cpu", torch.int64).tolist()  # one transfer, not five per sample
    out = torch.empty(*stack.shape[:3], size, size, device=stack.device)
    # [G, C, H, W] views of each sample made in one op each (every view op is some host time on a GPU)
    for (top, left, h, w, _, _), image, target in zip(boxes, stack.unbind(1), out.unbind(1)):
        x = image[..., top : top + h, left : left + w]
        if (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        target.copy_(x)
    flipped = [b for b, row in enumerate(boxes) if row[4]]
    if flipped:  # the flipped samples in one gather, flip and scatter (a flip is exact: after the resize as ever)
        index = copy_to_device(torch.tensor(flipped), stack.device)
        out[:, index] = out[:, index].flip(-1)
    if randaugment:  # every tensor of `images` gets its sample's ops (a clean image and its DAD sample alike)
        from dad_core.randaugment import rand_augment

        groups = out.shape[0]
        seeds = None if drawn is not None else [row[5] for row in boxes] * groups
        draws = None if drawn is None else drawn.repeat(groups, 1, 1)
        out = rand_augment(out.flatten(0, 1), seeds, randaugment, drawn=draws).view_as(out)
    return list(out.clamp_(0, 1).unbind(0))


@lru_cache(maxsize=16)
def _pil_rand_augment(randaugment: str, translate_const: int):
    """timm's RandAugment transform, with its posterize accepting 0 bits.

    Pillow 13 refuses ``ImageOps.posterize(image, 0)``, which timm's ``PosterizeIncreasing`` asks for at magnitude
    10: with ``rand-m9-mstd0.5`` about one image in 500 would stop the run. Keeping 0 bits gives a black image, as
    older Pillows did (and as the tensor backend does).
    """
    from PIL import Image
    from timm.data.auto_augment import posterize, rand_augment_transform

    def posterize_any_bits(image, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(image.mode, image.size)
        return posterize(image, bits_to_keep, **kwargs)

    transform = rand_augment_transform(randaugment, {"translate_const": translate_const})
    for op in getattr(transform, "ops", []):
        if op.aug_fn is posterize:
            op.aug_fn = posterize_any_bits
    return transform


def _photometric(x: Tensor, seed: int, randaugment: str) -> Tensor:
    """timm RandAugment on a PIL image, with the global RNGs it draws from seeded so the same seed gives the same op.

    timm picks the ops with NumPy's global RNG and their magnitudes and probabilities with Python's: both are
    seeded here and restored afterwards, so the caller's random streams are left as they were.
    """
    from PIL import Image

    transform = _pil_rand_augment(randaugment, int(x.shape[-1] * 0.45))
    device, x = x.device, x.cpu()
    pil = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        out = transform(pil)
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
    return (torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0).to(device)
