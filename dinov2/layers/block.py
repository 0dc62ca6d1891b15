"""Pre-norm transformer block over packed crop groups."""

from __future__ import annotations

from torch import Tensor, nn

from dinov2.layers.attention import Attention, AttentionDispatcher, AttentionMeta, Layout, Seqs, layout
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import build_ffn
from dinov2.layers.stochastic_depth import residual, subset_seqs


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))``, each with stochastic depth.

    ``x`` is the packed ``(T, D)`` token matrix of all crop groups; ``seqs`` gives ``(batch, tokens)``
    per group. Norms, QKV, projection and FFN run once on all tokens; attention runs per group.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
        drop_path_mode: str = "efficient",
        dispatcher: AttentionDispatcher | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, dispatcher)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = build_ffn(ffn_layer, dim, mlp_ratio, bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = drop_path
        self.drop_path_mode = drop_path_mode

    def attention_layout(self, seqs: Seqs) -> Layout:
        """The packed layout this block's attention sees for input layout ``seqs`` (a stochastic-depth
        subset when training with efficient drop path), so the backbone can prepare it once."""
        if self.training and self.drop_path > 0.0 and self.drop_path_mode == "efficient":
            return layout(subset_seqs(seqs, self.drop_path))
        return layout(seqs)

    def attn_branch(self, x: Tensor, seqs: Seqs, meta: AttentionMeta | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), seqs, meta))

    def ffn_branch(self, x: Tensor, seqs: Seqs) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, seqs: Seqs, meta: AttentionMeta | None = None) -> Tensor:
        """``meta``: the attention backend's per-layout metadata, prepared once per forward by the
        backbone (:func:`dinov2.layers.attention.prepare_attention`); None builds it here if needed.
        (Activation checkpointing wraps this from outside: ``dinov2.distributed.parallelize``.)"""

        def attn_branch(t: Tensor, s: Seqs) -> Tensor:
            return self.attn_branch(t, s, meta)

        x = residual(x, seqs, attn_branch, self.drop_path, self.drop_path_mode, self.training)
        return residual(x, seqs, self.ffn_branch, self.drop_path, self.drop_path_mode, self.training)
