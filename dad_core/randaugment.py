"""RandAugment on tensors, batched on any device, replayable from a per-sample seed (``train.randaugment_backend``).

timm's RandAugment (the ``pil`` backend, :func:`dad_core.views.apply_view`) runs PIL operations one image at a time
on the CPU, so a cached run with RandAugment needs 12-20 loader workers per GPU at ImageNet rates. This module is the
``tensor`` backend: the same policy on ``[B, 3, H, W]`` float batches, so that ``train.replay_on_device`` can replay
a view's RandAugment in the training step.

What is the same as timm's ``rand-...`` config strings: the op list (``inc1`` selects the increasing variants), the
number of layers ``n``, the per-layer probability ``p``, the magnitude ``m`` with its Gaussian noise ``mstd`` clipped
to ``[0, mmax]`` (10 by default), every op's level-to-argument mapping and its random sign, the fill gray of 128 and
uint8 rounding after every op. What differs:

* the draws come from ``numpy.random.default_rng(seed)`` per sample, so for one seed the two backends pick other
  ops: a cache made with one backend is never read with the other (the backend is in the cache's dependencies);
* the geometric ops (rotate, shear, translate) sample bilinearly; timm picks bilinear or bicubic at random.

Each op itself computes what timm's PIL op computes, in PIL's own arithmetic (integer and double formulas, float
blends, PIL's truncated bilinear with its edge rule): for one op and argument the pixels are PIL's, exactly
(``tests/dad_core/test_randaugment.py`` compares every op with timm's). The ops run with autocast off and without
convolutions or matmuls, so a GPU's TF32 or bf16 does not move the pixels.

The result depends on the seed and the pixels only, not on the batch it is in or the device (up to the device's
floating-point rounding), which is what replay needs: the cache writer and the training step call the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from dad_core.distributed import copy_arrays_to_device, copy_to_device

__all__ = ["RandAugmentSpec", "draw_ops", "encode_ops", "parse_randaugment", "rand_augment"]

_LEVEL_DENOM = 10.0
_GEOMETRIC = frozenset(("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))
_FILL = 128.0  # timm's fill colour (its default img_mean) for the area a geometric op uncovers
_OPS = (  # timm's _RAND_TRANSFORMS
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
_INCREASING = {  # inc1 swaps these for their increasing-severity variants (timm's _RAND_INCREASING_TRANSFORMS)
    "Posterize": "PosterizeIncreasing",
    "Solarize": "SolarizeIncreasing",
    "Color": "ColorIncreasing",
    "Contrast": "ContrastIncreasing",
    "Brightness": "BrightnessIncreasing",
    "Sharpness": "SharpnessIncreasing",
}


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm ``rand-...`` string: ``rand-m9-mstd0.5-inc1`` is magnitude 9, noise 0.5, increasing ops."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(_INCREASING.get(op, op) for op in _OPS) if self.increasing else _OPS


@lru_cache(maxsize=16)
def parse_randaugment(config: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string (sections ``m``, ``n``, ``p``, ``mstd``, ``mmax``, ``inc``).

    Raises:
        ValueError: not a ``rand-`` string, or a section the tensor backend does not implement (``t``: weighted op
            sets), with the string named.
    """
    parts = config.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment {config!r}: the tensor backend takes timm's 'rand-...' strings only")
    fields: dict[str, float] = {}
    names = {"m": "magnitude", "n": "num_layers", "p": "prob", "mstd": "magnitude_std", "mmax": "magnitude_max"}
    for part in parts[1:]:
        key = part.rstrip("0123456789.")
        value = part[len(key) :]
        if key == "inc" and value:
            fields["increasing"] = bool(int(value))
        elif key in names and value:
            fields[names[key]] = float(value)
        else:
            raise ValueError(
                f"randaugment {config!r}: section {part!r} is not one of m<float>, n<int>, p<float>, mstd<float>, "
                "mmax<float>, inc<0|1> (the tensor backend has no weighted op sets)"
            )
    if "num_layers" in fields:
        fields["num_layers"] = int(fields["num_layers"])
    if fields.get("magnitude_std", 0.0) > 100:  # timm: mstd above 100 means uniform sampling, as inf does
        fields["magnitude_std"] = math.inf
    return RandAugmentSpec(**fields)  # type: ignore[arg-type]


