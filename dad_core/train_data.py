"""Training data for DAD: paired clean / DAD views read from the teacher cache, in a resumable order.

Randomness is a pure function of ``(seed, epoch, index)``: which stored view a sample replays, or the fresh view
it draws. Together with :class:`ResumableSampler` this makes a resumed run see exactly the batches an
uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from dad_core.teacher_cache import TeacherCache
from dad_core.views import apply_view, sample_view

__all__ = ["DADPairs", "ResumableSampler"]


class DADPairs(Dataset):
    """Item ``i`` of epoch ``e``: a view of clean image i and the same view of its DAD sample.

    ``replay=True`` replays one of the R stored views (the one the teacher scored at cache time) and, with
    ``with_teacher=True``, returns the stored teacher probabilities for it. ``replay=False`` draws a fresh view
    (teacher_mode online, the reference behaviour). Without stored views, the full no-augmentation image and its
    stored soft labels are used.
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
    ) -> None:
        self.cache, self.image_size, self.seed = cache, image_size, seed
        self.replay, self.with_teacher = replay and cache.views > 0, with_teacher
        self.crop_scale, self.hflip, self.randaugment = crop_scale, hflip, randaugment
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
            r = None
            v = sample_view(clean.shape[1], clean.shape[2], rng, scale=self.crop_scale, hflip=self.hflip)
            view = torch.tensor([v.top, v.left, v.height, v.width, int(v.flip), v.seed])
        for name, image in (("clean", clean), ("dad", dad)):
            if view is None:
                item[name] = torch.nn.functional.interpolate(
                    image[None].float() / 255.0, size=(self.image_size,) * 2, mode="bilinear", antialias=True
                )[0]
            else:
                item[name] = apply_view(image, view, self.image_size, randaugment=self.randaugment)
            if self.with_teacher:
                item[f"t_{name}"] = self.cache.probs(shard, offset, name, view=r)
        return item


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
