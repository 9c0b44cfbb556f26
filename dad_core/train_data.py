"""Training data for DAD: paired clean / DAD views read from the teacher cache, in a resumable order.

Randomness is a pure function of ``(seed, epoch, index)``: which stored view a sample replays, or the fresh view
it draws. Together with :class:`ResumableSampler` this makes a resumed run see exactly the batches an
uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from dad_core.randaugment import encode_ops
from dad_core.teacher_cache import TeacherCache
from dad_core.views import apply_view, apply_views, sample_view

__all__ = ["REPLAY_HOST_KEYS", "CleanViews", "DADPairs", "ResumableSampler", "replay_views"]

_logger = logging.getLogger(__name__)
# the keys of a replay_on_device batch that replay_views reads on the host (and drops): moved to the GPU, reading
# them back would make the host wait for the step before
REPLAY_HOST_KEYS = ("view", "randaugment")


def _replays_on_device(replay_on_device: bool, randaugment: str, backend: str) -> bool:
    """Whether the views can be made in the training step: not with timm's PIL RandAugment, which is said once."""
    if replay_on_device and randaugment and backend != "tensor":
        _logger.warning(
            "replay_on_device: timm's PIL RandAugment (%s) has no device form; views replay on the CPU "
            "(train.randaugment_backend=tensor replays it on the device)",
            randaugment,
        )
        return False
    return replay_on_device


def _replay_item(view: Tensor, randaugment: str) -> dict[str, Tensor]:
    """The host part of a ``replay_on_device`` item: the ``[6]`` view row and, with RandAugment, its draws, made
    here so that the training step only applies them."""
    item = {"view": view}
    if randaugment:
        item["randaugment"] = encode_ops(int(view[5]), randaugment)
    return item


def _fresh_view(image: Tensor, rng: np.random.Generator, crop_scale: tuple[float, float], hflip: float) -> Tensor:
    """A new random view of a ``[3, H, W]`` image, as the ``[6]`` row :func:`~dad_core.views.apply_view` reads."""
    v = sample_view(image.shape[1], image.shape[2], rng, scale=crop_scale, hflip=hflip)
    return torch.tensor([v.top, v.left, v.height, v.width, int(v.flip), v.seed])


