"""Knowledge-distillation loss on softened class predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student's tempered predictions against the teacher's.

    Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners"
    (SimCLRv2), eq. 2, after Hinton et al. 2015: on unlabelled images,
    ``L = -sum_y p_T(y | x; tau) log p_S(y | x; tau)`` with ``p(y | x; tau) = softmax(logits / tau)``,
    averaged over the batch. The teacher is a fixed target: its logits are detached, so only the
    student receives gradients. No ``tau**2`` factor is applied (SimCLRv2 writes none).

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``, same shape; treated as a constant.
        temperature: ``tau > 0``; larger values soften both distributions.

    Returns:
        Scalar tensor, the mean over the B samples (>= the teacher's entropy at ``tau``).

    Raises:
        ValueError: If the shapes differ or are not 2-D, or ``temperature <= 0``.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError("distillation_loss: student and teacher logits must both be [B, C] with the same "
                         f"shape; got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    p_teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return -(p_teacher * log_p_student).sum(dim=1).mean()