def _level_arg(op: str, level: float, rng: np.random.Generator) -> float:
    """timm's level-to-argument mapping of ``op`` at magnitude ``level`` (0 for the ops that take none)."""
    sign = -1.0 if rng.random() > 0.5 else 1.0  # drawn for every op so one op's draws never shift another's
    frac = level / _LEVEL_DENOM
    if op == "Rotate":
        return sign * frac * 30.0
    if op in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if op in ("TranslateXRel", "TranslateYRel"):
        return sign * frac * 0.45
    if op == "Posterize":
        return float(int(frac * 4))
    if op == "PosterizeIncreasing":
        return float(4 - int(frac * 4))
    if op == "Solarize":
        return float(min(256, int(frac * 256)))
    if op == "SolarizeIncreasing":
        return float(256 - min(256, int(frac * 256)))
    if op == "SolarizeAdd":
        return float(min(128, int(frac * 110)))
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1
    if op.endswith("Increasing"):  # Color/Contrast/Brightness/Sharpness: 1 is no change, moving to 0.1 or 1.9
        return max(0.1, 1.0 + sign * frac * 0.9)
    return 0.0


def draw_ops(seed: int, spec: RandAugmentSpec) -> list[tuple[str, float] | None]:
    """One sample's RandAugment: per layer the op and its argument, or None where the layer is skipped (prob).

    A negative seed draws no op: a sample without a view (the whole stored image, see
    :class:`~dad_core.train_data.DADPairs`) gets no RandAugment, as on the CPU.
    """
    if seed < 0:
        return [None] * spec.num_layers
    rng = np.random.default_rng([int(seed), 0x5241])  # RA: a stream of its own, apart from other uses of the seed
    ops = spec.ops
    out: list[tuple[str, float] | None] = []
    for choice in rng.integers(0, len(ops), spec.num_layers):  # with replacement, as timm's np.random.choice
        applied = spec.prob >= 1.0 or rng.random() <= spec.prob
        if spec.magnitude_std == math.inf:
            level = rng.uniform(0, spec.magnitude)
        elif spec.magnitude_std > 0:
            level = rng.normal(spec.magnitude, spec.magnitude_std)
        else:
            level = spec.magnitude
        level = max(0.0, min(level, spec.magnitude_max))
        arg = _level_arg(ops[choice], level, rng)
        out.append((ops[choice], arg) if applied else None)
    return out


def encode_ops(seed: int, config: str) -> Tensor:
    """One sample's draws (:func:`draw_ops`) as float64 ``[num_layers, 2]`` rows: the op's index in the policy's op
    list (-1 where the layer is skipped) and its argument. A loader worker makes them, so the training step, which
    replays them with ``rand_augment(..., drawn=...)``, spends no Python on drawing (about 40 us a sample)."""
    spec = parse_randaugment(config)
    return torch.tensor(_encode(draw_ops(seed, spec), spec), dtype=torch.float64)


def _encode(ops: list[tuple[str, float] | None], spec: RandAugmentSpec) -> list[list[float]]:
    names = spec.ops
    return [[names.index(op[0]), op[1]] if op else [-1, 0.0] for op in ops]


