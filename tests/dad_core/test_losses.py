"""Loss formulas against plain references: F.kl_div, a hand-written sum, T^2 scaling, and the DAD variants."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from dad_core.config import LossConfig
from dad_core.losses import DADLoss, kd_kl_loss, soft_cross_entropy, soften

B, K = 6, 10


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(B, K, generator=torch.Generator().manual_seed(seed))


def _labels() -> torch.Tensor:
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(99))


def _hand_kl(student_logits, teacher_logits, temp):
    """sum_k p_t (log p_t - log p_s), averaged over the batch, times T^2: KL(teacher || student)."""
    p_t = torch.softmax(teacher_logits / temp, dim=-1)
    log_p_s = torch.log_softmax(student_logits / temp, dim=-1)
    return (p_t * (p_t.log() - log_p_s)).sum(dim=-1).mean() * temp**2


@pytest.mark.parametrize("temp", [1.0, 4.0, 0.5])
def test_kd_kl_loss_matches_plain_kl_div_and_the_sum_formula(temp):
    s, t = _logits(0), _logits(1)
    loss = kd_kl_loss(s, soften(t, temp), temp)
    reference = F.kl_div(F.log_softmax(s / temp, dim=-1), F.softmax(t / temp, dim=-1), reduction="batchmean") * temp**2
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, _hand_kl(s, t, temp), rtol=1e-5, atol=1e-6)
    assert loss.dim() == 0
    assert loss > 0


def test_kd_kl_loss_direction_is_teacher_to_student():
    s, t = _logits(0), _logits(1)
    forward = kd_kl_loss(s, soften(t, 2.0), 2.0)
    reverse = kd_kl_loss(t, soften(s, 2.0), 2.0)
    assert not torch.allclose(forward, reverse)  # KL is asymmetric, so the direction is observable
    torch.testing.assert_close(forward, _hand_kl(s, t, 2.0), rtol=1e-5, atol=1e-6)


def test_kd_kl_loss_is_zero_when_student_equals_teacher():
    t = _logits(1)
    assert kd_kl_loss(t.clone(), soften(t, 4.0), 4.0).abs() < 1e-6
    # ...and shift-invariant, as softmax is.
    assert kd_kl_loss(t + 5.0, soften(t, 4.0), 4.0).abs() < 1e-5


def test_kd_kl_loss_scales_with_t_squared():
    s, t = _logits(0), _logits(1)
    temp = 4.0
    # Dividing logits by T inside, then multiplying by T^2: logits scaled by T at temperature T give the same
    # distributions as the originals at temperature 1, so the loss is exactly T^2 larger.
    torch.testing.assert_close(
        kd_kl_loss(temp * s, soften(temp * t, temp), temp),
        temp**2 * kd_kl_loss(s, soften(t, 1.0), 1.0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_kd_kl_loss_is_a_batch_mean():
    s, t = _logits(0), _logits(1)
    doubled = kd_kl_loss(torch.cat([s, s]), soften(torch.cat([t, t]), 4.0), 4.0)
    torch.testing.assert_close(doubled, kd_kl_loss(s, soften(t, 4.0), 4.0))


def test_kd_kl_loss_accepts_sparse_top_k_targets():
    # Cached soft labels keep only the teacher's top-k; zeros in the target contribute nothing (0 log 0 = 0).
    s, t = _logits(0), _logits(1)
    probs = soften(t, 4.0)
    top = probs.topk(3, dim=-1)
    sparse = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    sparse = sparse / sparse.sum(-1, keepdim=True)
    loss = kd_kl_loss(s, sparse, 4.0)
    log_p_s = torch.log_softmax(s / 4.0, dim=-1)
    mask = sparse > 0
    expected = torch.where(mask, sparse * (sparse.clamp_min(1e-30).log() - log_p_s), 0).sum(-1).mean() * 16
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_kd_kl_loss_gradient_flows_to_the_student_only():
    s = _logits(0).requires_grad_(True)
    t = _logits(1).requires_grad_(True)
    kd_kl_loss(s, soften(t, 4.0).detach(), 4.0).backward()
    assert s.grad is not None
    assert s.grad.abs().sum() > 0
    assert t.grad is None


def test_soft_cross_entropy_with_one_hot_equals_integer_ce():
    logits, labels = _logits(0), _labels()
    one_hot = F.one_hot(labels, K).float()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    # Label smoothing on integer labels equals the smoothed one-hot target.
    smooth = one_hot * 0.9 + 0.1 / K
    torch.testing.assert_close(
        soft_cross_entropy(logits, labels, label_smoothing=0.1),
        soft_cross_entropy(logits, smooth),
        rtol=1e-5,
        atol=1e-6,
    )


def _terms():
    s, t, s_dad, t_dad = _logits(0), _logits(1), _logits(2), _logits(3)
    return s, t, s_dad, t_dad, _labels()


def test_variant_a_is_ce_plus_half_t2_kl_clean_plus_half_t2_kl_dad():
    s, t, s_dad, t_dad, y = _terms()
    temp = 4.0
    out = DADLoss(LossConfig(variant="A", temperature=temp))(s, y, soften(t, temp), s_dad, soften(t_dad, temp))
    expected = F.cross_entropy(s, y) + 0.5 * _hand_kl(s, t, temp) + 0.5 * _hand_kl(s_dad, t_dad, temp)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ce"], F.cross_entropy(s, y))
    torch.testing.assert_close(out["kd_clean"], _hand_kl(s, t, temp), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kd_dad"], _hand_kl(s_dad, t_dad, temp), rtol=1e-5, atol=1e-5)
    # At T = 4 the reference's weights are CE + 8 KL_clean + 8 KL_dad (KL without T^2).
    kl = lambda a, b: _hand_kl(a, b, temp) / temp**2  # noqa: E731
    torch.testing.assert_close(
        out["loss"], F.cross_entropy(s, y) + 8 * kl(s, t) + 8 * kl(s_dad, t_dad), rtol=1e-5, atol=1e-5
    )


def test_variant_a_has_no_ce_on_dad_samples():
    s, t, s_dad, t_dad, y = _terms()
    loss = DADLoss(LossConfig())
    a = loss(s, y, soften(t, 4.0), s_dad, soften(t_dad, 4.0))["loss"]
    b = loss(s, y, soften(t, 4.0), s_dad, soften(t_dad, 4.0), dad_targets=(y + 1) % K)["loss"]
    assert torch.equal(a, b)


def test_kd_only_drops_the_dad_term():
    s, t, _, _, y = _terms()
    out = DADLoss(LossConfig(variant="A"))(s, y, soften(t, 4.0))
    torch.testing.assert_close(out["loss"], F.cross_entropy(s, y) + 0.5 * _hand_kl(s, t, 4.0), rtol=1e-5, atol=1e-5)
    assert "kd_dad" not in out


def test_variant_a_needs_teacher_dad_with_student_dad():
    s, t, s_dad, _, y = _terms()
    with pytest.raises(ValueError, match="teacher_dad"):
        DADLoss(LossConfig())(s, y, soften(t, 4.0), s_dad)


def test_kd_weight_and_label_smoothing_are_applied():
    s, t, s_dad, t_dad, y = _terms()
    out = DADLoss(LossConfig(kd_weight=0.25), label_smoothing=0.1)(s, y, soften(t, 4.0), s_dad, soften(t_dad, 4.0))
    expected = (
        F.cross_entropy(s, y, label_smoothing=0.1) + 0.25 * _hand_kl(s, t, 4.0) + 0.25 * _hand_kl(s_dad, t_dad, 4.0)
    )
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("clean_weight", "adv_weight"), [(0.25, 0.5), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)])
def test_each_kd_weight_scales_only_its_own_term(clean_weight, adv_weight):
    s, t, s_dad, t_dad, y = _terms()
    cfg = LossConfig(kd_weight=0.7, kd_clean_weight=clean_weight, kd_adv_weight=adv_weight)  # kd_weight overridden
    out = DADLoss(cfg)(s, y, soften(t, 4.0), s_dad, soften(t_dad, 4.0))
    kd_clean, kd_dad = _hand_kl(s, t, 4.0), _hand_kl(s_dad, t_dad, 4.0)
    expected = F.cross_entropy(s, y) + clean_weight * kd_clean + adv_weight * kd_dad
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["kd_clean"], kd_clean, rtol=1e-5, atol=1e-5)  # logged terms stay unweighted
    torch.testing.assert_close(out["kd_dad"], kd_dad, rtol=1e-5, atol=1e-5)


def test_gradients_follow_the_weights():
    s, s_dad = _logits(0).requires_grad_(True), _logits(2).requires_grad_(True)
    y, t, t_dad = _labels(), soften(_logits(1), 4.0), soften(_logits(3), 4.0)
    DADLoss(LossConfig(kd_adv_weight=0.0))(s, y, t, s_dad, t_dad)["loss"].backward()
    assert s.grad.abs().sum() > 0 and s_dad.grad.abs().sum() == 0  # the DAD term weighted 0 moves nothing
    s.grad, s_dad.grad = None, None
    DADLoss(LossConfig(kd_clean_weight=0.0))(s, y, t, s_dad, t_dad)["loss"].backward()
    torch.testing.assert_close(s.grad, torch.autograd.grad(F.cross_entropy(s, y), s)[0])  # CE only on clean logits
    assert s_dad.grad.abs().sum() > 0


def test_plain_ce_needs_no_teacher_and_a_weighted_term_does():
    s, _, _, _, y = _terms()
    out = DADLoss(LossConfig(kd_weight=0.0))(s, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(s, y))
    assert set(out) == {"loss", "ce"}
    with pytest.raises(ValueError, match="teacher_clean"):
        DADLoss(LossConfig(kd_adv_weight=0.0))(s, y)  # the clean term still weighs 0.5


def test_variant_c_is_three_quarters_ce_plus_quarter_t2_kl():
    s, t, _, _, y = _terms()
    soft_targets = F.softmax(_logits(5), dim=-1)  # mixup-style soft labels over the joint batch
    temp = 4.0
    out = DADLoss(LossConfig(variant="C", temperature=temp))(s, soft_targets, soften(t, temp))
    ce = (-soft_targets * F.log_softmax(s, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(out["loss"], 0.75 * ce + 0.25 * _hand_kl(s, t, temp), rtol=1e-5, atol=1e-5)
    # The reference's form: 0.5 CE + 0.5 (0.5 CE + 0.5 T^2 KL) = 0.75 CE + 4 KL at T = 4.
    torch.testing.assert_close(out["loss"], 0.75 * ce + 4 * _hand_kl(s, t, temp) / temp**2, rtol=1e-5, atol=1e-5)
    assert set(out) == {"loss", "ce", "kd"}
    assert not out["ce"].requires_grad
    assert not out["kd"].requires_grad


def test_loss_backpropagates_to_the_student():
    s = _logits(0).requires_grad_(True)
    s_dad = _logits(2).requires_grad_(True)
    out = DADLoss(LossConfig())(s, _labels(), soften(_logits(1), 4.0), s_dad, soften(_logits(3), 4.0))
    out["loss"].backward()
    assert s.grad.abs().sum() > 0
    assert s_dad.grad.abs().sum() > 0


def test_invalid_variant_is_named():
    with pytest.raises(ValueError, match="'B'"):
        LossConfig(variant="B")
    duck = types.SimpleNamespace(variant="B", temperature=4.0, kd_weight=0.5)  # bypasses the config's check
    with pytest.raises(ValueError, match="'B'"):
        DADLoss(duck)
