"""Copy-detection loss: InfoNCE between two copy-augmented views of each image, plus KoLeo spread.

The SSCD objective (Pizzi et al., "A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022;
``sscd/train.py`` of facebookresearch/sscd-copy-detection): descriptors ``z`` (L2-normalised) of ``B``
images, two views each, ``2B`` rows. For row ``i`` with positive ``p(i)`` (the other view of its image)
and negatives ``N(i)`` (the ``2B - 2`` rows of other images; the row itself is neither)::

    infonce_i = -log( exp(z_i·z_p / τ) / (exp(z_i·z_p / τ) + Σ_{n ∈ N(i)} exp(z_i·z_n / τ)) )

averaged over the ``2B`` rows; SSCD uses τ = 0.05. A differential-entropy (KoLeo) term,
``-mean log(distance to the nearest other image)``, weighted 30 in SSCD, spreads the descriptors over
the sphere so that unrelated images end up far apart — what makes one global threshold work. Here it is
:class:`~dinov2.losses.koleo.KoLeoLoss` on each view separately (within a view every other row is
another image, so the nearest neighbour is a non-copy), as DINOv2 applies it per global view.

Negatives are this rank's batch: with several ranks each solves its own InfoNCE problem of ``B`` images
(the gradients are averaged by FSDP), which keeps the loss exact to test and free of collectives.
Computed in float32 with autocast disabled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2.losses.koleo import KoLeoLoss


def info_nce(views: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE of ``views`` ``(2, B, D)`` (L2-normalised rows): each row against the other view of
    its image (the positive) and the rows of the other images (the negatives), see the module docstring."""
    if views.ndim != 3 or views.shape[0] != 2 or views.shape[1] < 2:
        raise ValueError(f"info_nce expects (2, B, D) with B >= 2, got {tuple(views.shape)}")
    b = views.shape[1]
    z = views.reshape(2 * b, -1)
    logits = (z @ z.T) / temperature
    rows = torch.arange(2 * b, device=z.device)
    positive = (rows + b) % (2 * b)
    # the row itself takes no part: it is not a negative and the positive is never compared to it
    logits = logits.masked_fill(rows[:, None] == rows[None, :], float("-inf"))
    return F.cross_entropy(logits, positive)


class CopyDetectionLoss(nn.Module):
    """``InfoNCE + entropy_weight · KoLeo`` of two views' descriptors; returns ``(loss, parts)``.

    ``parts`` (detached, for logging): ``infonce``, ``koleo``, ``positive_sim`` (mean cosine of the copy
    pairs) and ``nearest_negative_sim`` (mean cosine of each row to its most similar other image).

    Args:
        temperature: InfoNCE temperature τ.
        entropy_weight: weight of the KoLeo term (0 disables it).
    """

    def __init__(self, temperature: float = 0.05, entropy_weight: float = 30.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.entropy_weight = entropy_weight
        self.koleo = KoLeoLoss()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, entropy_weight={self.entropy_weight}"

    def forward(self, view0: Tensor, view1: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``view0``, ``view1``: ``(B, D)`` descriptors, row ``b`` of both from image ``b`` (any scale)."""
        with torch.autocast(device_type=view0.device.type, enabled=False):
            views = F.normalize(torch.stack([view0.float(), view1.float()]), dim=-1)
            infonce = info_nce(views, self.temperature)
            koleo = self.koleo(views[0]) + self.koleo(views[1])
            loss = infonce + self.entropy_weight * koleo if self.entropy_weight else infonce
            with torch.no_grad():
                b = views.shape[1]
                z = views.reshape(2 * b, -1)
                sim = z @ z.T
                image = torch.arange(2 * b, device=z.device) % b
                nearest_negative = sim.masked_fill(image[:, None] == image[None, :], -2.0).amax(dim=1)
                parts = {
                    "infonce": infonce.detach(),
                    "koleo": koleo.detach(),
                    "positive_sim": (views[0] * views[1]).sum(-1).mean(),
                    "nearest_negative_sim": nearest_negative.mean(),
                }
        return loss, parts