def rand_augment(
    images: Tensor, seeds: Tensor | list[int] | None, config: str, *, drawn: Tensor | None = None
) -> Tensor:
    """RandAugment ``config`` on float ``[B, C, H, W]`` images in [0, 1], sample i drawn from ``seeds[i]``.

    A layer's samples are grouped by the op they drew, and its ops batched further, since on a GPU the host's time
    per launched op is the cost: one table lookup serves every sample whose op maps each value through a table (the
    tables made on the host from the argument, or on the device from each image's statistics, a few ops per
    drawn op), Color and Sharpness run once per op drawn, and one resampling serves every geometric op (its
    matrices made on the host, in PIL's Python arithmetic).

    Args:
        images: float ``[B, 3, H, W]`` RGB in [0, 1] (NaN reads as 0).
        seeds: each sample's seed (:func:`draw_ops`); None when ``drawn`` is given.
        config: timm ``rand-...`` string.
        drawn: the draws already made, ``[B, num_layers, 2]`` rows of :func:`encode_ops` (read on the host: pass a
            CPU tensor); the same pixels as drawing from the seeds.

    Returns:
        float32 ``[B, C, H, W]`` in [0, 1], on the images' device, on the uint8 grid (as PIL's output would be).
    """
    spec = parse_randaugment(config)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: {tuple(images.shape)}; RandAugment takes RGB batches [B, 3, H, W]")
    if drawn is not None:
        if drawn.dim() != 3 or tuple(drawn.shape[1:]) != (spec.num_layers, 2):
            raise ValueError(f"drawn: {tuple(drawn.shape)} for {config!r}, which needs [B, {spec.num_layers}, 2]")
        rows = drawn.detach().cpu().double().numpy()
    else:
        seed_list = seeds.detach().cpu().tolist() if isinstance(seeds, Tensor) else list(seeds)
        # drawn once per seed: a clean image and its DAD sample share their view's seed
        by_seed = {seed: _encode(draw_ops(seed, spec), spec) for seed in dict.fromkeys(seed_list)}
        rows = np.array([by_seed[seed] for seed in seed_list], dtype=np.float64).reshape(
            len(seed_list), spec.num_layers, 2
        )
    if len(rows) != images.shape[0]:
        raise ValueError(f"{len(rows)} {'draws' if drawn is not None else 'seeds'} for {images.shape[0]} images")
    # exact float32 (and float64 where PIL uses doubles) whatever the caller's autocast: bf16 would move pixels
    with torch.autocast(images.device.type, enabled=False):
        return _rand_augment(images, rows[..., 0].astype(np.int64), rows[..., 1], spec)


# A layer's ops in the order of its stages (:func:`_layer`). The value-map ops send each channel value through a
# 256-entry table, made on the host from the argument alone (_ARG_TABLE) or on the device from each image's statistics
# (_PIXEL_TABLE); the blends mix each pixel with a degenerate image; the geometric ops resample.
_ARG_TABLE = frozenset((
    "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Brightness",
    "BrightnessIncreasing",
))  # fmt: skip
_PIXEL_TABLE = frozenset(("AutoContrast", "Equalize", "Contrast", "ContrastIncreasing"))
_BLEND = frozenset(("Color", "ColorIncreasing", "Sharpness", "SharpnessIncreasing"))


def _stage(name: str) -> int:
    for stage, names in enumerate((_ARG_TABLE, _PIXEL_TABLE, _BLEND, _GEOMETRIC)):
        if name in names:
            return stage
    raise ValueError(f"unknown RandAugment op {name!r}")


def _rand_augment(images: Tensor, codes: np.ndarray, args: np.ndarray, spec: RandAugmentSpec) -> Tensor:
    """``codes``: ``[B, layers]`` op indices into ``spec.ops`` (-1: the layer is skipped), ``args``: their arguments."""
    # the uint8 image PIL would get, as floats on the device; NaN as 0, since the tables index by value
    x = (images.float().nan_to_num(0.0).clamp(0, 1) * 255).round()
    for layer in range(spec.num_layers):
        code = codes[:, layer]
        samples = np.flatnonzero(code >= 0)
        if not samples.size:
            continue
        samples = samples[np.argsort(code[samples], kind="stable")]  # grouped by op
        ops, starts = np.unique(code[samples], return_index=True)
        bounds = [*starts.tolist(), len(samples)]
        groups = [
            (spec.ops[op], samples[lo:hi], args[samples[lo:hi], layer])
            for op, lo, hi in zip(ops.tolist(), bounds, bounds[1:])
        ]
        x = _layer(x, groups)
    return x / 255.0


