"""The ``tensor`` RandAugment backend (``dad_core.randaugment``): each op against timm's PIL op, the policy's draws
against timm's settings, and replay (the result depends on the seed and the pixels, not on the batch)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dad_core.randaugment import RandAugmentSpec, draw_ops, encode_ops, parse_randaugment, rand_augment
from dad_core.views import ViewSpec, apply_view, apply_views

RAND = "rand-m9-mstd0.5-inc1"


def _only(name: str, x: torch.Tensor, arg: float) -> torch.Tensor:
    """``x`` (values 0..255) through op ``name`` with ``arg``, by the batched path a training step runs (draws made
    ahead: every sample gets this op in the one layer of a ``p1.0`` policy)."""
    policy = "rand-n1-p1.0"
    drawn = torch.tensor([[[parse_randaugment(policy).ops.index(name), arg]]] * x.shape[0], dtype=torch.float64)
    return rand_augment(x / 255, None, policy, drawn=drawn) * 255


def _image(seed: int = 0, size: tuple[int, int] = (120, 96)) -> torch.Tensor:
    """A ``[1, 3, H, W]`` uint8-valued float image, smoothed so the geometric ops have something to interpolate."""
    rng = np.random.default_rng(seed)
    noise = torch.tensor(rng.integers(0, 256, (1, 3, *size)).astype(np.float32))
    return F.avg_pool2d(noise, 3, 1, 1).round()


def _timm_op(name: str, image: Image.Image, arg: float) -> Image.Image:
    from timm.data import auto_augment as aa

    geometric = dict(fillcolor=(128, 128, 128), resample=Image.BILINEAR)  # the tensor backend's fill and filter
    ops = {
        "AutoContrast": lambda: aa.auto_contrast(image),
        "Equalize": lambda: aa.equalize(image),
        "Invert": lambda: aa.invert(image),
        "Posterize": lambda: aa.posterize(image, int(arg)),
        "Solarize": lambda: aa.solarize(image, int(arg)),
        "SolarizeAdd": lambda: aa.solarize_add(image, int(arg)),
        "Color": lambda: aa.color(image, arg),
        "Contrast": lambda: aa.contrast(image, arg),
        "Brightness": lambda: aa.brightness(image, arg),
        "Sharpness": lambda: aa.sharpness(image, arg),
        "Rotate": lambda: aa.rotate(image, arg, **geometric),
        "ShearX": lambda: aa.shear_x(image, arg, **geometric),
        "ShearY": lambda: aa.shear_y(image, arg, **geometric),
        "TranslateXRel": lambda: aa.translate_x_rel(image, arg, **geometric),
        "TranslateYRel": lambda: aa.translate_y_rel(image, arg, **geometric),
    }
    return ops[name]()


PHOTOMETRIC = [
    ("AutoContrast", 0.0),
    ("Equalize", 0.0),
    ("Invert", 0.0),
    ("Posterize", 0.0),
    ("Posterize", 2.0),
    ("Solarize", 100.0),
    ("Solarize", 256.0),
    ("SolarizeAdd", 60.0),
    ("Color", 1.7),
    ("Color", 0.3),
    ("Contrast", 1.8),
    ("Contrast", 0.2),
    ("Brightness", 1.6),
    ("Brightness", 0.4),
    ("Sharpness", 1.9),
    ("Sharpness", 0.1),
]
GEOMETRIC = [
    ("Rotate", 23.0),
    ("Rotate", -13.5),
    ("ShearX", 0.27),
    ("ShearY", -0.2),
    ("TranslateXRel", 0.3),
    ("TranslateYRel", -0.41),
]


@pytest.mark.parametrize(("name", "arg"), PHOTOMETRIC + GEOMETRIC)
def test_each_op_gives_timms_pil_pixels(name, arg):
    x = _image()
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy().astype(np.uint8))
    if (name, arg) == ("Posterize", 0.0):  # Pillow 13 refuses 0 bits; older Pillows (and the pil backend) give black
        want = torch.zeros_like(x[0])
    else:
        want = torch.tensor(np.asarray(_timm_op(name, pil, arg)).astype(np.float32)).permute(2, 0, 1)

    got = _only(name, x, arg)[0]

    # PIL's own arithmetic: integer and double formulas, float blends, its truncated bilinear with its edge rule
    assert torch.equal(got, want), (name, float((got - want).abs().max()), int((got != want).sum()))
    if name not in ("Invert", "Brightness") and not (name == "Solarize" and arg == 256.0):
        assert not torch.equal(got, x[0]) or name == "Posterize", name  # the op did something


def test_parse_reads_timms_sections_and_refuses_what_it_lacks():
    assert parse_randaugment(RAND) == RandAugmentSpec(magnitude=9, magnitude_std=0.5, increasing=True)
    spec = parse_randaugment("rand-m7-n3-p0.8-mmax12-mstd101")
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_max) == (7, 3, 0.8, 12)
    assert spec.magnitude_std == math.inf and not spec.increasing  # timm: mstd above 100 is uniform sampling
    assert "SolarizeIncreasing" in parse_randaugment(RAND).ops and "Solarize" in spec.ops and len(spec.ops) == 15
    with pytest.raises(ValueError, match="'tweights'"):
        parse_randaugment("rand-m9-tweights")
    with pytest.raises(ValueError, match="'rand-"):
        parse_randaugment("augmix-m5")


def test_the_draws_follow_timms_policy():
    spec = parse_randaugment(RAND)
    draws = [draw_ops(seed, spec) for seed in range(6000)]
    assert all(len(d) == 2 for d in draws)
    layers = [layer for d in draws for layer in d]
    applied = [layer for layer in layers if layer is not None]
    assert abs(len(applied) / len(layers) - 0.5) < 0.02  # p = 0.5 per layer
    counts = Counter(name for name, _ in applied)
    assert set(counts) == set(spec.ops)  # every op of the increasing set, uniformly (with replacement)
    expected = len(applied) / 15
    assert all(abs(n - expected) < 5 * math.sqrt(expected) for n in counts.values()), counts
    rotations = np.array([arg for name, arg in applied if name == "Rotate"])
    assert abs((rotations > 0).mean() - 0.5) < 0.08  # a random sign
    magnitudes = np.abs(rotations) / 3  # level = |degrees| / 30 * 10 ~ N(9, 0.5) clipped to [0, 10]
    assert abs(magnitudes.mean() - 9) < 0.1 and abs(magnitudes.std() - 0.5) < 0.1 and magnitudes.max() <= 10
    contrasts = np.array([arg for name, arg in applied if name == "ContrastIncreasing"])
    assert np.allclose(np.abs(contrasts - 1), np.abs(contrasts - 1).mean(), atol=0.25)  # 1 +- 0.9 * level / 10
    assert abs(np.abs(contrasts - 1).mean() - 0.81) < 0.03
    bits = Counter(arg for name, arg in applied if name == "PosterizeIncreasing")
    assert set(bits) <= {0.0, 1.0} and bits[1.0] > bits[0.0]  # 4 - int(4 * level / 10): 1 bit unless level >= 10


def test_autocontrast_matches_pils_lut_for_every_range():
    """PIL computes ``int(i * 255 / (hi - lo) - lo * scale)`` in doubles; float32, or 255 * (1 / t), is off by one."""
    levels = torch.arange(256.0)
    for lo in range(0, 256, 3):
        for hi in range(lo + 1, 256, 2):
            x = levels.clamp(lo, hi).view(1, 1, 16, 16).expand(1, 3, 16, 16)
            scale = 255.0 / (hi - lo)
            want = [min(255, max(0, int(i * scale - lo * scale))) for i in range(lo, hi + 1)]
            assert _only("AutoContrast", x, 0.0).flatten()[lo : hi + 1].tolist() == want, (lo, hi)


def test_a_negative_seed_draws_no_op_and_autocast_changes_nothing():
    images = torch.cat([_image(seed) for seed in range(4)]) / 255
    assert draw_ops(-1, parse_randaugment("rand-m9-n3-p1.0")) == [None, None, None]
    torch.testing.assert_close(rand_augment(images, [-1] * 4, "rand-m9-n3-p1.0"), (images * 255).round() / 255)
    plain = rand_augment(images, [3, 4, 5, 6], "rand-m9-n3-p1.0-mstd0.5")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training step's autocast must not reach the ops
        assert torch.equal(rand_augment(images, [3, 4, 5, 6], "rand-m9-n3-p1.0-mstd0.5"), plain)


def test_the_result_depends_on_the_seed_and_pixels_only():
    images = torch.cat([_image(seed) for seed in range(6)]) / 255
    seeds = [11, 12, 13, 14, 15, 11]

    batch = rand_augment(images, seeds, RAND)

    assert batch.shape == images.shape and batch.dtype == torch.float32
    assert torch.equal(batch, (batch * 255).round() / 255)  # on the uint8 grid
    for i in range(6):  # alone or in a batch, the same pixels
        torch.testing.assert_close(rand_augment(images[i : i + 1], [seeds[i]], RAND)[0], batch[i], atol=1e-6, rtol=0)
    assert torch.equal(rand_augment(images, seeds, RAND), batch)
    same = torch.cat([images[:1]] * 8)
    outs = rand_augment(same, list(range(8)), RAND)
    assert len({tuple(o.flatten()[:64].tolist()) for o in outs}) > 4  # other seeds, other ops
    with pytest.raises(ValueError, match="2 seeds for 6 images"):
        rand_augment(images, [1, 2], RAND)


def test_draws_made_ahead_give_the_pixels_of_drawing_from_the_seeds():
    """``encode_ops`` in a loader worker, ``rand_augment(drawn=...)`` in the step: the same ops, the same pixels."""
    images = torch.cat([_image(seed, (40, 36)) for seed in range(8)]) / 255
    seeds = [5, 6, 7, 8, -1, 9, 10, 5]
    drawn = torch.stack([encode_ops(seed, RAND) for seed in seeds])

    assert drawn.shape == (8, 2, 2) and drawn.dtype == torch.float64
    assert drawn[4, :, 0].tolist() == [-1, -1]  # a negative seed: no op in either layer
    spec = parse_randaugment(RAND)
    assert [None if i < 0 else (spec.ops[int(i)], a) for i, a in drawn[0].tolist()] == draw_ops(5, spec)
    assert torch.equal(rand_augment(images, None, RAND, drawn=drawn), rand_augment(images, seeds, RAND))
    with pytest.raises(ValueError, match="3 draws for 8 images"):
        rand_augment(images, None, RAND, drawn=drawn[:3])
    with pytest.raises(ValueError, match=r"needs \[B, 2, 2\]"):  # draws of another policy (one layer)
        rand_augment(images, None, RAND, drawn=drawn[:, :1])


def test_samples_with_different_geometric_ops_in_one_layer_resample_together_exactly():
    """A layer's geometric ops go through one resampling call: each sample still gets exactly its own op."""
    images = torch.cat([_image(seed, (40, 36)) for seed in range(24)]) / 255
    seeds = list(range(100, 124))
    spec = parse_randaugment("rand-m9-n3-p1.0-mstd0.5")
    first_layer = {ops[0][0] for ops in (draw_ops(seed, spec) for seed in seeds)}
    assert len(first_layer & {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}) >= 2

    batch = rand_augment(images, seeds, "rand-m9-n3-p1.0-mstd0.5")

    for i in range(24):
        alone = rand_augment(images[i : i + 1], [seeds[i]], "rand-m9-n3-p1.0-mstd0.5")[0]
        assert torch.equal(alone, batch[i])


