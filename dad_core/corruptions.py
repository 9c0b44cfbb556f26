"""ImageNet-C corruptions and rendition-style shifts as pure, seeded functions on ``uint8 [H, W, 3]`` arrays.

The 15 corruptions follow the definitions and severity constants of Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019; the ImageNet-C generation
script in ``hendrycks/robustness``), written here from the paper's definitions with numpy, scipy and
scikit-image. The maintained ``imagecorruptions`` package (1.1.2) was not used: it fails to import with
current setuptools (``pkg_resources``), scikit-image (``multichannel=``) and scipy (``scipy.ndimage.interpolation``),
needs OpenCV and ImageMagick, and draws from the global ``np.random`` state.

Differences from the 224 px originals, all deliberate:

* **Every randomness comes from the ``numpy.random.Generator`` argument**: the same seed gives the same bytes.
* **Lengths scale with the image.** Constants measured in pixels at 224 px (blur radii and sigmas, glass-blur
  displacement, motion-blur length, the elastic warp, snow streak length) are multiplied by
  ``s = min(H, W) / 224``; for the 32 px digits ``s = 1/7``. Quantities without a length (noise levels, zoom
  factors, snow flake zoom, the pixelate ratio, JPEG quality, brightness, contrast, fog and frost strength) are
  used as published. Fractional lengths are honoured so small images still get five distinct severities: the
  defocus disk acts on the bilinear interpolation of the image, motion kernels are splatted sub-pixel, zoom is
  continuous about the centre, a glass-blur displacement under one pixel becomes a swap probability, and the
  elastic displacement field keeps its shape relative to the image (see each function). At 32 px the mildest
  blurs are accordingly mild.
* **Motion blur** (ImageMagick's ``MotionBlurImage`` in the original) is a one-sided line kernel of
  ``2 * ceil(radius) + 1`` taps with Gaussian weights ``exp(-i^2 / 2 sigma^2)``, splatted bilinearly at the
  random angle.
* **Frost** blends the image with a frost texture. The six frost photographs of ImageNet-C cannot be
  downloaded here, so six textures are synthesized procedurally from fixed seeds (fractal haze plus
  rasterized ice needles, bluish white), cached, and cropped at a random position like the photographs.
* Outputs are rounded to the nearest integer (the original truncates) and returned as uint8; the suites are
  saved as PNG, whereas ImageNet-C was saved as JPEG (quality 85).

Renditions (``RENDITIONS``) are the "digits-R" shifts: ``invert``, ``edges``, ``outline`` and ``colorize``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_NAMES",
    "RENDITIONS",
    "RENDITION_NAMES",
    "SEVERITIES",
    "apply_rendition",
    "corrupt",
]

SEVERITIES = (1, 2, 3, 4, 5)
_REFERENCE_SIZE = 224  # ImageNet-C's image size: lengths in the constants below are pixels at this size


def _length_scale(x: np.ndarray) -> float:
    return min(x.shape[:2]) / _REFERENCE_SIZE


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {desc}")


# ---------------------------------------------------------------------------------------------------------
# Helpers: filters that accept fractional lengths
# ---------------------------------------------------------------------------------------------------------


def _blur_channels(x: np.ndarray, sigma: float, mode: str = "nearest") -> np.ndarray:
    """Gaussian blur of each channel (sigma in pixels, 0 = identity)."""
    if sigma <= 0:
        return x
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode=mode)


def _convolve_channels(x: np.ndarray, kernel: np.ndarray, mode: str = "reflect") -> np.ndarray:
    return np.stack([ndimage.convolve(x[..., c], kernel, mode=mode) for c in range(x.shape[2])], axis=-1)


@lru_cache(maxsize=64)
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Defocus PSF for a fractional ``radius``: a uniform disk applied to the bilinear interpolation of the image.

    The weight of offset ``k`` is the mean of ``tent(k - v)`` over points ``v`` of the disk (16 x 16 samples
    per pixel), so a radius under one pixel still blurs a little; then the small anti-alias Gaussian.
    """
    half = math.ceil(radius) + 1
    sub = (np.arange(16 * (2 * half + 1)) + 0.5) / 16 - (half + 0.5)
    ys, xs = np.meshgrid(sub, sub, indexing="ij")
    inside = ys**2 + xs**2 <= radius**2
    ys, xs = ys[inside], xs[inside]
    if ys.size == 0:
        ys, xs = np.zeros(1), np.zeros(1)
    offsets = np.arange(-half, half + 1)
    tent_y = np.clip(1 - np.abs(offsets[:, None] - ys[None, :]), 0, None)  # [K, N]
    tent_x = np.clip(1 - np.abs(offsets[:, None] - xs[None, :]), 0, None)
    kernel = tent_y @ tent_x.T / ys.size
    if alias_blur > 0:
        kernel = ndimage.gaussian_filter(np.pad(kernel, 2), alias_blur, mode="constant")
    return kernel / kernel.sum()


