"""Image descriptors for curation: what one embedding row is, beyond the CLS token.

:class:`DescriptorModel` wraps a backbone (``{"cls", "patch"}`` outputs, or a TorchScript descriptor
model through :class:`ScriptedDescriptor`) and returns ``{"cls": descriptor}``, so
:func:`dinov2.eval.features.extract_features` (batching, autocast, flip averaging) runs it unchanged.
The options that matter for copy detection (``embed.*``):

* ``pooling``: ``cls`` (the final-norm CLS token) or ``gem`` — generalized-mean pooling of the patch
  tokens, ``(mean_i max(x_i, 1e-6)^p)^(1/p)`` per channel (SSCD pools its CNN features this way with
  p = 3). GeM pools the positive part of each channel: ViT tokens are signed, so channels that are
  mostly negative contribute little — fine for a descriptor trained with it, worth measuring otherwise;
* ``patch_mean``: ``[pooled, mean patch token]`` (twice the width);
* ``scales``: multi-scale — the batch is resized by each factor (to a multiple of the patch size),
  each scale's descriptor L2-normalised, and their mean returned;
* flip averaging stays in ``extract_features`` (``embed.flip_average``).

PCA-whitening is fitted on the whole pool after embedding (``data_curation.whitening``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gem(tokens: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalized mean over the token axis: ``(B, N, D) -> (B, D)``, ``mean(clamp(x, eps)^p)^(1/p)``."""
    if p <= 0:
        raise ValueError(f"GeM exponent must be positive, got {p}")
    return tokens.float().clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


class ScriptedDescriptor(nn.Module):
    """A TorchScript descriptor model (``images -> (B, D)``) with the backbone output interface."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = self.scripted(images)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the TorchScript model must map (B, 3, H, W) images to (B, D) descriptors, got {shape}")
        return {"cls": out}


class DescriptorModel(nn.Module):
    """``images -> {"cls": descriptor}`` for a backbone, with the pooling and scales of the module docstring.

    ``patch_size``: the sizes of rescaled inputs are rounded to a multiple of it (1 for models that take
    any size). A backbone without patch tokens (a TorchScript descriptor) supports ``pooling="cls"`` and
    no ``patch_mean``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        pooling: str = "cls",
        gem_p: float = 3.0,
        scales: Sequence[float] = (1.0,),
        patch_mean: bool = False,
        patch_size: int = 1,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "gem"):
            raise ValueError(f"pooling must be cls or gem, got {pooling!r}")
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
        self.backbone = backbone
        self.pooling, self.gem_p, self.scales = pooling, gem_p, tuple(float(s) for s in scales)
        self.patch_mean, self.patch_size = patch_mean, max(1, int(patch_size))

    def _resized(self, images: Tensor, scale: float) -> Tensor:
        if scale == 1.0:
            return images
        size = [
            max(self.patch_size, round(side * scale / self.patch_size) * self.patch_size) for side in images.shape[-2:]
        ]
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=scale < 1)

    def _single_scale(self, images: Tensor) -> Tensor:
        out = self.backbone(images)
        if self.pooling == "gem" or self.patch_mean:
            if "patch" not in out:
                raise ValueError(
                    "embed.pooling=gem and embed.patch_mean need patch tokens; this model gives one descriptor"
                )
        feature = gem(out["patch"], self.gem_p) if self.pooling == "gem" else out["cls"].float()
        if self.patch_mean:
            feature = torch.cat([feature, out["patch"].float().mean(dim=1)], dim=-1)
        return feature

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if len(self.scales) == 1:
            return {"cls": self._single_scale(self._resized(images, self.scales[0]))}
        per_scale = [F.normalize(self._single_scale(self._resized(images, s)), dim=-1) for s in self.scales]
        return {"cls": torch.stack(per_scale).mean(dim=0)}
