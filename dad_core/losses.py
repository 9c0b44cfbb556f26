"""The DAD student loss (DESIGN §3.4), with the KL direction, reduction and T^2 scaling spelled out.

Teacher targets travel as probabilities at temperature T (``teacher_probs``): online they are
``softmax(teacher_logits / T)``; from the cache they are rebuilt from stored top-k values. One code path serves
both teacher modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dad_core.config import LossConfig

__all__ = ["DADLoss", "kd_kl_loss", "soft_cross_entropy", "soften"]


def soften(teacher_logits: Tensor, temperature: float) -> Tensor:
    """Teacher probabilities at temperature T, ``softmax(logits / T)``, in fp32."""
    return F.softmax(teacher_logits.float() / temperature, dim=-1)


def kd_kl_loss(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(p_t || p_s)`` with p = softmax(logits / T), averaged over the batch (``batchmean``).

    KL from teacher to student: the student is pulled towards the teacher's full distribution (Hinton et al.,
    2015). The T^2 factor keeps gradient magnitudes comparable across temperatures; the reference multiplies it
    by 0.5 per term (see :class:`DADLoss`).

    Args:
        student_logits: ``[B, K]``.
        teacher_probs: ``[B, K]`` teacher probabilities at the same temperature (rows sum to 1).
        temperature: T > 0.

    Returns:
        A scalar tensor.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # F.kl_div(input=log q, target=p) computes sum p * (log p - log q) = KL(p || q); batchmean divides by B.
    return F.kl_div(log_p_student, teacher_probs.float(), reduction="batchmean") * temperature**2


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against integer labels ``[B]`` or soft targets ``[B, K]`` (mixup/cutmix), mean over B."""
    if targets.dim() == 1:
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class DADLoss(nn.Module):
    """DAD objective in the two reference variants.

    Variant A (default, the online reference): ``CE(s(x), y) + w_c·T²·KL(t(x)‖s(x)) + w_a·T²·KL(t(x_dad)‖s(x_dad))``
    with w_c = w_a = 0.5 and T = 4, i.e. CE + 8·KL_clean + 8·KL_dad. No CE on DAD samples. ``w_c`` and ``w_a`` are
    ``LossConfig.kd_weights`` (``kd_clean_weight``, ``kd_adv_weight``; ``kd_weight`` for both unless set). When DAD
    samples are absent (KD-only ablation) the last term is dropped; without teacher probabilities for the clean
    batch (plain CE, both weights 0) the KL_clean term is dropped.

    Variant C (the offline reference): clean and DAD batches concatenated, one mixup over the joint batch,
    ``0.5·CE + 0.5·(0.5·CE + 0.5·T²·KL)`` = ``0.75·CE + 0.25·T²·KL`` on all 2B samples (= 0.75·CE + 4·KL at T=4).
    """

    def __init__(self, cfg: LossConfig, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if cfg.variant not in ("A", "C"):
            raise ValueError(f"unsupported loss variant {cfg.variant!r}; use 'A' or 'C'")
        self.variant = cfg.variant
        self.temperature = cfg.temperature
        self.kd_clean_weight, self.kd_adv_weight = cfg.kd_weights
        self.label_smoothing = label_smoothing

    def forward(
        self,
        student_clean: Tensor,
        targets: Tensor,
        teacher_clean: Tensor | None = None,
        student_dad: Tensor | None = None,
        teacher_dad: Tensor | None = None,
        dad_targets: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss and its named terms.

        Args:
            student_clean: student logits on the clean batch ``[B, K]`` (variant C: the joint batch ``[2B, K]``).
            targets: ``[B]`` labels or ``[B, K]`` soft targets for ``student_clean``.
            teacher_clean: teacher probabilities at temperature T for the same images ``[B, K]``; None only for
                plain CE (variant A with a clean KL weight of 0).
            student_dad: student logits on the DAD batch (variant A), or None for the KD-only ablation.
            teacher_dad: teacher probabilities on the DAD batch (variant A).
            dad_targets: unused by variant A (no CE on DAD samples); kept for symmetry of call sites.

        Returns:
            ``{"loss", "ce", "kd_clean", "kd_dad"}`` (``kd_clean`` only with ``teacher_clean``, ``kd_dad`` only with
            DAD samples; variant C: ``{"loss", "ce", "kd"}``). The terms are unweighted and detached, for logging.

        Raises:
            ValueError: a teacher input the weights need is missing.
        """
        T = self.temperature
        ce = soft_cross_entropy(student_clean, targets, self.label_smoothing)
        if teacher_clean is None and (self.variant == "C" or self.kd_clean_weight > 0):
            raise ValueError("teacher_clean is needed unless the loss is plain CE (variant A, kd_clean_weight 0)")
        if self.variant == "C":
            kd = kd_kl_loss(student_clean, teacher_clean, T)
            return {"loss": 0.75 * ce + 0.25 * kd, "ce": ce.detach(), "kd": kd.detach()}
        loss, terms = ce, {"ce": ce.detach()}
        if teacher_clean is not None:
            kd_clean = kd_kl_loss(student_clean, teacher_clean, T)
            loss = loss + self.kd_clean_weight * kd_clean
            terms["kd_clean"] = kd_clean.detach()
        if student_dad is not None:
            if teacher_dad is None:
                raise ValueError("variant A with DAD samples needs teacher_dad")
            kd_dad = kd_kl_loss(student_dad, teacher_dad, T)
            loss = loss + self.kd_adv_weight * kd_dad
            terms["kd_dad"] = kd_dad.detach()
        return {"loss": loss, **terms}
