"""PGD and DAD generation properties (STYLE rule 39): budget, range, untouched teacher and inputs, determinism,
ascent, the per-batch random start, and the four generation modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dad_core.attack import (
    IdentityDiscretizer,
    generate_dad_samples,
    measure_survival,
    pgd_attack,
    project,
    random_direction,
    trace_dad_samples,
)
from dad_core.config import AttackConfig, ConfigError

TOL = 1e-5
NORMS = ("l2", "linf")


def _batch(n: int = 6, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _deltas(adv: torch.Tensor, centre: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample size of the perturbation in ``norm``."""
    delta = (adv - centre).flatten(1)
    return delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)


def _eps(norm: str) -> float:
    return 0.5 if norm == "l2" else 8 / 255


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("random_start", [0.0, 1.0])
def test_pgd_stays_in_the_ball_and_in_range(tiny_teacher, norm, random_start):
    images, labels = _batch()
    images[0] = 0.0  # corners of the pixel cube: clamping must not push outside the ball
    images[1] = 1.0
    eps = _eps(norm)
    adv = pgd_attack(
        tiny_teacher,
        images,
        labels,
        norm=norm,
        eps=eps,
        step_size=eps / 2,
        steps=5,
        random_start=random_start,
        generator=_gen(),
    )
    assert adv.shape == images.shape
    assert adv.dtype == images.dtype
    assert (_deltas(adv, images, norm) <= eps + TOL).all()
    assert adv.min() >= 0.0
    assert adv.max() <= 1.0
    assert not adv.requires_grad
    assert adv.grad_fn is None
    assert (_deltas(adv, images, norm)[2:] > 0).all()  # it moved


@pytest.mark.parametrize("norm", NORMS)
def test_a_large_step_is_projected_back_per_sample(tiny_teacher, norm):
    images, labels = _batch()
    eps = _eps(norm)
    adv = pgd_attack(tiny_teacher, images, labels, norm=norm, eps=eps, step_size=10.0, steps=1, random_start=0.0)
    sizes = _deltas(adv, images.clamp(0, 1), norm)
    assert (sizes <= eps + TOL).all()
    if norm == "l2":  # per sample, not per batch: each sample's own budget is filled (up to clamping)
        assert (sizes > 0.5 * eps).all()


