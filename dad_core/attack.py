"""PGD on the teacher and DAD sample generation (VQ -> attack -> VQ), as pure functions, plus survival diagnostics.

Everything works in [0, 1] pixel space. The teacher and the VQGAN normalize / rescale internally.
Reference: Zhou et al., NeurIPS 2023, and the authors' offline generator (dad_method.md §1.4): an L2 ball of
radius 0.1 centred on the VQGAN reconstruction x0 = VQ(x), a random start on the sphere with probability 0.8
(one coin per batch), one normalized-gradient step of size 0.01 that increases the teacher's cross-entropy,
projection, clamp, then a second VQGAN round trip (``attack.space: pixel``).

At that budget the second VQ round trip can erase the perturbation (DESIGN 3.3). ``attack.space: latent`` is an
alternative that survives discretization by construction: the ball lies in the VQGAN's continuous latent
``z0 = encode(x0)``, the teacher's loss is ascended through the decoder with a straight-through quantizer
(quantize in the forward pass, identity gradient; van den Oord et al. 2017, the estimator VQGAN training uses), and
the sample is ``decode(quantize(z0 + delta))``: the stored pixels are exactly what the attack evaluated, and no
second pixel-space VQ follows. With ``delta = 0`` both spaces give ``VQ(VQ(x))``, the ``vq_only`` ablation.
:func:`measure_survival` reports how much of the attack is left after each stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dad_core.config import AttackConfig

__all__ = [
    "DADTrace",
    "Discretizer",
    "IdentityDiscretizer",
    "LatentDiscretizer",
    "Survival",
    "generate_dad_samples",
    "measure_survival",
    "pgd_attack",
    "project",
    "random_direction",
    "trace_dad_samples",
]

Radius = float | Tensor  # a scalar, or one value per sample broadcastable to ``[B, 1, ..., 1]``


class Discretizer(Protocol):
    def reconstruct(self, images: Tensor) -> Tensor: ...


class LatentDiscretizer(Discretizer, Protocol):
    """What ``attack.space: latent`` needs of a VQGAN (:class:`dad_core.vqgan.VQGAN` has all of it)."""

    def encode(self, x: Tensor) -> Tensor: ...

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]: ...

    def decode(self, codes: Tensor) -> Tensor: ...


class IdentityDiscretizer:
    """A discretizer that changes nothing: isolates attack properties in tests and ablations."""

    def reconstruct(self, images: Tensor) -> Tensor:
        return images.detach().clone()


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def random_direction(like: Tensor, norm: str, eps: Radius, generator: torch.Generator | None = None) -> Tensor:
    """A random perturbation: on the L2 sphere of radius ``eps`` per sample, or uniform in the L-inf box."""
    if norm == "l2":
        r = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return eps * r / _per_sample_norm(r)
    if norm == "linf":
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return eps * (2 * u - 1)
    raise ValueError(f"unsupported norm {norm!r}; use 'l2' or 'linf'")


def project(delta: Tensor, norm: str, eps: Radius) -> Tensor:
    """Project a perturbation onto the ``eps`` ball of ``norm``, per sample (``eps`` a scalar or per sample)."""
    if norm == "l2":
        scale = (eps / _per_sample_norm(delta)).clamp(max=1.0)
        return delta * scale
    if norm == "linf":
        return delta.clamp(-eps, eps)
    raise ValueError(f"unsupported norm {norm!r}; use 'l2' or 'linf'")


def _ascent_step(grad: Tensor, norm: str, step_size: Radius) -> Tensor:
    if norm == "l2":
        return step_size * grad / _per_sample_norm(grad)
    return step_size * grad.sign()


def _projected_ascent(
    centre: Tensor,
    direction: Callable[[Tensor], Tensor],
    *,
    norm: str,
    eps: Radius,
    step_size: Radius,
    steps: int,
    random_start: float,
    generator: torch.Generator | None,
    pixels: bool = True,
) -> Tensor:
    """Shared loop: optional random start, then ``steps`` ascent steps along ``direction(adv)``, projected.

    ``pixels`` clamps every iterate to [0, 1]; latents have no box.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"unsupported norm {norm!r}; use 'l2' or 'linf'")
    clamp = (lambda x: x.clamp(0, 1)) if pixels else (lambda x: x)
    centre = centre.detach()
    adv = centre.clone()
    coin = torch.rand((), generator=generator, device=generator.device if generator else "cpu").item()
    if coin < random_start:
        adv = clamp(centre + random_direction(centre, norm, eps, generator))
    for _ in range(steps):
        adv = adv.detach() + _ascent_step(direction(adv), norm, step_size)
        adv = clamp(centre + project(adv - centre, norm, eps))
    return adv.detach()


