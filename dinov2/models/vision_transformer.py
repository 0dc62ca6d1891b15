"""The ViT family (S/B/L/g) with one packed forward over crop groups of different sizes.

``model([globals, locals], masks=[m, None])`` embeds each crop group (its own position-embedding
interpolation, iBOT mask tokens, CLS and register tokens), packs every token of every group into one
``(T, D)`` matrix, runs the blocks (big GEMMs on all tokens, attention per group) and returns, per
group, the final-norm CLS token, register tokens and patch tokens. A single tensor in gives a single
dict out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dinov2.config import ARCHS, ModelConfig
from dinov2.layers import AttentionDispatcher, Block, LayerScale, PatchEmbed
from dinov2.layers.attention import prepare_attention
from dinov2.layers.init import EAGER, Init
from dinov2.models.pos_embed import interpolate_pos_embed


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        drop_path_mode: str = "efficient",
        num_register_tokens: int = 0,
        attn_backend: str = "auto",
        pos_embed_interpolation: str = "ours",
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.pos_embed_interpolation = pos_embed_interpolation  # see dinov2.models.pos_embed
        self.base_grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.base_grid**2, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.dispatcher = AttentionDispatcher(attn_backend)
        rates = (
            [drop_path_rate] * depth
            if drop_path_uniform
            else [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        )
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                ffn_layer,
                qkv_bias,
                proj_bias,
                ffn_bias,
                layerscale_init,
                rates[i],
                drop_path_mode,
                self.dispatcher,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        self.init_weights(EAGER)

    def init_weights(self, init: Init) -> None:
        """Every parameter of the backbone (``dinov2.layers.init``): position embedding trunc-normal 0.02,
        CLS/register tokens normal 1e-6, mask token 0, linear weights trunc-normal 0.02 and biases 0,
        LayerNorm 1/0, LayerScale its init value, patch embedding torch's Conv2d default
        (uniform ±1/√fan_in for weight and bias)."""
        init.trunc_normal_(self.pos_embed, std=0.02)
        init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            init.normal_(self.register_tokens, std=1e-6)
        init.zeros_(self.mask_token)
        conv = self.patch_embed.proj
        bound = (conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]) ** -0.5
        init.uniform_(conv.weight, -bound, bound)
        if conv.bias is not None:
            init.uniform_(conv.bias, -bound, bound)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                init.ones_(m.weight)
                init.zeros_(m.bias)
            elif isinstance(m, LayerScale):
                m.init_weights(init)

    # ---------------------------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embedding for an ``h × w`` patch grid, ``(1, 1+h*w, D)``, resampled as
        ``self.pos_embed_interpolation`` says (``dinov2.models.pos_embed``)."""
        return interpolate_pos_embed(self.pos_embed, h, w, self.pos_embed_interpolation)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images ``(B, C, H, W)`` → tokens ``(B, 1 + R + N, D)``: [CLS, registers, patches].

        Patches where ``masks`` (``(B, N)`` bool) is True are replaced by the mask token before the
        position embedding is added (iBOT)."""
        b = x.shape[0]
        h, w = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens

    # --------------------------------------------------------------------------------- forward
    def forward_packed(
        self, crops: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None, upto: int | None = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Packed tokens ``(T, D)`` after the first ``upto`` blocks (all by default), before the norm."""
        masks = list(masks) if masks is not None else [None] * len(crops)
        if len(masks) != len(crops):
            raise ValueError(f"got {len(crops)} crop groups but {len(masks)} masks")
        groups = [self.prepare_tokens(x, m) for x, m in zip(crops, masks, strict=True)]
        seqs = [(t.shape[0], t.shape[1]) for t in groups]
        x = torch.cat([t.reshape(-1, self.embed_dim) for t in groups])
        # the residual stream is fp32 (or wider) in training and evaluation alike, whatever autocast does
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        blocks = self.blocks[:upto]
        meta = self.prepare_attention(blocks, seqs, x.device)
        for blk in blocks:
            x = blk(x, seqs, meta)
        return x, seqs

    def resolve_attention(self, device: torch.device) -> str:
        """Select the attention backend on ``device`` (probing it once; see ``dinov2.layers.attention``).
        Runs before the blocks of every forward, so compiled blocks only read the result."""
        return self.dispatcher.resolve(device)[0]

    def prepare_attention(self, blocks: Sequence[Block], seqs: list[tuple[int, int]], device: torch.device):
        """The backend's per-layout metadata for one forward (a flex ``BlockMask``, varlen ``cu_seqlens``),
        built once for all ``blocks``; None for backends that need none (sdpa)."""
        _, backend = self.dispatcher.resolve(device)
        return prepare_attention(backend, [blk.attention_layout(seqs) for blk in blocks], device)

    def unpack(self, x: Tensor, seqs: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
        r = 1 + self.num_register_tokens
        out = []
        for chunk, (b, n) in zip(x.split([b * n for b, n in seqs]), seqs, strict=True):
            t = chunk.reshape(b, n, -1)
            out.append({"cls": t[:, 0], "registers": t[:, 1:r], "patch": t[:, r:]})
        return out

    def forward_features(
        self, crops: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None
    ) -> list[dict[str, Tensor]]:
        x, seqs = self.forward_packed(crops, masks)
        return self.unpack(self.norm(x), seqs)

    def forward(self, x: Tensor | Sequence[Tensor], masks: Any = None) -> Any:
        if isinstance(x, Tensor):
            return self.forward_features([x], [masks])[0]
        return self.forward_features(x, masks)

    def last_self_attention(self, x: Tensor) -> Tensor:
        """Attention probabilities of the last block, ``(B, H, N, N)``, computed explicitly."""
        tokens, seqs = self.forward_packed([x], upto=len(self.blocks) - 1)
        last = self.blocks[-1]
        return last.attn.attention_weights(last.norm1(tokens), seqs)[0]

    def num_layers(self) -> int:
        return len(self.blocks)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> DinoVisionTransformer:
        """The backbone a ``ModelConfig`` describes, its arch's defaults filled in (``ModelConfig.resolved``)."""
        resolved = cfg.resolved()
        kwargs = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(resolved) if f.name != "arch"}
        kwargs["pos_embed_interpolation"] = str(resolved.pos_embed_interpolation or "ours")
        return cls(**kwargs)


def create_vit(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """Build ``vit_tiny`` / ``vit_small`` / ``vit_base`` / ``vit_large`` / ``vit_giant2``; keyword
    arguments override the arch's width, depth, heads or FFN kind and set everything else."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")
    return DinoVisionTransformer(**ARCHS[arch].fill(kwargs))


def vit_small(**kwargs: Any) -> DinoVisionTransformer:
    return create_vit("vit_small", **kwargs)


def vit_base(**kwargs: Any) -> DinoVisionTransformer:
    return create_vit("vit_base", **kwargs)


def vit_large(**kwargs: Any) -> DinoVisionTransformer:
    return create_vit("vit_large", **kwargs)


def vit_giant2(**kwargs: Any) -> DinoVisionTransformer:
    return create_vit("vit_giant2", **kwargs)


def build_backbone(cfg: ModelConfig) -> DinoVisionTransformer:
    """Backbone from a ``ModelConfig`` (see ``dinov2.config``): :meth:`DinoVisionTransformer.from_config`."""
    return DinoVisionTransformer.from_config(cfg)