def test_l2_budget_is_per_sample_not_per_batch(tiny_teacher):
    images, labels = _batch(n=8, size=8)
    eps = 0.05
    adv = pgd_attack(
        tiny_teacher, images, labels, norm="l2", eps=eps, step_size=eps, steps=3, random_start=1.0, generator=_gen()
    )
    sizes = _deltas(adv, images, "l2")
    # A batch-level projection would allow some samples to exceed eps while others sit well inside.
    assert (sizes <= eps + TOL).all()
    assert sizes.norm() > eps  # the batch as a whole is well outside the eps ball: the budget is not shared


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("frozen", [True, False])
def test_pgd_leaves_the_model_untouched(tiny_teacher, norm, frozen):
    model = tiny_teacher if frozen else tiny_teacher.model.requires_grad_(True).train()
    assert all(p.requires_grad != frozen for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _batch()
    pgd_attack(
        model, images, labels, norm=norm, eps=_eps(norm), step_size=0.1, steps=3, random_start=1.0, generator=_gen()
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad != frozen for p in model.parameters())


def test_pgd_keeps_gradients_already_accumulated_on_a_model(tiny_teacher):
    model = tiny_teacher.model.requires_grad_(True).train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    images, labels = _batch()
    pgd_attack(model, images, labels, norm="l2", eps=0.5, step_size=0.1, steps=2)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_pgd_does_not_mutate_its_inputs(tiny_teacher):
    images, labels = _batch()
    images_copy, labels_copy = images.clone(), labels.clone()
    adv = pgd_attack(
        tiny_teacher, images, labels, norm="l2", eps=0.5, step_size=0.2, steps=3, random_start=1.0, generator=_gen()
    )
    assert torch.equal(images, images_copy)
    assert torch.equal(labels, labels_copy)
    assert adv.data_ptr() != images.data_ptr()
    assert images.grad is None
    assert not images.requires_grad


def test_pgd_works_under_no_grad(tiny_teacher):
    images, labels = _batch()
    with torch.no_grad():
        adv = pgd_attack(tiny_teacher, images, labels, norm="l2", eps=0.5, step_size=0.2, steps=1)
    assert not torch.equal(adv, images)


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_is_deterministic_under_a_fixed_generator(tiny_teacher, norm):
    images, labels = _batch()
    kwargs = dict(norm=norm, eps=_eps(norm), step_size=0.05, steps=2, random_start=0.5)
    torch.manual_seed(1)
    a = pgd_attack(tiny_teacher, images, labels, generator=_gen(7), **kwargs)
    torch.manual_seed(2)  # the global RNG plays no part when a generator is given
    b = pgd_attack(tiny_teacher, images, labels, generator=_gen(7), **kwargs)
    assert torch.equal(a, b)
    outputs = [
        pgd_attack(tiny_teacher, images, labels, generator=_gen(s), **{**kwargs, "random_start": 1.0}) for s in (1, 2)
    ]
    assert not torch.equal(*outputs)


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_increases_the_cross_entropy(tiny_teacher, norm):
    images, labels = _batch(n=32, size=16)
    eps = 2.0 if norm == "l2" else 16 / 255
    adv = pgd_attack(tiny_teacher, images, labels, norm=norm, eps=eps, step_size=eps / 4, steps=10)
    rand = (images + random_direction(images, norm, eps, _gen())).clamp(0, 1)
    with torch.no_grad():
        ce = {
            name: F.cross_entropy(tiny_teacher(x), labels, reduction="none")
            for name, x in (("clean", images), ("adv", adv), ("random", rand))
        }
    assert ce["adv"].mean() > ce["clean"].mean() + 0.01
    assert (ce["adv"] >= ce["clean"] - 1e-4).float().mean() >= 0.9  # nearly every sample, not just on average
    assert ce["adv"].mean() > ce["random"].mean()  # the gradient direction beats a random one of the same size


def test_random_start_with_zero_steps_lands_on_the_sphere(tiny_teacher):
    images = torch.full((5, 3, 8, 8), 0.5)  # far from the cube's faces, so no clamping
    labels = torch.zeros(5, dtype=torch.long)
    eps = 0.3
    on = pgd_attack(
        tiny_teacher, images, labels, norm="l2", eps=eps, step_size=0.1, steps=0, random_start=1.0, generator=_gen()
    )
    torch.testing.assert_close(_deltas(on, images, "l2"), torch.full((5,), eps), rtol=0, atol=TOL)
    off = pgd_attack(
        tiny_teacher, images, labels, norm="l2", eps=eps, step_size=0.1, steps=0, random_start=0.0, generator=_gen()
    )
    assert torch.equal(off, images)
    box = pgd_attack(
        tiny_teacher, images, labels, norm="linf", eps=0.1, step_size=0.1, steps=0, random_start=1.0, generator=_gen()
    )
    assert (_deltas(box, images, "linf") <= 0.1 + TOL).all()
    assert (_deltas(box, images, "linf") > 0).all()


def test_random_start_without_it_the_first_step_has_exactly_step_size(tiny_teacher):
    images = torch.full((4, 3, 8, 8), 0.5) + 0.01 * torch.randn(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    adv = pgd_attack(tiny_teacher, images, labels, norm="l2", eps=1.0, step_size=0.05, steps=1, random_start=0.0)
    torch.testing.assert_close(_deltas(adv, images, "l2"), torch.full((4,), 0.05), rtol=0, atol=TOL)


def test_random_start_is_one_coin_per_batch(tiny_teacher):
    images = torch.full((6, 3, 8, 8), 0.5)
    labels = torch.zeros(6, dtype=torch.long)
    started = []
    for seed in range(40):
        adv = pgd_attack(
            tiny_teacher,
            images,
            labels,
            norm="l2",
            eps=0.2,
            step_size=0.1,
            steps=0,
            random_start=0.5,
            generator=_gen(seed),
        )
        moved = _deltas(adv, images, "l2") > 0
        assert moved.all() or not moved.any()  # all samples start randomly, or none
        started.append(bool(moved.all()))
    assert 5 < sum(started) < 35  # about half the batches


@pytest.mark.parametrize("norm", NORMS)
def test_project_and_random_direction(norm):
    delta = torch.randn(4, 3, 5, 5)
    eps = 0.2
    projected = project(delta, norm, eps)
    assert (_deltas(projected, torch.zeros_like(delta), norm) <= eps + TOL).all()
    small = 1e-4 * delta
    assert torch.equal(project(small, norm, eps), small)  # inside the ball: unchanged
    r = random_direction(delta, norm, eps, _gen())
    sizes = _deltas(r, torch.zeros_like(r), norm)
    if norm == "l2":
        torch.testing.assert_close(sizes, torch.full((4,), eps), rtol=0, atol=TOL)
    else:
        assert (sizes <= eps).all()
    with pytest.raises(ValueError, match="l3"):
        project(delta, "l3", eps)
    with pytest.raises(ValueError, match="l3"):
        random_direction(delta, "l3", eps)


def test_unknown_norm_is_refused(tiny_teacher):
    images, labels = _batch()
    with pytest.raises(ValueError, match="l1"):
        pgd_attack(tiny_teacher, images, labels, norm="l1", eps=0.1, step_size=0.1, steps=1)


# ----------------------------------------------------------------------------- generate_dad_samples


def _cfg(**kw) -> AttackConfig:
    base = dict(mode="dad", norm="l2", eps=0.5, step_size=0.2, steps=2, random_start=0.8)
    return AttackConfig(**{**base, **kw})


@pytest.mark.parametrize("norm", NORMS)
def test_dad_with_identity_discretizer_is_the_attack(tiny_teacher, norm):
    images, labels = _batch()
    cfg = _cfg(norm=norm, eps=_eps(norm))
    out = generate_dad_samples(tiny_teacher, IdentityDiscretizer(), images, labels, cfg, generator=_gen(3))
    expected = pgd_attack(
        tiny_teacher,
        images,
        labels,
        norm=norm,
        eps=cfg.eps,
        step_size=cfg.step_size,
        steps=cfg.steps,
        random_start=cfg.random_start,
        generator=_gen(3),
    )
    assert torch.equal(out, expected)
    assert (_deltas(out, images, norm) <= cfg.eps + TOL).all()
    assert out.min() >= 0
    assert out.max() <= 1


@pytest.mark.parametrize("norm", NORMS)
def test_dad_is_vq_of_a_point_within_eps_of_vq_x(tiny_teacher, pool_discretizer, norm):
    images, labels = _batch()
    images_copy = images.clone()
    cfg = _cfg(norm=norm, eps=_eps(norm))
    out = generate_dad_samples(tiny_teacher, pool_discretizer, images, labels, cfg, generator=_gen(5))
    assert torch.equal(images, images_copy)
    x0 = pool_discretizer.reconstruct(images)
    adv = pgd_attack(
        tiny_teacher,
        x0,
        labels,
        norm=norm,
        eps=cfg.eps,
        step_size=cfg.step_size,
        steps=cfg.steps,
        random_start=cfg.random_start,
        generator=_gen(5),
    )
    assert (_deltas(adv, x0, norm) <= cfg.eps + TOL).all()  # the ball is centred on VQ(x), not on x
    assert torch.equal(out, pool_discretizer.reconstruct(adv))
    assert torch.equal(pool_discretizer.reconstruct(out), out)  # on the discretizer's image
    assert out.min() >= 0
    assert out.max() <= 1


def test_vq_only_is_a_double_reconstruction(tiny_teacher, pool_discretizer):
    images, labels = _batch()
    out = generate_dad_samples(tiny_teacher, pool_discretizer, images, labels, _cfg(mode="vq_only"))
    assert torch.equal(out, pool_discretizer.reconstruct(pool_discretizer.reconstruct(images)))


def test_none_returns_the_images_unchanged(tiny_teacher, pool_discretizer):
    images, labels = _batch()
    out = generate_dad_samples(tiny_teacher, pool_discretizer, images, labels, _cfg(mode="none"))
    assert torch.equal(out, images)
    assert out.data_ptr() != images.data_ptr()


@pytest.mark.parametrize("norm", NORMS)
def test_random_mode_stays_in_budget_and_differs_from_dad(tiny_teacher, norm):
    images, labels = _batch()
    cfg = _cfg(norm=norm, eps=_eps(norm), random_start=0.0)
    identity = IdentityDiscretizer()
    rand = generate_dad_samples(
        tiny_teacher, identity, images, labels, dataclasses.replace(cfg, mode="random"), generator=_gen(1)
    )
    dad = generate_dad_samples(tiny_teacher, identity, images, labels, cfg, generator=_gen(1))
    assert (_deltas(rand, images, norm) <= cfg.eps + TOL).all()
    assert rand.min() >= 0
    assert rand.max() <= 1
    assert (_deltas(rand, images, norm) > 0).all()
    assert not torch.allclose(rand, dad, atol=1e-3)
    with torch.no_grad():
        ce_rand = F.cross_entropy(tiny_teacher(rand), labels)
        ce_dad = F.cross_entropy(tiny_teacher(dad), labels)
    assert ce_dad > ce_rand
    again = generate_dad_samples(
        tiny_teacher, identity, images, labels, dataclasses.replace(cfg, mode="random"), generator=_gen(1)
    )
    assert torch.equal(rand, again)


def test_generation_leaves_the_teacher_untouched(tiny_teacher, pool_discretizer):
    before = {k: v.clone() for k, v in tiny_teacher.state_dict().items()}
    images, labels = _batch()
    for mode in ("dad", "random", "vq_only", "none"):
        generate_dad_samples(tiny_teacher, pool_discretizer, images, labels, _cfg(mode=mode), generator=_gen())
    assert all(torch.equal(before[k], v) for k, v in tiny_teacher.state_dict().items())
    assert all(p.grad is None for p in tiny_teacher.parameters())


# ----------------------------------------------------------------------------- attack.space=latent


@pytest.fixture(scope="module")
def tiny_vqgan():
    """A random tiny-f4 VQGAN whose codebook is a sample of its own latents, so that nearest codes tile the latent
    space as in a trained one (a random codebook is a speck near 0). Its parameters keep requires_grad: the
    generation must leave no gradient on them either."""
    from dad_core.vqgan import VQGAN

    torch.manual_seed(0)
    model = VQGAN.from_config("tiny-f4").eval()
    with torch.no_grad():
        latents = model.encode(torch.rand(8, 3, 32, 32) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 8)
        model.codebook.weight.copy_(latents[torch.randperm(len(latents))[:256]])
    return model


def _latent_cfg(**kw) -> AttackConfig:
    return _cfg(**{"space": "latent", "latent_eps": 0.5, "eps": 0.1, "step_size": 0.05, **kw})


def _toy(vqgan, teacher, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and the teacher's own classes on their VQ(VQ(x)): the teacher starts right on every image."""
    images, _ = _batch(n=n, size=16)  # 4x4 codes: enough for the properties, and quick
    with torch.no_grad():
        labels = teacher(vqgan.reconstruct(vqgan.reconstruct(images))).argmax(1)
    return images, labels


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", ["dad", "random"])
def test_latent_samples_are_in_range_deterministic_and_on_the_vqgans_codes(tiny_teacher, tiny_vqgan, norm, mode):
    images, labels = _toy(tiny_vqgan, tiny_teacher)
    images_copy = images.clone()
    cfg = _latent_cfg(norm=norm, mode=mode, random_start=1.0)
    trace = trace_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen(2))
    out = generate_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen(2))
    assert torch.equal(out, trace.dad)  # the trace is the same generation, and it is deterministic
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not out.requires_grad
    assert torch.equal(images, images_copy)
    # the sample is the decoded grid of its codes (no second VQ), and the attack moved codes off VQ(VQ(x))'s
    decoded = (tiny_vqgan.decode_indices(trace.codes).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(out, decoded, atol=1e-5, rtol=0)
    assert float((trace.codes != tiny_vqgan.code_indices(trace.vq)).float().mean()) > 0.05
    # inside the latent ball: latent_eps relative to the latent's own size, per sample
    z0 = tiny_vqgan.encode(trace.vq * 2 - 1)
    delta = (trace.latents - z0).flatten(1)
    if norm == "l2":
        assert (delta.norm(dim=1) <= cfg.latent_eps * z0.flatten(1).norm(dim=1) * (1 + 1e-5)).all()
    else:
        rms = z0.flatten(1).pow(2).mean(dim=1).sqrt()
        assert (delta.abs().amax(dim=1) <= cfg.latent_eps * rms * (1 + 1e-5)).all()
    other = generate_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen(3))
    assert not torch.equal(out, other)  # another seed, another random start


def test_latent_dad_raises_the_teachers_loss_over_vq_only(tiny_teacher, tiny_vqgan):
    images, labels = _toy(tiny_vqgan, tiny_teacher, n=8)
    cfg = _latent_cfg(random_start=0.0, steps=3)
    dad = generate_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen())
    vq_only = generate_dad_samples(tiny_teacher, tiny_vqgan, images, labels, _latent_cfg(mode="vq_only"))
    with torch.no_grad():
        ce_dad = F.cross_entropy(tiny_teacher(dad), labels, reduction="none")
        ce_vq = F.cross_entropy(tiny_teacher(vq_only), labels, reduction="none")
    assert ce_dad.mean() > ce_vq.mean()
    assert (ce_dad > ce_vq).float().mean() >= 0.5