def test_apply_view_and_the_batched_replay_agree_with_the_tensor_backend():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (4, 3, 40, 40), generator=gen, dtype=torch.uint8)
    dad = torch.randint(0, 256, (4, 3, 40, 40), generator=gen, dtype=torch.uint8)
    views = torch.tensor([[0, 0, 40, 40, 0, 5], [3, 4, 30, 20, 1, 6], [10, 0, 25, 40, 0, 7], [2, 2, 16, 16, 1, 8]])

    out_clean, out_dad = apply_views([clean, dad], views, 24, randaugment=RAND)

    for i in range(4):  # the same ops in the same order: bit-identical on a CPU
        assert torch.equal(out_clean[i], apply_view(clean[i], views[i], 24, randaugment=RAND, backend="tensor"))
        assert torch.equal(out_dad[i], apply_view(dad[i], views[i], 24, randaugment=RAND, backend="tensor"))
    plain = apply_view(clean[1], views[1], 24)
    assert not torch.equal(out_clean[1], plain)  # RandAugment ran on top of the crop
    pil = apply_view(clean[1], ViewSpec(3, 4, 30, 20, True, 6), 24, randaugment=RAND)
    assert pil.shape == out_clean[1].shape  # the pil backend is still there, and draws its own ops


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("Posterize", range(1, 9)),  # 0 bits: Pillow 13 refuses it (see test_each_op_gives_timms_pil_pixels)
        ("Solarize", range(0, 257)),
        ("SolarizeAdd", range(0, 129)),
        ("Brightness", [*np.linspace(0.1, 1.9, 181), *np.random.default_rng(0).uniform(0.1, 1.9, 300)]),
        ("Invert", [0.0]),
    ],
)
def test_the_value_map_tables_are_pils_for_every_value_and_argument(name, args):
    """The ops whose table the host makes from the argument alone: every one of the 256 values, every argument the
    policy can draw (integers for these), and for Brightness, whose argument is a float, a grid and random draws."""
    levels = torch.arange(256.0).view(1, 16, 16).expand(3, 16, 16)
    pil = Image.fromarray(levels.permute(1, 2, 0).numpy().astype(np.uint8))
    for arg in args:
        want = torch.tensor(np.asarray(_timm_op(name, pil, float(arg))).astype(np.float32)).permute(2, 0, 1)
        assert torch.equal(_only(name, levels[None].clone(), float(arg))[0], want), (name, arg)


def test_edge_cases_skip_layers_refuse_non_rgb_and_read_nan_as_zero():
    images = torch.cat([_image(seed, (20, 24)) for seed in range(5)]) / 255
    grid = (images * 255).round() / 255
    assert torch.equal(rand_augment(images, [1, 2, 3, 4, 5], "rand-n0"), grid)  # no layers: the uint8 grid only
    assert torch.equal(rand_augment(images, [1, 2, 3, 4, 5], "rand-p0.0"), grid)  # every layer skipped
    with pytest.raises(ValueError, match=r"RGB batches \[B, 3, H, W\]"):
        rand_augment(images[:, :1], [1, 2, 3, 4, 5], RAND)
    broken = images.clone()
    broken[0, :, 0, 0] = float("nan")
    out = rand_augment(broken, [7] * 5, "rand-n2-p1.0")  # the tables index by value: NaN must not reach them
    assert torch.isfinite(out).all()
