"""Properties of the ImageNet-C corruptions and the digit renditions on real 32 px digits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dad_core.corruptions import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    RENDITION_NAMES,
    SEVERITIES,
    apply_rendition,
    corrupt,
)

# Corruptions whose published definition draws no random numbers.
NON_RANDOM = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}


@pytest.fixture(scope="module")
def digits() -> list[np.ndarray]:
    """Twelve sklearn digits as uint8 [32, 32, 3], white on black (as prepare-data writes them)."""
    from sklearn.datasets import load_digits

    gray = np.rint(load_digits().images[:12] * (255 / 16)).astype(np.uint8)
    return [np.asarray(Image.fromarray(g).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB")) for g in gray]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _mean_over(digits, name: str, severity: int, stat, seed: int = 0) -> float:
    return float(np.mean([stat(corrupt(x, name, severity, _rng(seed + i)), x) for i, x in enumerate(digits)]))


def _mad(out: np.ndarray, clean: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - clean).mean())


def _hf_energy(image: np.ndarray) -> float:
    gray = image.astype(np.float64).mean(axis=2)
    return float((np.diff(gray, axis=0) ** 2).mean() + (np.diff(gray, axis=1) ** 2).mean())


def test_the_fifteen_imagenet_c_corruptions_in_order():
    assert CORRUPTION_NAMES == (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "glass_blur",
        "motion_blur",
        "zoom_blur",
        "snow",
        "frost",
        "fog",
        "brightness",
        "contrast",
        "elastic_transform",
        "pixelate",
        "jpeg_compression",
    )
    assert SEVERITIES == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_corruption_is_pure_and_deterministic(digits, name):
    image = digits[3]
    before = image.copy()
    for severity in (1, 5):
        first = corrupt(image, name, severity, _rng(7))
        assert first.dtype == np.uint8
        assert first.shape == image.shape
        assert np.array_equal(first, corrupt(image, name, severity, _rng(7))), "same seed, different bytes"
        other = corrupt(image, name, severity, _rng(8))
        assert np.array_equal(first, other) == (name in NON_RANDOM)
    assert np.array_equal(image, before), "input modified"


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_corruption_keeps_shape_of_non_square_images(name):
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    assert corrupt(image, name, 5, _rng(0)).shape == (40, 56, 3)


@pytest.mark.parametrize("name", [n for n in CORRUPTION_NAMES if n != "elastic_transform"])
def test_severity_5_is_further_from_clean_than_severity_1(digits, name):
    mild = _mean_over(digits, name, 1, _mad)
    strong = _mean_over(digits, name, 5, _mad)
    assert strong > mild > 0


def test_elastic_local_severities_grow_and_global_ones_warp(digits):
    # Published constants: severities 1-2 are large affine warps, 3-5 growing local distortions.
    local = [_mean_over(digits, "elastic_transform", s, _mad) for s in (3, 4, 5)]
    assert 0 < local[0] < local[1] < local[2]
    assert _mean_over(digits, "elastic_transform", 1, _mad) > local[0]


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise"])
def test_noise_energy_and_high_frequencies_grow_with_severity(digits, name):
    def residual(out, clean):
        return float(((out.astype(np.float64) - clean) ** 2).mean())

    energy = [_mean_over(digits, name, s, residual) for s in SEVERITIES]
    assert all(a < b for a, b in zip(energy, energy[1:], strict=False)), energy
    clean_hf = np.mean([_hf_energy(x) for x in digits])
    assert _mean_over(digits, name, 1, lambda out, _: _hf_energy(out)) > clean_hf


@pytest.mark.parametrize("name", ["defocus_blur", "motion_blur", "zoom_blur"])
def test_blur_removes_high_frequencies_more_with_severity(digits, name):
    clean_hf = np.mean([_hf_energy(x) for x in digits])
    hf = [_mean_over(digits, name, s, lambda out, _: _hf_energy(out)) for s in SEVERITIES]
    assert hf[0] <= clean_hf
    assert hf[-1] < 0.9 * clean_hf
    assert all(a >= b for a, b in zip(hf, hf[1:], strict=False)), hf


def test_brightness_raises_mean_and_contrast_lowers_std(digits):
    def mean(out, _):
        return float(out.mean())

    def std(out, _):
        return float(out.astype(np.float64).std())

    brightness = [_mean_over(digits, "brightness", s, mean) for s in SEVERITIES]
    assert np.mean([x.mean() for x in digits]) < brightness[0]
    assert all(a < b for a, b in zip(brightness, brightness[1:], strict=False))
    contrast = [_mean_over(digits, "contrast", s, std) for s in SEVERITIES]
    assert np.mean([x.astype(np.float64).std() for x in digits]) > contrast[0]
    assert all(a > b for a, b in zip(contrast, contrast[1:], strict=False))


@pytest.mark.parametrize("name", ["snow", "frost", "fog"])
def test_weather_brightens_the_dark_background(digits, name):
    background = digits[0][..., 0] < 10
    out = corrupt(digits[0], name, 3, _rng(0))
    assert out[background].mean() > digits[0][background].mean() + 10


def test_pixelate_makes_blocks(digits):
    out = corrupt(digits[5], "pixelate", 5, _rng(0))  # 32 px -> 8 px -> 32 px: 4 x 4 constant blocks
    blocks = out.reshape(8, 4, 8, 4, 3)
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :1, :, :1], blocks.shape))


def test_corrupt_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(digits[0], "rain", 1, _rng(0))
    with pytest.raises(ValueError, match="severity"):
        corrupt(digits[0], "fog", 6, _rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corrupt(digits[0].astype(np.float32), "fog", 1, _rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corrupt(digits[0][..., 0], "fog", 1, _rng(0))


def test_the_corruption_table_holds_functions_of_image_severity_rng():
    assert set(CORRUPTIONS) == set(CORRUPTION_NAMES)
    image = np.zeros((16, 16, 3), np.uint8)
    assert CORRUPTIONS["contrast"](image, 2, _rng(0)).shape == image.shape


# --- renditions ------------------------------------------------------------------------------------------


def test_invert_is_the_negative(digits):
    assert np.array_equal(apply_rendition(digits[2], "invert", _rng(0)), 255 - digits[2])


def test_edges_are_bright_on_strokes_and_dark_on_flat_background(digits):
    image = digits[2]
    out = apply_rendition(image, "edges", _rng(0))
    assert out.max() == 255
    assert np.array_equal(out[..., 0], out[..., 1])
    flat = image[..., 0] == 0
    flat &= np.roll(flat, 1, 0) & np.roll(flat, -1, 0) & np.roll(flat, 1, 1) & np.roll(flat, -1, 1)
    assert out[..., 0][flat].mean() < 2 < 40 < out[..., 0][~flat].mean()  # bicubic ringing leaves faint edges


def test_outline_is_dark_strokes_on_white(digits):
    out = apply_rendition(digits[2], "outline", _rng(0))
    assert np.median(out) == 255
    assert out.min() < 64


def test_colorize_is_seeded_and_keeps_the_shape_of_the_digit(digits):
    image = digits[2]
    first = apply_rendition(image, "colorize", _rng(1))
    assert np.array_equal(first, apply_rendition(image, "colorize", _rng(1)))
    assert not np.array_equal(first, apply_rendition(image, "colorize", _rng(2)))
    background = image[..., 0] == 0
    assert len(np.unique(first[background].reshape(-1, 3), axis=0)) == 1  # one background colour
    assert np.abs(first[~background].astype(int).mean(0) - first[background][0]).sum() > 30


@pytest.mark.parametrize("name", RENDITION_NAMES)
def test_renditions_are_pure_uint8_and_differ_from_the_digit(digits, name):
    image = digits[4]
    before = image.copy()
    out = apply_rendition(image, name, _rng(0))
    assert out.dtype == np.uint8
    assert out.shape == image.shape
    assert not np.array_equal(out, image)
    assert np.array_equal(image, before)


def test_apply_rendition_rejects_unknown_names(digits):
    with pytest.raises(ValueError, match="unknown rendition 'cartoon'"):
        apply_rendition(digits[0], "cartoon", _rng(0))