def test_latent_at_a_vanishing_budget_is_vq_only(tiny_teacher, tiny_vqgan):
    images, labels = _toy(tiny_vqgan, tiny_teacher)
    cfg = _latent_cfg(latent_eps=1e-9, random_start=0.0)
    out = generate_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen())
    assert torch.equal(out, tiny_vqgan.reconstruct(tiny_vqgan.reconstruct(images)))  # delta = 0 is VQ(VQ(x))


def test_latent_generation_leaves_teacher_and_vqgan_untouched(tiny_teacher, tiny_vqgan):
    before = {k: v.clone() for k, v in [*tiny_teacher.state_dict().items(), *tiny_vqgan.state_dict().items()]}
    images, labels = _toy(tiny_vqgan, tiny_teacher)
    generate_dad_samples(tiny_teacher, tiny_vqgan, images, labels, _latent_cfg(steps=2), generator=_gen())
    after = {**tiny_teacher.state_dict(), **tiny_vqgan.state_dict()}
    assert all(torch.equal(before[k], v) for k, v in after.items())
    assert all(p.grad is None for p in [*tiny_teacher.parameters(), *tiny_vqgan.parameters()])


def test_latent_space_needs_a_vqgan_and_a_known_space(tiny_teacher, pool_discretizer):
    images, labels = _batch()
    with pytest.raises(ValueError, match=r"space='latent'.*PoolDiscretizer"):
        generate_dad_samples(tiny_teacher, pool_discretizer, images, labels, _latent_cfg())
    with pytest.raises(ConfigError, match="space"):
        AttackConfig(space="pixels")
    with pytest.raises(ConfigError, match="latent_eps"):
        AttackConfig(latent_eps=0.0)
    assert AttackConfig().space == "pixel"  # the paper's attack stays the default


