"""iBOT loss: cross-entropy between teacher and student on masked patch tokens, weighted per image."""

import torch
import torch.nn.functional as F
from torch import nn


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-masked-patch weights ``1 / (number of masked patches in the same image)``.

    Args:
        masks: boolean (B, N) (or (B, H, W)) mask, True where a patch is masked.

    Returns a float32 vector with one entry per True element of ``masks``, in the order of
    ``masks[masks]`` (row-major: image by image, patch by patch). Each image's weights sum to 1.
    """
    flat = masks.reshape(masks.shape[0], -1).bool()
    per_image_count = flat.sum(dim=1)
    per_image_weight = 1.0 / per_image_count.clamp_min(1).to(torch.float32)
    return torch.repeat_interleave(per_image_weight, per_image_count)


class IBOTPatchLoss(nn.Module):
    """Masked-patch cross-entropy with per-image weighting.

    ``loss = -sum_m w_m * sum_k p_m[k] * log softmax(s_m / student_temp)[k] / n_images``

    With ``w = masked_patch_weights(masks)`` each masked image's patches weigh 1 in total (the mean
    over its masked patches). The reference (dinov2 and dinov3 ``loss/ibot_patch_loss.py``
    ``forward_masked``: ``-loss.sum() / student_masks_flat.shape[0]``) divides by the number of *all*
    global crops, masked or not; the meta-architecture passes that count (``2B``), so an unmasked
    crop counts as a zero and the loss is about half the mean over masked images at mask probability
    0.5.

    Args:
        student_temp: temperature of the student softmax.

    Inputs (computed in float32):
        student_logits: (M', K) student logits of the masked patches, M' >= M.
        teacher_probs: (M', K) teacher target probabilities for the same patches.
        weights: (M,) per-patch weights. Rows at index >= M of the logits/targets are padding
            and are ignored entirely (so padded, fixed-size batches of masked patches work).
        n_images: normalizer (int or scalar tensor), the number of global crops; clamped to >= 1.

    Returns a float32 scalar.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_probs: torch.Tensor,
        weights: torch.Tensor,
        n_images: int | torch.Tensor,
    ) -> torch.Tensor:
        if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
            raise ValueError(
                "student_logits and teacher_probs must both be (M, K), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        n_real = weights.shape[0]
        if weights.ndim != 1 or n_real > student_logits.shape[0]:
            max_rows = student_logits.shape[0]
            raise ValueError(f"weights must be 1-D with at most {max_rows} entries, got {tuple(weights.shape)}")
        log_p = F.log_softmax(student_logits[:n_real].float() / self.student_temp, dim=-1)
        cross_entropy = -(teacher_probs[:n_real].float() * log_p).sum(dim=-1)  # (M,)
        total = (cross_entropy * weights.float()).sum()
        if isinstance(n_images, torch.Tensor):
            return total / n_images.float().clamp_min(1.0)
        return total / max(int(n_images), 1)
