"""What the DINO and iBOT losses share: the student's log-probabilities at the student temperature,
computed in float32, against the teacher's target probabilities."""

import torch
import torch.nn.functional as F
from torch import nn


class StudentSoftmaxLoss(nn.Module):
    """Base of a cross-entropy ``-sum_k p_teacher[k] * log softmax(s / student_temp)[k]``.

    Args:
        student_temp: temperature of the student softmax (0.1 in the reference).
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log softmax(logits / student_temp)`` over the last dimension, in float32."""
        return F.log_softmax(logits.float() / self.student_temp, dim=-1)