def _layer(x: Tensor, groups: list[tuple[str, np.ndarray, np.ndarray]]) -> Tensor:
    """One layer on ``x`` (values in [0, 255]), in place: each group is an op, its samples and their arguments; a
    sample is in one group at most. Everything the host knows (samples, arguments, tables and matrices made from the
    arguments) goes to the device in one copy."""
    n, c, h, w = x.shape
    staged = sorted((_stage(group[0]), i) for i, group in enumerate(groups))  # the offsets below follow the stages
    stages, groups = [st for st, _ in staged], [groups[i] for _, i in staged]
    sizes = [len(samples) for _, samples, _ in groups]
    counts = [sum(size for size, st in zip(sizes, stages) if st == k) for k in range(4)]
    total = sum(sizes)
    arg_tables = [_arg_tables(name, args) for (name, _, args), st in zip(groups, stages) if st == 0]
    affine = [_affine_matrices(name, args, h, w) for (name, _, args), st in zip(groups, stages) if st == 3]
    on_host = [
        np.concatenate([samples for _, samples, _ in groups]),
        np.concatenate([args for _, _, args in groups]),  # PIL's are doubles
        np.concatenate([np.empty((0, 256)), *arg_tables]),  # [counts[0], 256]
        np.concatenate([np.empty((0, 6)), *affine]),  # [counts[3], 6]
    ]
    index, args, host_tables, matrices = copy_arrays_to_device(on_host, x.device)  # no wait for the GPU's queue
    index = index.long()
    tables = []
    if counts[0]:  # value maps made on the host
        tables.append(host_tables.view(-1, 1, 256).float().expand(-1, c, -1))
    start = 0
    for (name, _, _), size, st in zip(groups, sizes, stages):
        if st == 1:  # value maps made from the pixels
            tables.append(_pixel_tables(name, x[index[start : start + size]], args[start : start + size]))
        if st == 2:
            rows = index[start : start + size]
            x[rows] = _blend_op(name, x[rows], args[start : start + size])
        start += size
    if tables:
        rows = index[: counts[0] + counts[1]]
        x[rows] = _lookup(x[rows], torch.cat(tables))
    if counts[3]:
        rows = index[total - counts[3] :]
        x[rows] = _resample(x[rows], matrices)
    return x


def _arg_tables(name: str, args: np.ndarray) -> np.ndarray:
    """float32 ``[N, 256]`` on the host: what op ``name`` makes of each value 0..255 with each argument, clamped to
    [0, 255] and rounded, in the per-pixel formula's arithmetic (float32, as the enhancers' blends in PIL's C)."""
    v = np.arange(256, dtype=np.float32)[None, :]
    a = args.astype(np.float32)[:, None]
    if name == "Invert":
        out = np.broadcast_to(255 - v, (len(a), 256))
    elif name.startswith("Posterize"):
        step = (2.0 ** (8.0 - a.astype(np.float64))).astype(np.float32)  # keep `arg` high bits; a power of two
        out = np.floor(v / step) * step
    elif name == "SolarizeAdd":
        out = np.where(v < 128, np.minimum(v + a, np.float32(255)), v)
    elif name.startswith("Solarize"):
        out = np.where(v >= a, 255 - v, v)
    elif name.startswith("Brightness"):
        out = np.floor(a * v)  # PIL's blend with black: 0 + factor * (x - 0)
    else:
        raise ValueError(f"{name!r} is not a value-map RandAugment op")
    return np.round(np.clip(out, 0, 255)).astype(np.float32)


@lru_cache(maxsize=8)
def _levels(device: torch.device) -> Tensor:
    return torch.arange(256, device=device, dtype=torch.float64)


