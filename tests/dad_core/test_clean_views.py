"""Plain-CE training data (``CleanViews``) with ``train.replay_on_device``: the loader yields uint8 images and view
rows, and ``replay_views`` makes on the device the very views the loader would have made."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import default_collate

from dad_core.train_data import CleanViews, replay_views

RAND = "rand-m9-mstd0.5-inc1"


def _images(n: int = 12, side: int = 28) -> list[tuple[torch.Tensor, int]]:
    """An in-memory split as the cache's eval transform yields it: float [3, side, side] images in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(3, side, side, generator=gen), i % 3) for i in range(n)]


def _views(images, **kwargs) -> CleanViews:
    return CleanViews(images, image_size=20, seed=3, crop_scale=(0.2, 1.0), hflip=0.5, **kwargs)


@pytest.mark.parametrize("backend", ["", "tensor"])
def test_replayed_clean_views_are_the_loaders_views(backend):
    images = _images()
    extra = {"randaugment": RAND, "randaugment_backend": backend} if backend else {}
    in_loader, on_device = _views(images, **extra), _views(images, replay_on_device=True, **extra)
    for epoch in (0, 1):
        in_loader.set_epoch(epoch)
        on_device.set_epoch(epoch)
        want = default_collate([in_loader[i] for i in range(len(images))])
        items = [on_device[i] for i in range(len(images))]

        assert items[0]["clean"].dtype == torch.uint8 and items[0]["view"].shape == (6,)
        assert ("randaugment" in items[0]) == bool(backend)  # the draws are made in the loader
        got = replay_views(default_collate(items), 20, randaugment=RAND if backend else "")

        assert set(got) == {"clean", "label"}
        assert torch.equal(got["label"], want["label"])
        assert torch.equal(got["clean"], want["clean"])  # on a CPU the same pixels, bit for bit


def test_pil_randaugment_keeps_clean_views_in_the_loader(caplog):
    """timm's PIL ops have no device form: the loader makes the views, and says why once."""
    with caplog.at_level(logging.WARNING, logger="dad_core.train_data"):
        views = _views(_images(4), randaugment=RAND, randaugment_backend="pil", replay_on_device=True)
    item = views[0]
    assert item["clean"].dtype == torch.float32 and item["clean"].shape == (3, 20, 20) and "view" not in item
    assert "has no device form" in caplog.text
