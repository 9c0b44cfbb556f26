"""Replayable views (dad_core.views): a stored (crop box, flip, seed) gives the same pixels every time, the box
respects the RandomResizedCrop bounds and stays inside the image, and the seeded photometric op replays exactly."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dad_core.views import ViewSpec, apply_view, sample_view, sample_views

RAND = "rand-m9-mstd0.5-inc1"


def _image(h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """A uint8 ``[3, h, w]`` image whose pixels all differ from their mirror images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)


def test_the_same_view_twice_gives_identical_pixels():
    image = _image()
    view = ViewSpec(3, 5, 20, 17, True, 1234)
    first = apply_view(image, view, 24)
    assert first.dtype == torch.float32 and first.shape == (3, 24, 24)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert torch.equal(first, apply_view(image, view, 24))
    as_row = torch.tensor([3, 5, 20, 17, 1, 1234])  # the int64 row stored in the cache
    assert torch.equal(first, apply_view(image, as_row, 24))


def test_a_native_size_view_is_exactly_the_crop_box():
    image = _image(40, 36)
    top, left, size = 7, 11, 20
    out = apply_view(image, ViewSpec(top, left, size, size, False, 0), size)
    assert torch.equal(out, image[:, top : top + size, left : left + size].float() / 255.0)
    # uint8 and [0, 1] float inputs give the same view
    assert torch.equal(out, apply_view(image.float() / 255.0, ViewSpec(top, left, size, size, False, 0), size))


def test_flip_mirrors_the_view_horizontally():
    image = _image()
    plain = apply_view(image, ViewSpec(2, 4, 25, 21, False, 5), 16)
    flipped = apply_view(image, ViewSpec(2, 4, 25, 21, True, 5), 16)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def _box_fits(v: ViewSpec, height: int, width: int, scale, ratio) -> bool:
    """The rounded box comes from some real (w, h) within 0.5 px whose area and aspect are inside the bounds."""
    area = height * width
    return (
        0 <= v.top
        and v.top + v.height <= height
        and 0 <= v.left
        and v.left + v.width <= width
        and (v.width - 0.5) * (v.height - 0.5) <= scale[1] * area
        and (v.width + 0.5) * (v.height + 0.5) >= scale[0] * area
        and (v.width - 0.5) / (v.height + 0.5) <= ratio[1]
        and (v.width + 0.5) / (v.height - 0.5) >= ratio[0]
    )


@pytest.mark.parametrize(
    ("height", "width", "scale"), [(224, 224, (0.08, 1.0)), (32, 32, (0.35, 1.0)), (180, 240, (0.5, 0.6))]
)
def test_sampled_boxes_are_inside_the_image_and_respect_scale_and_ratio(height, width, scale):
    rng = np.random.default_rng(0)
    ratio = (3 / 4, 4 / 3)
    views = [sample_view(height, width, rng, scale=scale, hflip=0.5) for _ in range(400)]
    assert all(_box_fits(v, height, width, scale, ratio) for v in views)
    areas = [v.height * v.width / (height * width) for v in views]
    assert max(areas) - min(areas) > 0.5 * (scale[1] - scale[0])  # the range is used, not one size
    flips = sum(v.flip for v in views)
    assert 150 < flips < 250  # hflip=0.5
    assert len({v.seed for v in views}) == len(views)


def test_no_flip_when_hflip_is_zero_and_whole_image_after_ten_misses():
    rng = np.random.default_rng(1)
    assert not any(sample_view(32, 32, rng, scale=(0.35, 1.0), hflip=0.0).flip for _ in range(100))
    # A 4 x 100 strip cannot hold 90 % of its area at an aspect ratio within [3/4, 4/3]: whole image.
    v = sample_view(4, 100, rng, scale=(0.9, 1.0), hflip=0.0)
    assert (v.top, v.left, v.height, v.width) == (0, 0, 4, 100)