def _input_gradient(model: nn.Module, labels: Tensor, to_images: Callable[[Tensor], Tensor] | None = None):
    """``x -> d CE(model(to_images(x)), labels) / dx``, through ``torch.autograd.grad`` (parameters untouched)."""

    def gradient(x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            images = x if to_images is None else to_images(x)
            # Sum, not mean: the step is normalized per sample, and a sum keeps each sample's gradient
            # independent of the batch size.
            loss = F.cross_entropy(model(images).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return grad.detach()

    return gradient


def pgd_attack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    norm: str = "l2",
    eps: float,
    step_size: float,
    steps: int,
    random_start: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on ``model``'s cross-entropy, inside the ``eps`` ball around ``images``.

    Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so the model's
    parameters and their ``.grad`` are never touched. ``images`` is not modified. Do not call it under
    ``torch.inference_mode`` (no autograd there); ``torch.no_grad`` is fine.

    Args:
        model: maps ``[B, C, H, W]`` images in [0, 1] to logits ``[B, K]``.
        images: ``[B, C, H, W]`` in [0, 1], the centre of the ball.
        labels: ``[B]`` integer classes.
        norm: ``l2`` (per-sample Euclidean ball) or ``linf``.
        eps: ball radius in [0, 1] pixel units.
        step_size: step length (L2: along the normalized gradient; L-inf: times its sign).
        steps: number of ascent steps.
        random_start: probability of starting at a random point of the ball's surface (L2) or box (L-inf);
            one coin per batch, as in the reference.
        generator: RNG for the coin and the random start (determinism under a fixed seed).

    Returns:
        Adversarial images ``[B, C, H, W]``, detached, within ``eps`` of ``images`` and within [0, 1].
    """
    return _projected_ascent(
        images,
        _input_gradient(model, labels),
        norm=norm,
        eps=eps,
        step_size=step_size,
        steps=steps,
        random_start=random_start,
        generator=generator,
    )


# ----------------------------------------------------------------------------- the VQGAN's stages (latent space)


def _vqgan_autocast(vqgan: LatentDiscretizer, device_type: str, part: str) -> torch.autocast:
    """The autocast ``VQGAN.reconstruct`` gives ``part`` (encoder or decoder) under the ambient one (vqgan.precision),
    so that a latent sample with ``delta = 0`` is bit for bit the pixel pipeline's ``VQ(VQ(x))``."""
    in_bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
    precision = getattr(vqgan, "precision", "fp32")
    enabled = in_bf16 and (precision == "bf16" if part == "encoder" else precision != "fp32")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def _model_dtype(vqgan: LatentDiscretizer) -> torch.dtype:
    return next(vqgan.parameters()).dtype if isinstance(vqgan, nn.Module) else torch.float32


def _encode(vqgan: LatentDiscretizer, images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> pre-quantization latents ``[B, D, h, w]`` in the VQGAN's dtype."""
    dtype = _model_dtype(vqgan)
    with torch.no_grad(), _vqgan_autocast(vqgan, images.device.type, "encoder"):
        return vqgan.encode(images.to(dtype) * 2 - 1).to(dtype)


def _decode(vqgan: LatentDiscretizer, latents: Tensor) -> Tensor:
    """Latents (quantized or not) -> images in [0, 1], as ``reconstruct`` finishes (clamp to [-1, 1], rescale)."""
    with _vqgan_autocast(vqgan, latents.device.type, "decoder"):
        out = vqgan.decode(latents)
    return (out.to(latents.dtype).clamp(-1, 1) + 1) / 2


def _straight_through(vqgan: LatentDiscretizer, z: Tensor) -> Tensor:
    """Nearest codes in the forward pass, identity in the backward pass (``z + sg(q(z) - z)``)."""
    with torch.no_grad():
        codes, _ = vqgan.quantize(z)
    return z + (codes.to(z.dtype) - z).detach()


def _latent_budget(z0: Tensor, cfg: AttackConfig) -> tuple[Tensor, Tensor]:
    """Per-sample radius and step in latent units: ``latent_eps`` times the latent's own size (its L2 norm for
    l2, its RMS per element for linf), and the step keeping the pixel configuration's ratio ``step_size / eps``."""
    size = _per_sample_norm(z0)
    if cfg.norm == "linf":
        size = size / z0[0].numel() ** 0.5
    radius = cfg.latent_eps * size
    return radius, radius * (cfg.step_size / cfg.eps)


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class DADTrace:
    """The stages of one DAD generation (DESIGN 3.3) for :func:`measure_survival`; images ``[B, 3, H, W]`` in [0, 1].

    Attributes:
        vq: ``x0 = VQ(x)``: the centre of the pixel ball, or the image whose latent the latent attack perturbs.
        attacked: pixel space: the attacked image before the second VQ (``x0`` when nothing attacks). None in latent
            space, where the pre-discretization image is ``decode(latents)``.
        dad: the final sample.
        latents: latent space: the attacked latents ``z0 + delta`` ``[B, D, h, w]`` before quantization, else None.
        codes: latent space: the ``[B, h, w]`` code indices ``dad`` was decoded from, else None.
    """

    vq: Tensor
    attacked: Tensor | None
    dad: Tensor
    latents: Tensor | None = None
    codes: Tensor | None = None

    def first(self, n: int) -> DADTrace:
        """The trace of the first ``n`` samples."""
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return DADTrace(*(None if value is None else value[:n] for value in values))


def _pixel_trace(
    teacher: nn.Module,
    vqgan: Discretizer,
    x0: Tensor,
    labels: Tensor,
    cfg: AttackConfig,
    generator: torch.Generator | None,
) -> DADTrace:
    if cfg.mode == "dad":
        direction = _input_gradient(teacher, labels)
    else:  # random: the same budget, a random direction instead of the teacher's gradient (control)
        direction = lambda adv: torch.randn(adv.shape, generator=generator, device=adv.device, dtype=adv.dtype)  # noqa: E731
    adv = _projected_ascent(
        x0,
        direction,
        norm=cfg.norm,
        eps=cfg.eps,
        step_size=cfg.step_size,
        steps=cfg.steps,
        random_start=cfg.random_start,
        generator=generator,
    )
    return DADTrace(vq=x0, attacked=adv, dad=vqgan.reconstruct(adv))


def _latent_trace(
    teacher: nn.Module,
    vqgan: Discretizer,
    x0: Tensor,
    labels: Tensor,
    cfg: AttackConfig,
    generator: torch.Generator | None,
) -> DADTrace:
    missing = [name for name in ("encode", "quantize", "decode") if not callable(getattr(vqgan, name, None))]
    if missing:
        raise ValueError(
            f"attack.space='latent' needs a VQGAN with encode/quantize/decode; {type(vqgan).__name__} lacks {missing}"
        )
    z0 = _encode(vqgan, x0)
    radius, step = _latent_budget(z0, cfg)
    if cfg.mode == "dad":
        direction = _input_gradient(teacher, labels, lambda z: _decode(vqgan, _straight_through(vqgan, z)))
    else:
        direction = lambda z: torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)  # noqa: E731
    z_adv = _projected_ascent(
        z0,
        direction,
        norm=cfg.norm,
        eps=radius,
        step_size=step,
        steps=cfg.steps,
        random_start=cfg.random_start,
        generator=generator,
        pixels=False,
    )
    codes, indices = vqgan.quantize(z_adv)
    dad = _decode(vqgan, codes.to(z_adv.dtype)).to(x0.dtype)
    return DADTrace(vq=x0, attacked=None, dad=dad, latents=z_adv, codes=indices)


@torch.no_grad()
def trace_dad_samples(
    teacher: nn.Module,
    vqgan: Discretizer,
    images: Tensor,
    labels: Tensor,
    cfg: AttackConfig,
    *,
    generator: torch.Generator | None = None,
) -> DADTrace:
    """:func:`generate_dad_samples` keeping its intermediate stages; ``.dad`` is the same tensor it returns.

    Raises:
        ValueError: an unknown mode, or ``space: latent`` with a discretizer that has no encode/quantize/decode.
    """
    if cfg.mode == "none":
        clean = images.detach().clone()
        return DADTrace(vq=clean, attacked=clean, dad=clean)
    if cfg.mode not in ("dad", "random", "vq_only"):
        raise ValueError(f"unsupported attack mode {cfg.mode!r}")
    x0 = vqgan.reconstruct(images)
    if cfg.mode == "vq_only":
        return DADTrace(vq=x0, attacked=x0, dad=vqgan.reconstruct(x0))
    trace = _latent_trace if cfg.space == "latent" else _pixel_trace
    return trace(teacher, vqgan, x0, labels, cfg, generator)


@torch.no_grad()
def generate_dad_samples(
    teacher: nn.Module,
    vqgan: Discretizer,
    images: Tensor,
    labels: Tensor,
    cfg: AttackConfig,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Make DAD samples for a batch (DESIGN §3.3).

    Modes (``cfg.mode``):
        ``dad``: ``x0 = VQ(x)``; ascend the teacher's cross-entropy inside the ball; discretize. In
            ``cfg.space == "pixel"`` (the paper) the ball is around ``x0`` in pixels and the result is ``VQ(x0 +
            delta)``; in ``"latent"`` it is around ``z0 = encode(x0)`` (radius ``latent_eps`` relative to ``z0``),
            the gradient flows through the decoder with a straight-through quantizer, and the result is
            ``decode(quantize(z0 + delta))`` with no second pixel-space VQ.
        ``random``: the same budget and space, a random direction instead of the teacher's gradient (control).
        ``vq_only``: ``VQ(VQ(x))``, no perturbation (ablation; ``space`` plays no part).
        ``none``: the clean images unchanged (the KD-only ablation stores no DAD term; callers skip it).

    Args:
        teacher: frozen teacher taking [0, 1] images.
        vqgan: anything with ``reconstruct(images) -> images`` in [0, 1]; latent space also needs
            ``encode``/``quantize``/``decode`` (:class:`LatentDiscretizer`).
        images: ``[B, 3, H, W]`` in [0, 1].
        labels: ``[B]`` integer classes.
        cfg: attack configuration.
        generator: RNG for the random start / random direction.

    Returns:
        ``[B, 3, H, W]`` DAD samples in [0, 1].
    """
    return trace_dad_samples(teacher, vqgan, images, labels, cfg, generator=generator).dad


# ----------------------------------------------------------------------------- survival diagnostics


@dataclasses.dataclass(frozen=True)
class Survival:
    """How much of the attack survives discretization, on one batch (see :func:`measure_survival`).

    Attributes:
        metrics: ``images`` (the count, the weight when averaging), the teacher's top-1 (fractions in [0, 1]) on
            the clean images (``top1_clean``), on ``VQ(x)`` (``top1_vq``), on the attacked image before
            discretization (``top1_attacked``) and on the DAD sample (``top1_dad``); ``codes_changed``, the fraction
            of code indices of the DAD sample that differ from those of ``VQ(VQ(x))`` (None for a discretizer
            without code indices); ``pixel_change_255``, the mean absolute pixel difference between the DAD sample
            and ``VQ(VQ(x))`` in 1/255 units.
        predictions: the teacher's top-1 class ``[B]`` on each stage (``clean``, ``vq``, ``attacked``, ``dad``).
        reference: ``VQ(VQ(x))`` ``[B, 3, H, W]``, what the DAD sample would be without an attack.
    """

    metrics: dict[str, float | None]
    predictions: dict[str, Tensor]
    reference: Tensor


@torch.no_grad()
def measure_survival(
    teacher: nn.Module, vqgan: Discretizer, images: Tensor, labels: Tensor, trace: DADTrace
) -> Survival:
    """Teacher accuracy at each stage of a DAD generation, and how far the DAD sample moved off ``VQ(VQ(x))``.

    Costs one more VQ round trip and, when the discretizer reports code indices (``code_indices``), two encodes:
    callers run it on a small sample.

    Args:
        teacher: the frozen teacher the samples were made against.
        vqgan: the discretizer the samples were made with.
        images: ``[B, 3, H, W]`` clean images in [0, 1].
        labels: ``[B]`` integer classes.
        trace: :func:`trace_dad_samples` of these images.

    Returns:
        The metrics, per-stage predictions and ``VQ(VQ(x))``.
    """
    attacked = trace.attacked if trace.attacked is not None else _decode(vqgan, trace.latents).to(images.dtype)
    stages = {"clean": images, "vq": trace.vq, "attacked": attacked, "dad": trace.dad}
    predictions = {name: teacher(x).argmax(dim=1) for name, x in stages.items()}
    reference = vqgan.reconstruct(trace.vq)
    codes_changed = None
    if callable(getattr(vqgan, "code_indices", None)):
        dad_codes = trace.codes if trace.codes is not None else vqgan.code_indices(attacked)
        codes_changed = float((dad_codes != vqgan.code_indices(trace.vq)).float().mean())
    metrics: dict[str, float | None] = {"images": len(labels)}
    metrics.update({f"top1_{name}": float((pred == labels).float().mean()) for name, pred in predictions.items()})
    metrics["codes_changed"] = codes_changed
    metrics["pixel_change_255"] = float((trace.dad.float() - reference.float()).abs().mean() * 255)
    return Survival(metrics, predictions, reference)
