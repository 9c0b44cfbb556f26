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
    rows = [[spec.ops.index(op[0]), op[1]] if op else [-1, 0.0] for op in draw_ops(seed, spec)]
    return torch.tensor(rows, dtype=torch.float64)


def rand_augment(
    images: Tensor, seeds: Tensor | list[int] | None, config: str, *, drawn: Tensor | None = None
) -> Tensor:
    """RandAugment ``config`` on float ``[B, C, H, W]`` images in [0, 1], sample i drawn from ``seeds[i]``.

    Samples that drew the same op in the same layer go through it together, so a batch costs about two batched
    calls per op of the policy, whatever its size.

    Args:
        images: float ``[B, C, H, W]`` in [0, 1].
        seeds: each sample's seed (:func:`draw_ops`); None when ``drawn`` is given.
        config: timm ``rand-...`` string.
        drawn: the draws already made, ``[B, num_layers, 2]`` rows of :func:`encode_ops` (read on the host: pass a
            CPU tensor); the same pixels as drawing from the seeds.

    Returns:
        float32 ``[B, C, H, W]`` in [0, 1], on the images' device, on the uint8 grid (as PIL's output would be).
    """
    spec = parse_randaugment(config)
    if drawn is not None:
        if drawn.dim() != 3 or tuple(drawn.shape[1:]) != (spec.num_layers, 2):
            raise ValueError(f"drawn: {tuple(drawn.shape)} for {config!r}, which needs [B, {spec.num_layers}, 2]")
        ops = [[None if op < 0 else (spec.ops[int(op)], arg) for op, arg in rows] for rows in drawn.tolist()]
    else:
        seed_list = seeds.detach().cpu().tolist() if isinstance(seeds, Tensor) else list(seeds)
        # drawn once per seed: a clean image and its DAD sample share their view's seed
        by_seed = {seed: draw_ops(seed, spec) for seed in dict.fromkeys(seed_list)}
        ops = [by_seed[seed] for seed in seed_list]
    if len(ops) != images.shape[0]:
        raise ValueError(f"{len(ops)} {'draws' if drawn is not None else 'seeds'} for {images.shape[0]} images")
    # exact float32 (and float64 where PIL uses doubles) whatever the caller's autocast: bf16 would move pixels
    with torch.autocast(images.device.type, enabled=False):
        return _rand_augment(images, ops, spec)