def test_sampling_is_deterministic_per_seed():
    table = sample_views(5, 3, 32, 32, np.random.default_rng(7), scale=(0.35, 1.0), hflip=0.5)
    assert table.shape == (5, 3, 6) and table.dtype == torch.int64
    assert torch.equal(table, sample_views(5, 3, 32, 32, np.random.default_rng(7), scale=(0.35, 1.0), hflip=0.5))
    assert not torch.equal(table, sample_views(5, 3, 32, 32, np.random.default_rng(8), scale=(0.35, 1.0), hflip=0.5))
    # the table holds exactly what sample_view draws from the same stream
    rng = np.random.default_rng(7)
    first = sample_view(32, 32, rng, scale=(0.35, 1.0), hflip=0.5)
    assert table[0, 0].tolist() == [first.top, first.left, first.height, first.width, int(first.flip), first.seed]


def test_randaugment_replays_per_seed_and_differs_across_seeds():
    image = _image(32, 32, seed=3)
    view = ViewSpec(0, 0, 32, 32, False, 11)
    first = apply_view(image, view, 32, randaugment=RAND)
    # timm draws the ops from NumPy's global RNG and the magnitudes from Python's: whatever they hold, the
    # view's seed decides, and the caller's streams are left as they were.
    random.seed(999)
    np.random.seed(999)
    state, np_state = random.getstate(), np.random.get_state()
    again = apply_view(image, view, 32, randaugment=RAND)
    assert random.getstate() == state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(first, again)
    assert not torch.equal(first, apply_view(image, view, 32))  # the op changed the pixels
    # Each of timm's two ops applies with probability 0.5, so some seeds leave the image as it is; most differ.
    outs = [apply_view(image, ViewSpec(0, 0, 32, 32, False, seed), 32, randaugment=RAND) for seed in range(12)]
    distinct = {tuple(o.flatten().tolist()) for o in outs}
    assert len(distinct) >= 6
    assert all(math.isfinite(float(o.sum())) and 0.0 <= float(o.min()) and float(o.max()) <= 1.0 for o in outs)


def test_batched_views_equal_the_per_image_replay():
    from dad_core.views import apply_views

    rng = np.random.default_rng(0)
    clean = torch.stack([_image(40, 36, seed=i) for i in range(8)])
    dad = torch.stack([_image(40, 36, seed=100 + i) for i in range(8)])
    views = sample_views(8, 1, 40, 36, rng, scale=(0.2, 1.0), hflip=0.5)[:, 0]
    views[0] = torch.tensor([7, 11, 20, 20, 1, 0])  # a native-size box: no resize
    assert 0 < int(views[:, 4].sum()) < 8  # some flipped, some not

    out_clean, out_dad = apply_views([clean, dad], views, 20)

    assert out_clean.shape == out_dad.shape == (8, 3, 20, 20) and out_clean.dtype == torch.float32
    for i in range(8):  # the same ops as apply_view: bit-identical on a CPU
        assert torch.equal(out_clean[i], apply_view(clean[i], views[i], 20))
        assert torch.equal(out_dad[i], apply_view(dad[i], views[i], 20))


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(256, 256, 224), (300, 260, 224), (40, 36, 20), (24, 24, 64)],  # down, non-square, small, up only
)
def test_the_batched_resize_is_torchs_resize_bit_for_bit(height, width, size):
    """The batched crop + resize + flip (each sample's taps, gathered and summed for all samples at once) gives on a
    CPU exactly the pixels of ``F.interpolate`` on each crop, across downscaling by up to 2x (40 -> 20), upscaling,
    one-pixel boxes, boxes at the edges, boxes with one side at the output size (torch skips that pass) and flips."""
    from dad_core.views import apply_views

    rng = np.random.default_rng(height + width + size)
    n = 40
    images = torch.randint(0, 256, (n, 3, height, width), generator=torch.Generator().manual_seed(size))
    images = images.to(torch.uint8)
    rows = sample_views(n, 1, height, width, rng, scale=(0.01, 1.0), hflip=0.5)[:, 0]
    edge = min(size, height, width)
    rows[:6, :4] = torch.tensor(
        [
            [0, 0, 1, 1],  # one pixel
            [height - 1, width - 1, 1, 1],  # the last pixel
            [0, 0, height, width],  # the whole image
            [0, width - edge, edge, 3],  # height at the output size (when it fits): only the width resized
            [height - 3, 0, 3, edge],  # and the other way round
            [1, 2, height - 1, width - 2],  # to the bottom-right edges
        ]
    )

    (out,) = apply_views([images], rows, size)

    for i in range(n):
        assert torch.equal(out[i], apply_view(images[i], rows[i], size)), rows[i].tolist()