# ----------------------------------------------------------------------------- survival diagnostics


def test_code_indices_are_the_codes_reconstruct_decodes(tiny_vqgan):
    images = torch.rand(3, 3, 16, 16)
    codes = tiny_vqgan.code_indices(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    decoded = (tiny_vqgan.decode_indices(codes).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(decoded, tiny_vqgan.reconstruct(images), atol=1e-5, rtol=0)


def _check_ranges(metrics: dict) -> None:
    for key in ("top1_clean", "top1_vq", "top1_attacked", "top1_dad", "codes_changed"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0.0 <= metrics["pixel_change_255"] <= 255.0


@pytest.mark.parametrize(
    ("space", "mode"), [("pixel", "dad"), ("pixel", "random"), ("latent", "dad"), ("latent", "random")]
)
def test_survival_metrics_match_a_direct_computation(tiny_teacher, tiny_vqgan, space, mode):
    images, labels = _toy(tiny_vqgan, tiny_teacher)
    cfg = _cfg(space=space, mode=mode, eps=2.0, latent_eps=0.5)
    trace = trace_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen())
    survival = measure_survival(tiny_teacher, tiny_vqgan, images, labels, trace)
    metrics = survival.metrics
    _check_ranges(metrics)
    assert metrics["images"] == len(labels) and metrics["top1_vq"] == 1.0  # the toy labels are VQ(VQ(x))'s
    reference = tiny_vqgan.reconstruct(tiny_vqgan.reconstruct(images))
    assert torch.equal(survival.reference, reference)
    attacked = trace.attacked if space == "pixel" else (tiny_vqgan.decode(trace.latents).clamp(-1, 1) + 1) / 2
    with torch.no_grad():
        for stage, x in {"clean": images, "attacked": attacked, "dad": trace.dad}.items():
            accuracy = float((tiny_teacher(x).argmax(1) == labels).float().mean())
            assert metrics[f"top1_{stage}"] == pytest.approx(accuracy), stage
    # latent: the codes the sample was decoded from; pixel: the codes the second VQ picked
    dad_codes = trace.codes if space == "latent" else tiny_vqgan.code_indices(trace.attacked)
    changed = float((dad_codes != tiny_vqgan.code_indices(trace.vq)).float().mean())
    assert metrics["codes_changed"] == pytest.approx(changed) and changed > 0
    assert metrics["pixel_change_255"] == pytest.approx(float((trace.dad - reference).abs().mean() * 255), rel=1e-5)
    assert metrics["pixel_change_255"] > 0


def test_survival_without_an_attack_or_code_indices(tiny_teacher, tiny_vqgan, pool_discretizer):
    images, labels = _toy(tiny_vqgan, tiny_teacher)
    trace = trace_dad_samples(tiny_teacher, tiny_vqgan, images, labels, _cfg(mode="vq_only"))
    metrics = measure_survival(tiny_teacher, tiny_vqgan, images, labels, trace).metrics
    assert metrics["codes_changed"] == 0.0 and metrics["pixel_change_255"] == 0.0
    assert metrics["top1_dad"] == metrics["top1_attacked"] == metrics["top1_vq"] == 1.0
    trace = trace_dad_samples(tiny_teacher, pool_discretizer, images, labels, _cfg(), generator=_gen())
    metrics = measure_survival(tiny_teacher, pool_discretizer, images, labels, trace).metrics
    assert metrics["codes_changed"] is None  # a stub discretizer has no codes
    assert 0.0 <= metrics["top1_dad"] <= 1.0


def test_pixel_and_latent_survival_on_a_toy_teacher(tiny_teacher, tiny_vqgan):
    """The default budgets of both spaces on the toy models: ranges only. On toy models the teacher's top-1 barely
    moves in either space (a random TinyTeacher's class is mostly its input's mean colour), so which space fools it
    more is measured on the digits (README), not asserted here."""
    images, labels = _toy(tiny_vqgan, tiny_teacher, n=8)
    for space in ("pixel", "latent"):
        cfg = AttackConfig(space=space)
        trace = trace_dad_samples(tiny_teacher, tiny_vqgan, images, labels, cfg, generator=_gen())
        _check_ranges(measure_survival(tiny_teacher, tiny_vqgan, images, labels, trace).metrics)