def _rand_augment(images: Tensor, drawn: list[list[tuple[str, float] | None]], spec: RandAugmentSpec) -> Tensor:
    x = (images.float().clamp(0, 1) * 255).round()  # the uint8 image PIL would get, as floats on the device
    for layer in range(spec.num_layers):
        groups: dict[str, list[tuple[int, float]]] = {}
        for i, ops in enumerate(drawn):
            if ops[layer] is not None:
                groups.setdefault(ops[layer][0], []).append((i, ops[layer][1]))
        if not groups:
            continue
        # the geometric ops last: they go through one resampling call together (their matrices differ, the sampling
        # does not), which saves the host about a millisecond of launches per op on a GPU
        names = sorted(groups, key=lambda name: name in _GEOMETRIC)
        # one host-to-device copy per layer (sample indices grouped by op, and their arguments), not one per op
        flat = [entry for name in names for entry in groups[name]]
        rows = _to_device(torch.tensor([i for i, _ in flat]), x.device)
        args = _to_device(torch.tensor([a for _, a in flat], dtype=torch.float64), x.device)  # PIL's are doubles
        start, matrices = 0, []
        h, w = x.shape[-2:]
        for name in names:
            index, arg = rows[start : start + len(groups[name])], args[start : start + len(groups[name])]
            start += len(groups[name])
            if name in _GEOMETRIC:
                matrices.append(_affine_matrix(name, arg, h, w))
            else:
                x[index] = _apply(name, x[index], arg).clamp_(0, 255).round_()
        if matrices:  # the rows' tail, in the order the matrices were made
            index = rows[len(flat) - sum(len(m) for m in matrices) :]
            x[index] = _resample(x[index], torch.cat(matrices)).clamp_(0, 255).round_()
    return x / 255.0


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from pinned memory on a GPU, so the copy does not stall the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _apply(name: str, x: Tensor, arg: Tensor) -> Tensor:
    """Op ``name`` on ``[N, C, H, W]`` values in [0, 255] (integers stored as float), with ``[N]`` arguments."""
    a = arg.to(x.dtype).view(-1, 1, 1, 1)  # the enhancers blend in float, as PIL's C code does
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name.startswith("Posterize"):
        step = torch.exp2(8.0 - a)  # keep `arg` high bits
        return torch.floor(x / step) * step
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return torch.where(x >= a, 255.0 - x, x)
    if name == "SolarizeAdd":
        return torch.where(x < 128, (x + a).clamp(max=255), x)
    if name.startswith("Color"):
        return _blend(_gray(x).expand_as(x), x, a)
    if name.startswith("Contrast"):
        # PIL: int(mean of the L image + 0.5), in doubles (a float32 sum is inexact beyond 2^24)
        mean = torch.floor(_gray(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
        return _blend(mean.expand_as(x), x, a)
    if name.startswith("Brightness"):
        return _blend(torch.zeros_like(x), x, a)
    if name.startswith("Sharpness"):
        return _blend(_smooth(x), x, a)
    return _affine(name, x, arg)


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

    Summed with shifted adds, not a convolution: integer sums are exact in float32, where a GPU convolution may run in
    TF32 and move rounded pixels.
    """
    h, w = x.shape[-2:]
    total = 4 * x[..., 1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            total = total + x[..., dy : dy + h - 2, dx : dx + w - 2]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.round(total / 13.0)
    return out


def _autocontrast(x: Tensor) -> Tensor:
    """PIL's ``ImageOps.autocontrast`` (no cutoff): each channel stretched to [0, 255]; flat channels kept."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1.0)  # a true division (255.0 / t is 255 * (1 / t))
    stretched = torch.floor(x.double() * scale - lo * scale).clamp(0, 255)  # PIL: int(i * scale + offset), doubles
    return torch.where(hi > lo, stretched, x.double()).to(x.dtype)


def _equalize(x: Tensor) -> Tensor:
    """PIL's ``ImageOps.equalize``, per channel: ``lut[i] = (step // 2 + #pixels below i) // step`` with ``step``
    the pixel count outside the highest occupied level, over 255; a channel with one level (or step 0) is kept."""
    n, c = x.shape[:2]
    values = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, values, torch.ones_like(values))
    top_level = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(dim=1, keepdim=True)
    step = (values.shape[1] - hist.gather(1, top_level)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_max(255)
    out = lut.gather(1, values)
    keep = step == 0  # also covers a single occupied level: everything is in the top level
    return torch.where(keep, values, out).reshape(x.shape).to(x.dtype)


def _affine(name: str, x: Tensor, arg: Tensor) -> Tensor:
    """Rotate, ShearX/Y, TranslateX/YRel as PIL's ``Image.transform(AFFINE)`` with its bilinear filter."""
    return _resample(x, _affine_matrix(name, arg, *x.shape[-2:]))


def _affine_matrix(name: str, arg: Tensor, h: int, w: int) -> Tensor:
    """``[N, 6]`` double matrices ``(a, b, c, d, e, f)``: output pixel ``(x, y)`` reads the input at
    ``(a x + b y + c, d x + e y + f)``, as PIL's affine ``data`` (its rotate's rounded to 15 decimals)."""
    arg = arg.double()
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "Rotate":  # PIL's rotate: counter-clockwise about the centre, its matrix rounded to 15 decimals
        rad = -(arg * (math.pi / 180.0))
        cos, sin = torch.round(torch.cos(rad), decimals=15), torch.round(torch.sin(rad), decimals=15)
        cx, cy = w / 2.0, h / 2.0
        m = torch.stack([cos, sin, (cos * -cx + sin * -cy) + cx, -sin, cos, (-sin * -cx + cos * -cy) + cy], dim=1)
    elif name == "ShearX":
        m = torch.stack([one, arg, zero, zero, one, zero], dim=1)
    elif name == "ShearY":
        m = torch.stack([one, zero, zero, arg, one, zero], dim=1)
    elif name == "TranslateXRel":
        m = torch.stack([one, zero, arg * w, zero, one, zero], dim=1)
    elif name == "TranslateYRel":
        m = torch.stack([one, zero, zero, zero, one, arg * h], dim=1)
    else:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return m


def _resample(x: Tensor, m: Tensor) -> Tensor:
    """``x`` through the affine matrices ``m`` (``[N, 6]``, :func:`_affine_matrix`) in PIL's own arithmetic: each
    output pixel centre ``p`` reads the input at ``M p + t`` (doubles, pixel units, origin at the top-left corner); a
    position outside the image reads the fill; inside, the two rows are blended along x and then along y from the
    four pixels around it (edge pixels repeated) and the result truncated to an integer."""
    n, c, h, w = x.shape
    m = m.view(n, 2, 3, 1, 1)
    ys, xs = torch.meshgrid(  # output pixel centres
        torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
        torch.arange(w, device=x.device, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    # elementwise, not a matmul (which a GPU may run in TF32): [N, H, W] input positions in pixels
    src_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    src_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    fx, fy = src_x - 0.5, src_y - 0.5
    x0, y0 = torch.floor(fx), torch.floor(fy)
    dx, dy = (fx - x0)[:, None], (fy - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    # gathered in float32, which holds the integer pixels exactly: the blend below promotes them to doubles (dx, dy
    # are doubles) with the same values, at half the memory traffic of gathering doubles
    flat = x.reshape(n, c, h * w)
    # clamped rows and columns of the four neighbours, each computed once (every op here is a launch on a GPU)
    rows = (y0.clamp(0, h - 1) * w, (y0 + 1).clamp(0, h - 1) * w)
    cols = (x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1))

    def pixel(row: Tensor, col: Tensor) -> Tensor:  # [N, C, H, W] values at those integer positions
        return flat.gather(2, (row + col).view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)

    top_left, top_right = pixel(rows[0], cols[0]), pixel(rows[0], cols[1])
    bottom_left, bottom_right = pixel(rows[1], cols[0]), pixel(rows[1], cols[1])
    top = top_left + (top_right - top_left) * dx
    bottom = bottom_left + (bottom_right - bottom_left) * dx
    out = torch.floor(top + (bottom - top) * dy).to(x.dtype)
    return torch.where(inside[:, None], out, torch.full_like(out, _FILL))