def test_past_twice_the_size_the_resize_is_torchs_up_to_the_last_bit():
    """Crops over twice the output size need five taps or more, where torch's compiled loop fuses some multiply-adds
    that the batched sum rounds twice: the values may then differ in their last bit, no more; the crops up to twice
    the size in the same batch stay bit-identical."""
    from dad_core.views import apply_views

    images = torch.randint(0, 256, (8, 3, 100, 90), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    rows = torch.tensor([[0, 0, 100, 90, i % 2, 0] for i in range(4)] + [[5, 7, 32, 30, i % 2, 0] for i in range(4)])

    (out,) = apply_views([images], rows, 16)

    for i in range(8):
        want = apply_view(images[i], rows[i], 16)
        if i >= 4:  # 32 x 30 -> 16: at most 2x
            assert torch.equal(out[i], want)
        else:
            assert float((out[i] - want).abs().max()) <= 2 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize(
    "row",
    [[0, 0, 0, 4, 0, 0], [0, 0, 4, 0, 0, 0], [-1, 0, 4, 4, 0, 0], [0, 0, 17, 4, 0, 0], [0, 13, 4, 4, 0, 0]],
)
def test_the_batched_replay_refuses_a_box_outside_the_image(row):
    """A view row that is not a box inside the image (a corrupt or foreign cache) is named, where the per-sample
    slicing would have resized a cut-off crop without a word."""
    from dad_core.views import apply_views

    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    rows = torch.tensor([[0, 0, 16, 16, 0, 0], row])
    with pytest.raises(ValueError, match=r"is not a box in a 16x16 image"):
        apply_views([images], rows, 8)


def test_the_resize_taps_are_normalized_and_inside_the_source():
    from dad_core.views import _tap_bank

    index, weight, taps = _tap_bank(24, 70)
    for n in range(1, 71):
        assert index[n].min() >= 0 and index[n].max() <= n - 1
        np.testing.assert_allclose(weight[n].sum(-1), 1.0, rtol=1e-6)  # each output a weighted mean of its taps
        assert (weight[n][:, taps[n] :] == 0).all()  # past a length's own taps: padding
    assert taps[24] == 1 and taps[12] == 2 and taps[70] > 2  # the same length, upscaling, downscaling


def test_the_batched_replay_sends_host_data_to_the_device_without_waiting(monkeypatch):
    """The step queues the replay while the GPU still runs the previous step: every host-to-device copy it makes (the
    resize's taps, the RandAugment's packed draws) goes through ``copy_to_device`` (pinned, non-blocking), never a
    ``torch.tensor(..., device=...)``, which copies from pageable memory and waits for the GPU."""
    from dad_core import distributed, randaugment, views
    from dad_core.distributed import copy_to_device

    copies = []

    def spy(t, device):
        copies.append((t.dtype, t.device.type, device))
        return copy_to_device(t, device)

    monkeypatch.setattr(distributed, "copy_to_device", spy)  # under distributed.copy_arrays_to_device
    monkeypatch.setattr(randaugment, "copy_to_device", spy)
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: tensor(*a, **k) if "device" not in k else pytest.fail(str(k)))
    images = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    rows = torch.tensor([[0, 0, 20, 16, i % 2, 40 + i] for i in range(6)])

    views.apply_views([images, images], rows, 16, randaugment="rand-m9-n2-p1.0")
    assert copies and all(kind == "cpu" for _, kind, _ in copies)  # with what is made once per size (the grid)
    copies.clear()
    views.apply_views([images, images], rows, 16, randaugment="rand-m9-n2-p1.0")  # as every later step

    assert copies[0] == (torch.float64, "cpu", images.device)  # the crop, resize and flip's taps, in one copy
    assert copies[1:] == [(torch.float64, "cpu", images.device)] * 2  # and one packed copy per RandAugment layer


def test_pil_randaugment_survives_posterize_to_zero_bits():
    """timm asks Pillow for 0-bit posterize at magnitude 10 (m9 with mstd 0.5 gets there), which Pillow 13 refuses."""
    image = torch.full((3, 16, 16), 0.6)
    outs = [apply_view(image, ViewSpec(0, 0, 16, 16, False, seed), 16, randaugment=RAND) for seed in range(1500)]
    assert any(float(out.max()) == 0 for out in outs)  # the 0-bit case came up, and gave black
