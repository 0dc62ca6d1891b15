"""Building blocks of the ViT family (imports torch only)."""

from dinov2.layers.attention import BACKENDS, Attention, AttentionDispatcher
from dinov2.layers.block import Block
from dinov2.layers.dino_head import DINOHead
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp, SwiGLUFFN, build_ffn, swiglu_hidden_dim
from dinov2.layers.patch_embed import PatchEmbed
from dinov2.layers.stochastic_depth import residual

__all__ = [
    "BACKENDS",
    "Attention",
    "AttentionDispatcher",
    "Block",
    "DINOHead",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "build_ffn",
    "residual",
    "swiglu_hidden_dim",
]
