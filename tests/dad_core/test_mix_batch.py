"""``train.mixup`` / ``train.cutmix`` (:func:`dad_core.task.mix_batch`): images, the cache's teacher probabilities and
the targets mixed with one pairing and one lambda."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dad_core.task import mix_batch


def _batch(b: int = 6, k: int = 10):
    gen = torch.Generator().manual_seed(0)
    clean, dad = torch.rand(b, 3, 16, 16, generator=gen), torch.rand(b, 3, 16, 16, generator=gen)
    probs = torch.softmax(torch.randn(b, k, generator=gen), -1)  # t_clean as the cache stores it
    targets = torch.nn.functional.one_hot(torch.arange(b) % k, k).float()
    return clean, dad, probs, targets


def test_mixup_blends_images_probabilities_and_targets_with_one_lambda():
    clean, dad, probs, targets = _batch()

    (m_clean, m_dad, m_probs), m_targets, perm, lam = mix_batch(
        [clean, dad, probs], targets, mixup=0.8, cutmix=0.0, rng=np.random.default_rng(1)
    )

    assert perm.tolist() == [5, 4, 3, 2, 1, 0] and 0 < lam < 1
    for before, after in ((clean, m_clean), (dad, m_dad), (probs, m_probs), (targets, m_targets)):
        torch.testing.assert_close(after, lam * before + (1 - lam) * before.flip(0))
    torch.testing.assert_close(m_probs.sum(-1), torch.ones(6))


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_one_box_into_the_images_and_mixes_distributions_by_its_share(seed):
    """The cached teacher probabilities are distributions per sample, not images: under cutmix they mix as the
    targets do (by the box's share of the image), and stay distributions."""
    clean, dad, probs, targets = _batch()

    (m_clean, m_dad, m_probs), m_targets, perm, lam = mix_batch(
        [clean, dad, probs], targets, mixup=0.0, cutmix=1.0, rng=np.random.default_rng(seed)
    )

    pasted = (m_clean != clean).any(dim=1)  # [B, H, W]: where the paired sample's pixels went
    assert torch.equal(pasted, (m_dad != dad).any(dim=1))  # a clean image and its DAD sample: the same box
    assert torch.equal(m_clean[pasted[:, None].expand_as(clean)], clean.flip(0)[pasted[:, None].expand_as(clean)])
    box = pasted[0].float().mean().item()  # one box for the whole batch (random pixels always differ)
    assert lam == pytest.approx(1 - box)
    torch.testing.assert_close(m_probs, lam * probs + (1 - lam) * probs.flip(0))
    torch.testing.assert_close(m_probs.sum(-1), torch.ones(6))
    torch.testing.assert_close(m_targets, lam * targets + (1 - lam) * targets.flip(0))


def test_the_pairing_is_made_on_the_targets_device():
    _, _, _, targets = _batch()
    _, _, perm, _ = mix_batch([targets.clone()], targets, mixup=0.5, cutmix=0.0, rng=np.random.default_rng(0))
    assert perm.device == targets.device