def _pixel_tables(name: str, x: Tensor, arg: Tensor) -> Tensor:
    """float32 ``[N, C, 256]``: the value map op ``name`` builds from each image's statistics (per channel)."""
    levels = _levels(x.device)
    if name == "AutoContrast":  # PIL's ImageOps.autocontrast (no cutoff): each channel stretched to [0, 255]
        lo = x.amin(dim=(2, 3)).double()[..., None]
        hi = x.amax(dim=(2, 3)).double()[..., None]
        scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1.0)  # a true division (255.0 / t is 255 * (1 / t))
        stretched = torch.floor(levels * scale - lo * scale).clamp(0, 255)  # PIL: int(i * scale + offset), doubles
        return torch.where(hi > lo, stretched, levels).float()  # a flat channel is kept
    if name == "Equalize":
        return _equalize_tables(x)
    if name.startswith("Contrast"):
        # PIL: int(mean of the L image + 0.5), in doubles (a float32 sum is inexact beyond 2^24); blended in float32
        mean = torch.floor(_gray(x).double().mean(dim=(1, 2, 3)) + 0.5).float().view(-1, 1, 1)
        a = arg.float().view(-1, 1, 1)
        return _blend(mean, levels.float(), a).clamp(0, 255).round().expand(-1, x.shape[1], -1)
    raise ValueError(f"{name!r} is not a RandAugment op with per-image tables")


def _equalize_tables(x: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize``, per channel: ``lut[i] = (step // 2 + #pixels below i) // step`` with ``step``
    the pixel count outside the highest occupied level, over 255; a channel with one level (or step 0) is kept."""
    n, c = x.shape[:2]
    values = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, values, torch.ones_like(values))
    levels = _levels(x.device)
    top_level = torch.where(hist > 0, levels.long(), -1).amax(dim=1, keepdim=True)
    step = (values.shape[1] - hist.gather(1, top_level)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_max(255)
    keep = step == 0  # also covers a single occupied level: everything is in the top level
    return torch.where(keep, levels, lut.double()).float().view(n, c, 256)


def _lookup(x: Tensor, tables: Tensor) -> Tensor:
    """``x`` (``[N, C, H, W]``, values 0..255) through per-image, per-channel ``[N, C, 256]`` tables."""
    n, c = x.shape[:2]
    return tables.gather(2, x.long().view(n, c, -1)).view_as(x)


def _blend_op(name: str, x: Tensor, arg: Tensor) -> Tensor:
    """Color or Sharpness: PIL's enhancer blend of ``x`` with its gray or its smoothed image, clamped and rounded."""
    a = arg.to(x.dtype).view(-1, 1, 1, 1)  # the enhancers blend in float, as PIL's C code does
    degenerate = _gray(x).expand_as(x) if name.startswith("Color") else _smooth(x)
    return _blend(degenerate, x, a).clamp_(0, 255).round_()


def _gray(x: Tensor) -> Tensor:
    """PIL's ``convert("L")``: ITU-R 601-2 luma, rounded."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 0x8000) / 65536)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: the enhancers' interpolation (extrapolation above 1),
    truncated to an integer as PIL's C code does."""
    return torch.floor(degenerate + factor * (x - degenerate))


def _smooth(x: Tensor) -> Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3x3, centre 5, others 1, /13); the one-pixel border is left as it is.

    Summed with shifted adds (three columns, then three rows of those sums, then four more centres), not a
    convolution: integer sums are exact in float32 in any order, where a GPU convolution may run in TF32 and move
    rounded pixels.
    """
    h, w = x.shape[-2:]
    columns = x[..., :, 0 : w - 2] + x[..., :, 1 : w - 1] + x[..., :, 2:w]
    total = columns[..., 0 : h - 2, :] + columns[..., 1 : h - 1, :] + columns[..., 2:h, :]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.round((total + 4 * x[..., 1:-1, 1:-1]) / 13.0)
    return out


def _affine_matrices(name: str, args: np.ndarray, h: int, w: int) -> np.ndarray:
    """float64 ``[N, 6]`` on the host: PIL's affine ``data`` ``(a, b, c, d, e, f)`` for each argument (output pixel
    ``(x, y)`` reads the input at ``(a x + b y + c, d x + e y + f)``), in the Python arithmetic of PIL's ``rotate``
    and of timm's shear and translate calls."""
    rows = []
    for arg in args.tolist():
        if name == "Rotate":  # PIL's rotate: counter-clockwise about the centre, its matrix rounded to 15 decimals
            angle = -math.radians(arg % 360.0)
            cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
            cx, cy = w / 2, h / 2
            rows.append((cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy))
        elif name == "ShearX":
            rows.append((1.0, arg, 0.0, 0.0, 1.0, 0.0))
        elif name == "ShearY":
            rows.append((1.0, 0.0, 0.0, arg, 1.0, 0.0))
        elif name == "TranslateXRel":
            rows.append((1.0, 0.0, arg * w, 0.0, 1.0, 0.0))
        elif name == "TranslateYRel":
            rows.append((1.0, 0.0, 0.0, 0.0, 1.0, arg * h))
        else:
            raise ValueError(f"unknown RandAugment op {name!r}")
    return np.array(rows, dtype=np.float64).reshape(-1, 6)


@lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int, device: torch.device) -> tuple[Tensor, ...]:
    """What :func:`_resample` needs on the device for ``h x w`` images, made once: the output pixel centres (x and y,
    float64 ``[H, W]``), the size (``[1, 2, 1, 1]`` (w, h), float64) and the last column and row (long, the same
    shape), and the offsets of a position's two neighbours along each axis (long ``[1, 2, 1, 1, 1]``: 0 and 1)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64) + 0.5,
        torch.arange(w, device=device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    size = torch.tensor([float(w), float(h)], dtype=torch.float64).view(1, 2, 1, 1)
    last = torch.tensor([w - 1, h - 1]).view(1, 2, 1, 1)
    steps = torch.tensor([0, 1]).view(1, 2, 1, 1, 1)
    return xs, ys, *(copy_to_device(t, device) for t in (size, last, steps))


def _resample(x: Tensor, m: Tensor) -> Tensor:
    """``x`` through the affine matrices ``m`` (``[N, 6]``, :func:`_affine_matrices`) in PIL's own arithmetic: each
    output pixel centre ``p`` reads the input at ``M p + t`` (doubles, pixel units, origin at the top-left corner); a
    position outside the image reads the fill; inside, the two rows are blended along x and then along y from the
    four pixels around it (edge pixels repeated) and the result truncated to an integer (in [0, 255]: a blend of
    pixels).

    The x and y coordinates go through each step together, and the four neighbours through one gather: every op is a
    launch on a GPU, and the host's launches are what this costs there."""
    n, c, h, w = x.shape
    xs, ys, size, last, steps = _pixel_grid(h, w, x.device)
    m = m.view(n, 2, 3, 1, 1)
    # elementwise, not a matmul (which a GPU may run in TF32): [N, 2, H, W] input positions (x, y) in pixels
    src = m[:, :, 0] * xs + m[:, :, 1] * ys + m[:, :, 2]
    inside = ((src >= 0) & (src < size)).all(dim=1)
    shifted = src - 0.5
    low = torch.floor(shifted)
    frac = shifted - low  # [N, 2, H, W]: the blend weights along x and along y
    # [N, 2 (first, second), 2 (x, y), H, W]: the neighbours' columns and rows, edge pixels repeated
    near_at = torch.minimum(low.long()[:, None] + steps, last).clamp_min_(0)
    rows, cols = near_at[:, :, 1] * w, near_at[:, :, 0]  # [N, 2, H, W]: upper and lower rows, left and right columns
    where = (rows[:, :, None] + cols[:, None]).view(n, 1, 4 * h * w)  # [N, 1, 4 H W]: (upper, lower) x (left, right)
    # gathered in float32, which holds the integer pixels exactly: the blend below promotes them to doubles (the
    # weights are doubles) with the same values, at half the memory traffic of gathering doubles
    near = x.reshape(n, c, h * w).gather(2, where.expand(n, c, -1)).view(n, c, 2, 2, h, w)
    left, right = near[:, :, :, 0], near[:, :, :, 1]  # [N, C, 2 (upper, lower), H, W]
    across = left + (right - left) * frac[:, None, None, 0]
    upper, lower = across[:, :, 0], across[:, :, 1]
    # a blend of two values lies between them (rounding keeps it there), so this is an integer in [0, 255]: already
    # clamped and rounded, as every op's output must be
    out = torch.floor(upper + (lower - upper) * frac[:, None, 1]).to(x.dtype)
    return torch.where(inside[:, None], out, _FILL)