class DADPairs(Dataset):
    """Item ``i`` of epoch ``e``: a view of clean image i and the same view of its DAD sample.

    ``replay=True`` replays one of the R stored views (the one the teacher scored at cache time) and, with
    ``with_teacher=True``, returns the stored teacher probabilities for it. ``replay=False`` draws a fresh view
    (teacher_mode online, the reference behaviour). Without stored views, the full no-augmentation image and its
    stored soft labels are used.

    ``replay_on_device=True`` (``train.replay_on_device``) leaves the pixels to the training step: items hold the
    stored uint8 ``clean``/``dad`` images, the ``[6]`` ``view`` to replay (the same view the CPU path would
    apply) and, with RandAugment, its draws (``randaugment``, :func:`~dad_core.randaugment.encode_ops`), and
    :func:`replay_views` turns a batch of them into views on the device. With ``randaugment`` it needs
    ``randaugment_backend="tensor"``; with the ``pil`` backend it is ignored, with a warning: timm's RandAugment runs
    on PIL images and has no identical device form.
    """

    def __init__(
        self,
        cache: TeacherCache,
        *,
        image_size: int,
        seed: int,
        replay: bool,
        with_teacher: bool,
        crop_scale: tuple[float, float],
        hflip: float,
        randaugment: str = "",
        randaugment_backend: str = "pil",
        replay_on_device: bool = False,
    ) -> None:
        self.cache, self.image_size, self.seed = cache, image_size, seed
        self.replay, self.with_teacher = replay and cache.views > 0, with_teacher
        self.crop_scale, self.hflip, self.randaugment = crop_scale, hflip, randaugment
        self.backend = randaugment_backend
        self.on_device = _replays_on_device(replay_on_device, randaugment, randaugment_backend)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        shard, offset = self.cache.item(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        clean, dad = shard["clean"][offset], shard["dad"][offset]
        item: dict[str, Tensor] = {"label": shard["labels"][offset].long()}
        if self.replay:
            r = int(rng.integers(0, self.cache.views))
            view = shard["views"][offset, r]
        elif self.cache.views == 0 and self.with_teacher:
            r, view = None, None
        else:
            r, view = None, _fresh_view(clean, rng, self.crop_scale, self.hflip)
        if self.on_device:  # no view: the whole image, resized as in the branch below; seed -1: no RandAugment
            whole = torch.tensor([0, 0, *clean.shape[1:], 0, -1])
            item.update(_replay_item(view if view is not None else whole, self.randaugment))
        for name, image in (("clean", clean), ("dad", dad)):
            if self.on_device:
                item[name] = image  # uint8 as stored; collating copies it out of the memory-mapped shard
            elif view is None:
                item[name] = torch.nn.functional.interpolate(
                    image[None].float() / 255.0, size=(self.image_size,) * 2, mode="bilinear", antialias=True
                )[0]
            else:
                item[name] = apply_view(
                    image, view, self.image_size, randaugment=self.randaugment, backend=self.backend
                )
            if self.with_teacher:
                item[f"t_{name}"] = self.cache.probs(shard, offset, name, view=r)
        return item


def replay_views(batch: dict[str, Tensor], image_size: int, *, randaugment: str = "") -> dict[str, Tensor]:
    """Turn a ``replay_on_device`` batch into the batch the CPU replay yields, on the batch's device.

    Args:
        batch: a collated :class:`DADPairs` (or :class:`CleanViews`) batch with uint8 ``[B, 3, H, W]``
            ``clean``/``dad`` (``clean`` alone from :class:`CleanViews`), ``[B, 6]``
            ``view`` and, with RandAugment, the ``[B, layers, 2]`` ``randaugment`` draws (both on the host); a batch
            without ``view`` is returned as it is.
        image_size: the side of the views.
        randaugment: the run's ``train.randaugment``; only read for a batch with ``view``, which
            :class:`DADPairs` yields with RandAugment only for the ``tensor`` backend.

    Returns:
        The batch with float ``[B, 3, image_size, image_size]`` views in [0, 1] and no ``view`` or ``randaugment``.
    """
    if "view" not in batch:
        return batch
    out = {key: value for key, value in batch.items() if key not in REPLAY_HOST_KEYS}
    names = [name for name in ("clean", "dad") if name in batch]
    images = [batch[name] for name in names]
    drawn = batch.get("randaugment") if randaugment else None
    views = apply_views(images, batch["view"], image_size, randaugment=randaugment, drawn=drawn)
    out.update(zip(names, views, strict=True))
    return out


class CleanViews(Dataset):
    """Item ``i`` of epoch ``e``: a fresh view of training image i and its label; no DAD sample, no teacher.

    Plain cross-entropy training (both KL weights 0) reads the dataset directly, without a teacher cache. The
    images get the bytes a cache would store (``images`` should use the cache's resize + center-crop transform,
    rounded here to uint8) and the views are drawn exactly as :class:`DADPairs` draws fresh ones, so a plain-CE
    run sees the same augmentation as an online-teacher run with the same seed.

    ``replay_on_device=True`` leaves the pixels to the training step as :class:`DADPairs` does: items hold the uint8
    ``clean`` image, its ``view`` row and, with the ``tensor`` RandAugment, the view's draws.
    """

    def __init__(
        self,
        images: Dataset,
        *,
        image_size: int,
        seed: int,
        crop_scale: tuple[float, float],
        hflip: float,
        randaugment: str = "",
        randaugment_backend: str = "pil",
        replay_on_device: bool = False,
    ) -> None:
        self.images, self.image_size, self.seed = images, image_size, seed
        self.crop_scale, self.hflip, self.randaugment = crop_scale, hflip, randaugment
        self.backend = randaugment_backend
        self.on_device = _replays_on_device(replay_on_device, randaugment, randaugment_backend)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, label = self.images[index]
        clean = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)  # as the teacher cache stores it
        view = _fresh_view(clean, np.random.default_rng([self.seed, self.epoch, index]), self.crop_scale, self.hflip)
        label = torch.tensor(label, dtype=torch.long)
        if self.on_device:
            return {"clean": clean, "label": label, **_replay_item(view, self.randaugment)}
        return {
            "clean": apply_view(clean, view, self.image_size, randaugment=self.randaugment, backend=self.backend),
            "label": label,
        }


class ResumableSampler(Sampler[int]):
    """This rank's indices for an epoch, in a seeded order, optionally starting after ``start_batch`` batches.

    The order is ``randperm(n, seed + epoch)``, truncated to a multiple of ``world_size * batch_size`` (every rank
    gets the same number of full batches), then strided by rank.
    """

    def __init__(self, n: int, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n, self.batch_size, self.rank, self.world_size, self.seed = n, batch_size, rank, world_size, seed
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one batch of {batch_size} per rank x {world_size} ranks")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        keep = self.batches_per_epoch * self.batch_size * self.world_size
        mine = order[:keep][self.rank :: self.world_size]
        return iter(mine[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
