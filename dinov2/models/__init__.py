"""Model families."""

from dinov2.models.vision_transformer import (
    ARCHS,
    DinoVisionTransformer,
    build_backbone,
    create_vit,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)

__all__ = [
    "ARCHS",
    "DinoVisionTransformer",
    "build_backbone",
    "create_vit",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
