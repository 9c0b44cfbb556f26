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

from dad_core.distributed import copy_arrays_to_device

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
    :func:`apply_view` does, for all samples at once: the crop boxes differ in size, so each sample gets its own taps
    (made on the host from torch's own weights, :func:`_tap_bank`), and a few gathers and multiply-adds resize the
    whole batch in a number of ops that does not grow with it (it was two per sample, the host's launches being the
    cost on a GPU). On a CPU the result is bit-identical to :func:`apply_view` for crops up to twice ``size`` (every
    crop the product makes: the cache stores its images at ``size``); past that, and on a GPU, a value may differ in
    its last bit, where torch's compiled kernel (or the GPU) fuses a multiply-add this sum rounds twice. The
    conversion to floats, RandAugment (:func:`dad_core.randaugment.rand_augment`, each view drawn from its seed) and
    the clamp are batched too; every tensor of ``images`` (e.g. a clean image and its DAD sample) gets its sample's
    view. The price is work: every row of every image is resampled with the batch's widest taps, so on a CPU (a
    cache written without a GPU) a 224 px batch takes 2-3x the per-sample resize's time; a GPU does that work in
    about a millisecond.

    timm's PIL RandAugment has no identical tensor version, so a run with ``train.randaugment_backend: pil``
    replays on the CPU (:class:`~dad_core.train_data.DADPairs`).

    Args:
        images: tensors of uint8 or finite float ``[B, C, H, W]`` images on one device, all viewed through
            ``views`` (an infinite value becomes NaN: the padding taps weigh every pixel by 0).
        views: ``[B, 6]`` int rows ``(top, left, height, width, flip, seed)``; the seed draws the RandAugment ops
            (a negative seed: none).
        size: output side.
        randaugment: timm ``rand-...`` string for the tensor backend; "" for none.
        drawn: the views' RandAugment draws made in the loader (``[B, layers, 2]``,
            :func:`dad_core.randaugment.encode_ops` of each view's seed, on the host), or None to draw from the seeds.

    Returns:
        For each tensor of ``images``, float32 ``[B, C, size, size]`` in [0, 1].

    Raises:
        ValueError: a view row that is not a box inside the images.
    """
    stack = torch.stack(list(images))  # [G, B, C, H, W]
    # to [0, 1] floats in one op for the whole batch, the values apply_view makes of each crop: on a GPU the host's
    # launches are the cost, and a per-sample conversion was two of the few per sample (the price: the whole images
    # in float32 for the step, 4x their uint8 size, about 150 MB for 2 x 128 at 224 px)
    stack = stack.float().div_(255.0) if stack.dtype == torch.uint8 else stack.float()
    boxes = views.detach().to("cpu", torch.int64).numpy()  # one transfer, not five per sample
    (index_x, weight_x), (index_y, weight_y) = _resize_tables(boxes, size, *stack.shape[-2:], stack.device)
    # every sample's crop, resize and flip at once: width, then height, as torch's own antialiased resize runs
    out = _resize_pass(_resize_pass(stack, index_x, weight_x, dim=-1), index_y, weight_y, dim=-2)
    if randaugment:  # every tensor of `images` gets its sample's ops (a clean image and its DAD sample alike)
        from dad_core.randaugment import rand_augment

        groups = out.shape[0]
        seeds = None if drawn is not None else boxes[:, 5].tolist() * groups
        draws = None if drawn is None else drawn.repeat(groups, 1, 1)
        out = rand_augment(out.flatten(0, 1), seeds, randaugment, drawn=draws).view_as(out)
    return list(out.clamp_(0, 1).unbind(0))


@lru_cache(maxsize=8)
def _tap_bank(size: int, longest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The taps of torch's antialiased bilinear resize from every length ``n`` in ``1..longest`` to ``size``.

    Returns ``index`` int64 and ``weight`` float32, both ``[longest + 1, size, T]``: output ``i`` of a length-``n``
    row is ``sum_t weight[n, i, t] * row[index[n, i, t]]``, taps in ascending order as torch sums them; and ``taps``
    ``[longest + 1]``, how many of the ``T`` a length needs (the rest have weight 0 on an index in range).

    The weights are torch's own: resizing an identity matrix gives each weight times 1 plus zeros, exactly, so the
    batched resize has no formula of its own to drift from ``F.interpolate``'s. A length equal to ``size`` is one tap
    of weight 1 (torch skips that pass). Made once per (size, longest); about 0.1 s for 224 px images.
    """
    per_length = [(np.zeros((size, 1), np.int64), np.zeros((size, 1), np.float32))]  # 0: no box has it
    for n in range(1, longest + 1):
        if n == size:
            per_length.append((np.arange(size)[:, None], np.ones((size, 1), np.float32)))
            continue
        eye = torch.eye(n)[None, None]
        dense = F.interpolate(eye, size=(n, size), mode="bilinear", align_corners=False, antialias=True)[0, 0].T.numpy()
        nonzero = dense != 0  # an output's nonzero weights are one run (the triangle filter's support)
        first = nonzero.argmax(1)
        count = np.where(nonzero.any(1), n - nonzero[:, ::-1].argmax(1) - first, 1)
        steps = np.arange(int(count.max()))
        used = steps < count[:, None]
        index = np.where(used, np.minimum(first[:, None] + steps, n - 1), first[:, None])
        per_length.append((index, np.where(used, np.take_along_axis(dense, index, 1), 0).astype(np.float32)))
    taps = np.array([index.shape[1] for index, _ in per_length])
    index = np.zeros((longest + 1, size, taps.max()), np.int64)
    weight = np.zeros((longest + 1, size, taps.max()), np.float32)
    for n, (i, w) in enumerate(per_length):  # padded: index in range (the first tap's), weight 0
        index[n] = np.concatenate([i, np.repeat(i[:, :1], index.shape[2] - i.shape[1], 1)], 1)
        weight[n, :, : w.shape[1]] = w
    return index, weight, taps


