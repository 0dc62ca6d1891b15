"""DINO loss: cross-entropy between teacher CLS targets and student CLS predictions across views."""

import torch

from dinov2.losses.student_softmax import StudentSoftmaxLoss


class DINOLoss(StudentSoftmaxLoss):
    """Multi-crop DINO cross-entropy on the CLS token.

    Every student crop is matched against every teacher (global) view, except a student global
    crop against the teacher's output for that *same* view. For one (student crop s, teacher view
    t) pair the term is the batch mean of ``-sum_k p_t[k] * log softmax(s / student_temp)[k]``; the
    loss is the mean of these terms over all pairs::

        n_pairs = n_global * (n_global - 1) + n_local * n_global

    Args:
        student_temp: temperature of the student softmax.

    Inputs (any float dtype; computed in float32):
        student_global: (n_global, B, K) student logits of the global crops, view-major.
        teacher_probs: (n_global, B, K) teacher target probabilities (e.g. from
            :class:`~dinov2.losses.centering.Centering`), same view order as ``student_global``.
        student_local: optional (n_local, B, K) student logits of the local crops.

    Returns a float32 scalar.
    """

    def forward(
        self,
        student_global: torch.Tensor,
        teacher_probs: torch.Tensor,
        student_local: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if student_global.ndim != 3 or student_global.shape != teacher_probs.shape:
            raise ValueError(
                "student_global and teacher_probs must both be (n_global, B, K), got "
                f"{tuple(student_global.shape)} and {tuple(teacher_probs.shape)}"
            )
        n_global, batch, _ = student_global.shape
        n_local = 0 if student_local is None else student_local.shape[0]
        if student_local is not None and student_local.shape[1:] != student_global.shape[1:]:
            raise ValueError(
                f"student_local must be (n_local, B, K) = (*, {batch}, {student_global.shape[2]}), "
                f"got {tuple(student_local.shape)}"
            )
        n_pairs = n_global * (n_global - 1) + n_local * n_global
        if n_pairs == 0:
            raise ValueError("no (student crop, other teacher view) pairs: need >= 2 global views or locals")

        targets = teacher_probs.float()
        target_sum = targets.sum(dim=0)  # (B, K): sum over teacher views
        # Global crop v is paired with every teacher view but its own: weight (sum_t p_t) - p_v.
        log_p_global = self.log_probs(student_global)
        total = ((target_sum.unsqueeze(0) - targets) * log_p_global).sum()
        if n_local > 0:
            # Each local crop is paired with all teacher views; summing the crops first is cheaper.
            log_p_local = self.log_probs(student_local)
            total = total + (target_sum * log_p_local.sum(dim=0)).sum()
        return -total / (n_pairs * batch)
