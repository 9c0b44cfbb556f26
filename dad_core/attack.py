"""PGD on the teacher and DAD sample generation (VQ -> attack -> VQ), as pure functions.

Everything works in [0, 1] pixel space. The teacher and the VQGAN normalize / rescale internally.
Reference: Zhou et al., NeurIPS 2023, and the authors' offline generator (dad_method.md §1.4): an L2 ball of
radius 0.1 centred on the VQGAN reconstruction x0 = VQ(x), a random start on the sphere with probability 0.8
(one coin per batch), one normalized-gradient step of size 0.01 that increases the teacher's cross-entropy,
projection, clamp, then a second VQGAN round trip.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dad_core.config import AttackConfig

__all__ = ["Discretizer", "IdentityDiscretizer", "generate_dad_samples", "pgd_attack", "project", "random_direction"]


class Discretizer(Protocol):
    def reconstruct(self, images: Tensor) -> Tensor: ...


class IdentityDiscretizer:
    """A discretizer that changes nothing: isolates attack properties in tests and ablations."""

    def reconstruct(self, images: Tensor) -> Tensor:
        return images.detach().clone()


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))


def random_direction(like: Tensor, norm: str, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """A random perturbation: on the L2 sphere of radius ``eps`` per sample, or uniform in the L-inf box."""
    if norm == "l2":
        r = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return eps * r / _per_sample_norm(r)
    if norm == "linf":
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return eps * (2 * u - 1)
    raise ValueError(f"unsupported norm {norm!r}; use 'l2' or 'linf'")


def project(delta: Tensor, norm: str, eps: float) -> Tensor:
    """Project a perturbation onto the ``eps`` ball of ``norm``, per sample."""
    if norm == "l2":
        scale = (eps / _per_sample_norm(delta)).clamp(max=1.0)
        return delta * scale
    if norm == "linf":
        return delta.clamp(-eps, eps)
    raise ValueError(f"unsupported norm {norm!r}; use 'l2' or 'linf'")


def _ascent_step(grad: Tensor, norm: str, step_size: float) -> Tensor:
    if norm == "l2":
        return step_size * grad / _per_sample_norm(grad)
    return step_size * grad.sign()


def _projected_ascent(
    centre: Tensor,
    direction,
    *,
    norm: str,
    eps: float,
    step_size: float,
    steps: int,
    random_start: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Shared loop: optional random start, then ``steps`` ascent steps along ``direction(adv)``, projected."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"unsupported norm {norm!r}; use 'l2' or 'linf'")
    centre = centre.detach()
    adv = centre.clone()
    coin = torch.rand((), generator=generator, device=generator.device if generator else "cpu").item()
    if coin < random_start:
        adv = (centre + random_direction(centre, norm, eps, generator)).clamp(0, 1)
    for _ in range(steps):
        adv = adv.detach() + _ascent_step(direction(adv), norm, step_size)
        adv = (centre + project(adv - centre, norm, eps)).clamp(0, 1)
    return adv.detach()


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

    def gradient(adv: Tensor) -> Tensor:
        adv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            # Sum, not mean: the step is normalized per sample, and a sum keeps each sample's gradient
            # independent of the batch size.
            loss = F.cross_entropy(model(adv).float(), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
        return grad.detach()

    return _projected_ascent(
        images,
        gradient,
        norm=norm,
        eps=eps,
        step_size=step_size,
        steps=steps,
        random_start=random_start,
        generator=generator,
    )


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
        ``dad``: ``x0 = VQ(x)``; PGD on the teacher inside the ball around ``x0``; ``VQ`` again.
        ``random``: the same budget, a random direction instead of the teacher's gradient (control).
        ``vq_only``: ``VQ(VQ(x))``, no perturbation (ablation).
        ``none``: the clean images unchanged (the KD-only ablation stores no DAD term; callers skip it).

    Args:
        teacher: frozen teacher taking [0, 1] images.
        vqgan: anything with ``reconstruct(images) -> images`` in [0, 1].
        images: ``[B, 3, H, W]`` in [0, 1].
        labels: ``[B]`` integer classes.
        cfg: attack configuration.
        generator: RNG for the random start / random direction.

    Returns:
        ``[B, 3, H, W]`` DAD samples in [0, 1].
    """
    if cfg.mode == "none":
        return images.detach().clone()
    x0 = vqgan.reconstruct(images)
    if cfg.mode == "vq_only":
        return vqgan.reconstruct(x0)
    if cfg.mode == "random":
        adv = _projected_ascent(
            x0,
            lambda adv: torch.randn(adv.shape, generator=generator, device=adv.device, dtype=adv.dtype),
            norm=cfg.norm,
            eps=cfg.eps,
            step_size=cfg.step_size,
            steps=cfg.steps,
            random_start=cfg.random_start,
            generator=generator,
        )
    elif cfg.mode == "dad":
        adv = pgd_attack(
            teacher,
            x0,
            labels,
            norm=cfg.norm,
            eps=cfg.eps,
            step_size=cfg.step_size,
            steps=cfg.steps,
            random_start=cfg.random_start,
            generator=generator,
        )
    else:
        raise ValueError(f"unsupported attack mode {cfg.mode!r}")
    return vqgan.reconstruct(adv)