def _line_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """One-sided motion kernel: ``2 ceil(radius) + 1`` taps along ``angle`` weighted ``exp(-i^2 / 2 sigma^2)``."""
    taps = 2 * math.ceil(radius) + 1
    weights = np.exp(-(np.arange(taps) ** 2) / (2 * max(sigma, 1e-6) ** 2))
    size = 2 * taps + 1
    kernel = np.zeros((size, size))
    dy, dx = math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))
    for i, weight in enumerate(weights):  # bilinear splat of each tap at its sub-pixel position
        y, x = taps + i * dy, taps + i * dx
        y0, x0 = math.floor(y), math.floor(x)
        fy, fx = y - y0, x - x0
        for oy, ox, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
            kernel[y0 + oy, x0 + ox] += weight * w
    return kernel / kernel.sum()


@lru_cache(maxsize=256)
def _zoom_matrix(size: int, factor: float) -> np.ndarray:
    """[size, size] linear-interpolation matrix that magnifies a line by ``factor`` >= 1 about its centre."""
    center = (size - 1) / 2
    coords = np.clip(center + (np.arange(size) - center) / factor, 0, size - 1)
    low = np.minimum(np.floor(coords).astype(int), size - 2) if size > 1 else np.zeros(size, dtype=int)
    frac = coords - low
    matrix = np.zeros((size, size))
    matrix[np.arange(size), low] = 1 - frac
    if size > 1:
        matrix[np.arange(size), low + 1] += frac
    return matrix


def _zoom_center(x: np.ndarray, factor: float) -> np.ndarray:
    """Magnify ``x`` [H, W, C] by ``factor`` >= 1 about its centre, keeping the size (separable bilinear)."""
    rows, cols = _zoom_matrix(x.shape[0], factor), _zoom_matrix(x.shape[1], factor)
    return (rows @ x.transpose(2, 0, 1) @ cols.T).transpose(1, 2, 0)


