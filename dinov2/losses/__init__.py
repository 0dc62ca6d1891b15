"""Self-supervised losses: target centering, DINO (CLS), iBOT (masked patches) and KoLeo."""

from dinov2.losses.centering import Centering
from dinov2.losses.dino import DINOLoss
from dinov2.losses.ibot import IBOTPatchLoss, masked_patch_weights
from dinov2.losses.koleo import KoLeoLoss

__all__ = ["Centering", "DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "masked_patch_weights"]