def _resize_tables(
    boxes: np.ndarray, size: int, height: int, width: int, device: torch.device
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Per-sample taps of the crop, resize and flip of every view row in ``boxes`` (``[B, 6]``) on ``height x
    width`` images, for :func:`_resize_pass`: ``(index, weight)`` for the width, then for the height, each
    ``[T, B, size]`` on ``device``, made on the host with NumPy and sent in one copy."""
    top, left, h, w, flip = (boxes[:, k] for k in range(5))
    outside = (h < 1) | (w < 1) | (top < 0) | (left < 0) | (top + h > height) | (left + w > width)
    if outside.any():  # a gather past the image would be an error on a CPU and a device-side assert on a GPU
        bad = boxes[outside.argmax()].tolist()
        raise ValueError(f"view row {bad} (top, left, height, width, ...) is not a box in a {height}x{width} image")
    index, weight, taps = _tap_bank(size, max(height, width))
    tables = []
    for length, offset in ((w, left), (h, top)):
        t = int(taps[length].max()) if len(boxes) else 1
        tables.append([index[length, :, :t] + offset[:, None, None], weight[length, :, :t]])
    flipped = flip.astype(bool)
    for table in tables[0]:  # a flip reverses the width's outputs: exact, and free
        table[flipped] = table[flipped, ::-1]
    # [T, B, size] so each tap's rows are one contiguous block; all four in one copy
    x_index, x_weight, y_index, y_weight = copy_arrays_to_device(
        [np.moveaxis(t, -1, 0) for pair in tables for t in pair], device
    )
    return (x_index.long(), x_weight.float()), (y_index.long(), y_weight.float())


def _resize_pass(x: Tensor, index: Tensor, weight: Tensor, *, dim: int) -> Tensor:
    """Resample ``x`` (``[G, B, C, H, W]``) along ``dim`` (-1 or -2) with each sample's taps (``[T, B, size]``).

    Tap by tap: the first a product, the others one multiply-add onto the sum (``addcmul``), in the order of torch's
    CPU kernel and, for up to four taps (downscaling by up to 2x), with its rounding: there the result is
    bit-identical to ``F.interpolate`` on a CPU (a test holds it). With more taps torch's compiled loop fuses some
    multiply-adds into one rounding, so a value may differ in its last bit. A padding tap adds ``0 * x``, which
    changes nothing. 2 ops per tap, whatever the batch size.
    """
    taps, batch, size = index.shape
    shape = [1, batch, 1, 1, 1]
    shape[dim] = size
    out_shape = list(x.shape)
    out_shape[dim] = size
    out = None
    for t in range(taps):
        sample = x.gather(dim, index[t].view(shape).expand(out_shape))
        w = weight[t].view(shape)
        out = sample.mul_(w) if out is None else out.addcmul_(sample, w)
    return out


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