def _plasma_fractal(size: int, wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1] of side ``size`` (a power of two); ImageNet-C's fog texture."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = noisy_mean(square)
        centers = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        grid[0:size:step, half:size:step] = noisy_mean(
            centers + np.roll(centers, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        )
        grid[half:size:step, 0:size:step] = noisy_mean(
            centers + np.roll(centers, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        )
        step, wibble = half, wibble / wibble_decay
    grid -= grid.min()
    return grid / grid.max()


def _plasma_for(shape: tuple[int, ...], wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    size = 1 << max(1, math.ceil(math.log2(max(shape[:2]))))
    return _plasma_fractal(size, wibble_decay, rng)[: shape[0], : shape[1]]


def _rgb_to_gray(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma, as OpenCV's RGB2GRAY


# ---------------------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------------------


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, std ``c`` in [0, 1] units."""
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = _to_float(image)
    return _to_uint8(x + rng.normal(scale=c, size=x.shape))


def shot_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson (photon) noise: ``Poisson(x c) / c``; fewer photons ``c`` means more noise."""
    c = (60, 25, 12, 5, 3)[severity - 1]
    x = _to_float(image)
    return _to_uint8(rng.poisson(x * c) / c)


def impulse_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise: a share ``c`` of the values (per channel) set to 0 or 1 with equal odds."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    x = _to_float(image)
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x = np.where(hit, salt.astype(np.float64), x)
    return _to_uint8(x)


# ---------------------------------------------------------------------------------------------------------
# Blur
# ---------------------------------------------------------------------------------------------------------


def defocus_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a disk PSF (radius, anti-alias sigma in pixels at 224 px, scaled by ``s``)."""
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    s = _length_scale(image)
    kernel = _disk_kernel(radius * s, alias_blur * s)
    return _to_uint8(_convolve_channels(_to_float(image), kernel))


def glass_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, local pixel swaps within ``max_delta`` (``iterations`` sweeps), Gaussian blur again.

    ``sigma`` and ``max_delta`` are pixels at 224 px, scaled by ``s``. A scaled ``max_delta`` under one pixel
    becomes swaps with a neighbour at distance 1 that happen with probability ``max_delta * s``, so the
    expected displacement still scales with the image.
    """
    sigma, max_delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    s = _length_scale(image)
    sigma, delta, swap_prob = sigma * s, max(1, round(max_delta * s)), min(1.0, max_delta * s)
    x = _to_uint8(_blur_channels(_to_float(image), sigma))
    height, width = x.shape[:2]
    # Sweep positions bottom-right to top-left; each swaps with an offset in [-delta, delta) when its coin says so.
    rows, cols = np.arange(height - delta, delta, -1), np.arange(width - delta, delta, -1)
    here = (rows[:, None] * width + cols[None, :]).reshape(-1)
    shape = (iterations, here.size)
    dx, dy = rng.integers(-delta, delta, size=(2, *shape))
    swap = rng.random(shape) < swap_prob
    there = here[None, :] + dy * width + dx
    order = list(range(height * width))  # swaps act on a permutation of pixel indices: sequential, as published
    for a, b in zip(np.broadcast_to(here, shape)[swap].tolist(), there[swap].tolist(), strict=True):
        order[a], order[b] = order[b], order[a]
    x = x.reshape(height * width, 3)[order].reshape(height, width, 3)
    return _to_uint8(_blur_channels(_to_float(x), sigma))


def motion_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur along a random direction in [-45, 45] degrees (radius, sigma in pixels at 224 px, scaled by ``s``)."""
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    s = _length_scale(image)
    kernel = _line_kernel(radius * s, sigma * s, rng.uniform(-45, 45))
    return _to_uint8(_convolve_channels(_to_float(image), kernel, mode="nearest"))


def zoom_blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Average of the image and copies magnified about the centre by each published zoom factor."""
    start, stop, step = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))[
        severity - 1
    ]
    factors = np.arange(start, stop, step)
    x = _to_float(image)
    total = x + sum(_zoom_center(x, float(f)) for f in factors)
    return _to_uint8(total / (len(factors) + 1))


# ---------------------------------------------------------------------------------------------------------
# Weather
# ---------------------------------------------------------------------------------------------------------


def snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Flakes (thresholded, zoomed Gaussian noise streaked by motion blur) over a whitened image."""
    loc, scale, zoom, threshold, radius, sigma, mix = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    s = _length_scale(image)
    x = _to_float(image)
    flakes = rng.normal(loc=loc, scale=scale, size=x.shape[:2])
    flakes = _zoom_center(flakes[..., None], zoom)[..., 0]
    flakes = np.clip(np.where(flakes < threshold, 0.0, flakes), 0, 1)
    kernel = _line_kernel(radius * s, sigma * s, rng.uniform(-135, -45))
    flakes = ndimage.convolve(flakes, kernel, mode="nearest")[..., None]
    x = mix * x + (1 - mix) * np.maximum(x, _rgb_to_gray(x)[..., None] * 1.5 + 0.5)
    return _to_uint8(x + flakes + np.rot90(flakes, k=2))


def frost(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``a x + b frost``: a random crop of one of six synthesized frost textures (see the module docstring)."""
    weight_image, weight_frost = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    height, width = image.shape[:2]
    side = max(round(_FROST_SIZE * _length_scale(image)), height + 1, width + 1)
    texture = _frost_texture(int(rng.integers(_FROST_COUNT)), side)
    top, left = int(rng.integers(0, side - height)), int(rng.integers(0, side - width))
    crop = texture[top : top + height, left : left + width]
    return _to_uint8(weight_image * _to_float(image) + weight_frost * crop)


_FROST_COUNT = 6  # ImageNet-C ships six frost photographs
_FROST_SIZE = 320  # texture side in pixels at 224 px (the photographs are larger than a 224 crop)
_FROST_SEED = 20190506  # fixed: the textures are part of the corruption's definition, like the photographs


@lru_cache(maxsize=64)
def _frost_texture(index: int, side: int) -> np.ndarray:
    """Texture ``index`` resized to ``side`` px: [side, side, 3] floats in [0, 1], read-only, cached."""
    texture = _synthesize_frost(np.random.default_rng([_FROST_SEED, index]))
    pil = Image.fromarray(_to_uint8(texture)).resize((side, side), Image.Resampling.LANCZOS)
    out = _to_float(np.asarray(pil))
    out.setflags(write=False)
    return out


def _synthesize_frost(rng: np.random.Generator) -> np.ndarray:
    """A frost-like texture at ``_FROST_SIZE`` px: fractal haze plus branching ice needles, bluish white."""
    from skimage.draw import line_aa

    size = _FROST_SIZE
    haze = _plasma_for((size, size), 1.6, rng) ** 1.5
    needles = np.zeros((size, size))
    for _ in range(int(rng.integers(140, 200))):  # crystals: a seed with a few needles and side branches
        y, x = rng.uniform(0, size, 2)
        for angle in rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))):
            length, bright = rng.uniform(6, 40), rng.uniform(0.4, 1.0)
            points = [(y, x, y + length * np.sin(angle), x + length * np.cos(angle), bright)]
            for t in rng.uniform(0.2, 0.9, 2):
                branch = angle + rng.choice([-1, 1]) * np.pi / 3
                by, bx = y + t * length * np.sin(angle), x + t * length * np.cos(angle)
                reach = length * rng.uniform(0.15, 0.35)
                points.append((by, bx, by + reach * np.sin(branch), bx + reach * np.cos(branch), 0.7 * bright))
            for y0, x0, y1, x1, value in points:
                rr, cc, aa = line_aa(*(int(np.clip(round(v), 0, size - 1)) for v in (y0, x0, y1, x1)))
                needles[rr, cc] = np.maximum(needles[rr, cc], value * aa)
    needles = ndimage.gaussian_filter(needles, 0.6)
    density = np.clip(0.2 + 0.5 * haze + 0.8 * needles / max(needles.max(), 1e-6), 0, 1)
    tint = np.array([0.82, 0.9, 1.0])  # ice reads bluish white
    return np.clip(density[..., None] * tint, 0, 1)


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Adds a plasma-fractal haze of strength ``c0`` (roughness ``c1``) and rescales to keep the maximum."""
    strength, wibble_decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    x = _to_float(image)
    max_val = x.max()
    x = x + strength * _plasma_for(x.shape, wibble_decay, rng)[..., None]
    return _to_uint8(x * max_val / (max_val + strength))


def brightness(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Adds ``c`` to the HSV value channel."""
    from skimage.color import hsv2rgb, rgb2hsv

    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    hsv = rgb2hsv(_to_float(image))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _to_uint8(hsv2rgb(hsv))


