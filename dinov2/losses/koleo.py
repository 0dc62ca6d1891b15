"""KoLeo regularizer: Kozachenko-Leonenko differential-entropy estimate on L2-normalized features."""

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(d_i + eps)``, d_i the distance from sample i to its nearest other sample.

    Features are L2-normalized first; the nearest neighbour is the other sample with the largest
    dot product. Pushing nearest-neighbour distances up spreads the batch over the sphere.
    Always computed in float32 with autocast disabled; the result is a float32 scalar. The loss is
    finite (and has finite gradients) even when two rows are identical, thanks to ``eps``.

    Args:
        eps: added to the norm in normalization, inside the distance (as in
            ``torch.nn.functional.pairwise_distance``) and inside the log.

    Input: (B, D) features of one view on this rank, B >= 2 (the trainer calls it per global view).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeoLoss expects (B, D) features with B >= 2, got {tuple(features.shape)}")
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.float(), p=2.0, dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = x @ x.T
                self_pairs = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
                # Cosine similarity is >= -1, so -2 rules a sample out as its own neighbour.
                nearest = similarity.masked_fill_(self_pairs, -2.0).argmax(dim=1)
            distance = F.pairwise_distance(x, x[nearest], p=2.0, eps=self.eps)
            return -torch.log(distance + self.eps).mean()