# ---------------------------------------------------------------------------------------------------------
# Digital
# ---------------------------------------------------------------------------------------------------------


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Scales each channel's deviation from its mean by ``c``."""
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    x = _to_float(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * c + means)


def elastic_transform(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp, then a smooth random displacement field (Simard et al. 2003).

    Constants ``(alpha, sigma, affine)`` are the published multiples of 244 px (ImageNet-C notes that 244
    should have been 224), i.e. pixels at 224 px, scaled by ``s``. The displacement field is Gaussian-smoothed
    uniform noise on the image's own grid (sigma ``sigma * s``), rescaled so that its standard deviation is
    ``s`` times that of the 224 px field: the warp keeps its shape relative to the image at any size.
    Severities 1-2 are large global affine warps and 3-5 local distortions, so the published scale is not
    monotone in pixel change.
    """
    alpha, sigma, affine = (
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    )[severity - 1]
    s = _length_scale(image)
    x = _warp_affine(_to_float(image), affine * s, rng)
    shape = x.shape[:2]
    gain = alpha * s * _gaussian_gain(sigma) / _gaussian_gain(sigma * s)
    dx, dy = (
        ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma * s, mode="reflect", truncate=3) * gain
        for _ in range(2)
    )
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    coords = np.stack([rows + dy, cols + dx])
    out = np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    return _to_uint8(out)


def _gaussian_gain(sigma: float) -> float:
    """Standard deviation of white noise after a 2-D Gaussian filter (truncate 3) relative to before."""
    radius = int(3 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return float((taps**2).sum() / taps.sum() ** 2)  # 1-D sum of squared weights = 2-D gain (sqrt of square)


def _warp_affine(x: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """Affine map taking three points around the centre to copies moved by up to ``jitter`` px (mirror edges)."""
    center = np.array(x.shape[:2], dtype=np.float64) // 2  # (row, col)
    half = min(x.shape[:2]) // 3
    src = np.array([center + half, [center[0] + half, center[1] - half], center - half])
    dst = src + rng.uniform(-jitter, jitter, size=src.shape)
    # Solve dst = A @ src + t for the 2x2 A and t; resample with the inverse map.
    design = np.hstack([src, np.ones((3, 1))])
    params = np.linalg.solve(design, dst).T  # [2, 3]
    inverse = np.linalg.inv(params[:, :2])
    offset = -inverse @ params[:, 2]
    warped = [ndimage.affine_transform(x[..., c], inverse, offset=offset, order=1, mode="mirror") for c in range(3)]
    return np.stack(warped, axis=-1)


def pixelate(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Box-downsample to a share ``c`` of the size and box-upsample back."""
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, int(width * c)), max(1, int(height * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BOX)).copy()


def jpeg_compression(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A JPEG round trip at quality ``c`` (Pillow's encoder, 4:2:0 chroma subsampling)."""
    c = (25, 18, 15, 10, 7)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=c)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB")).copy()


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
CORRUPTION_NAMES = tuple(CORRUPTIONS)  # ImageNet-C order: noise, blur, weather, digital


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Apply one ImageNet-C corruption.

    Args:
        image: ``uint8 [H, W, 3]`` array; not modified.
        name: one of :data:`CORRUPTION_NAMES`.
        severity: 1 (mildest) to 5.
        rng: the only source of randomness; the same seed gives the same bytes.

    Returns:
        The corrupted ``uint8 [H, W, 3]`` array.

    Raises:
        ValueError: unknown ``name``, severity outside 1..5, or not a ``uint8 [H, W, 3]`` array.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {list(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    _check_image(image)
    return CORRUPTIONS[name](image, severity, rng)


# ---------------------------------------------------------------------------------------------------------
# Renditions ("digits-R"): the same digit drawn in another style
# ---------------------------------------------------------------------------------------------------------


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photographic negative: white-on-black digits become black-on-white."""
    return 255 - image


def edges(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sobel gradient magnitude of the grey image, stretched to [0, 255]: bright edges on black."""
    gray = _rgb_to_gray(_to_float(image))
    magnitude = np.hypot(ndimage.sobel(gray, axis=0, mode="nearest"), ndimage.sobel(gray, axis=1, mode="nearest"))
    peak = magnitude.max()
    magnitude = magnitude / peak if peak > 0 else magnitude
    return np.repeat(_to_uint8(magnitude)[..., None], 3, axis=2)


def outline(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A line drawing: the contour of the thresholded digit as dark strokes on white (stroke width 1-2 px per 32).

    The stroke width (in pixels at 32 px, scaled with the image) is drawn from ``rng``.
    """
    gray = _rgb_to_gray(_to_float(image))
    mask = gray > 0.5 * max(gray.max(), 1e-6)
    width = max(1, round(int(rng.integers(1, 3)) * min(image.shape[:2]) / 32))
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    stroke = ndimage.gaussian_filter((mask & ~inner).astype(np.float64), 0.5)
    stroke = stroke / max(stroke.max(), 1e-6)
    return np.repeat(_to_uint8(1.0 - stroke)[..., None], 3, axis=2)


def colorize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Maps grey levels onto a random background-to-foreground colour ramp (luma contrast at least 0.4)."""
    gray = _rgb_to_gray(_to_float(image))[..., None]
    while True:
        background, foreground = rng.random(3), rng.random(3)
        if abs(_rgb_to_gray(foreground) - _rgb_to_gray(background)) >= 0.4:
            break
    return _to_uint8(background + gray * (foreground - background))


RENDITIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "invert": invert,
    "edges": edges,
    "outline": outline,
    "colorize": colorize,
}
RENDITION_NAMES = tuple(RENDITIONS)


def apply_rendition(image: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
    """Redraw an image in another style.

    Args:
        image: ``uint8 [H, W, 3]`` array (light digit on a dark background); not modified.
        name: one of :data:`RENDITION_NAMES`.
        rng: the only source of randomness (colours, stroke width).

    Returns:
        The rendered ``uint8 [H, W, 3]`` array.

    Raises:
        ValueError: unknown ``name`` or not a ``uint8 [H, W, 3]`` array.
    """
    if name not in RENDITIONS:
        raise ValueError(f"unknown rendition {name!r}; choose from {list(RENDITIONS)}")
    _check_image(image)
    return RENDITIONS[name](image, rng)
