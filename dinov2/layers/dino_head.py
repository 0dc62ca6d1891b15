"""DINO projection head: MLP → L2-normalised bottleneck → weight-normalised prototypes."""

from __future__ import annotations

from typing import get_args

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from dinov2.config import HeadMlpInit
from dinov2.layers.init import EAGER, Init


class DINOHead(nn.Module):
    """``in_dim → hidden → … → bottleneck`` (GELU between, no BatchNorm), L2 normalisation, then a
    bias-free linear layer onto ``out_dim`` prototypes whose weight is ``g · v / ‖v‖`` per prototype
    (torch's parametrization API; ``g`` starts at 1). ``last_layer`` is what the trainer freezes during
    the first iterations."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_init: HeadMlpInit = "trunc_normal",
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError("DINOHead needs nlayers >= 1")
        if mlp_init not in get_args(HeadMlpInit):
            raise ValueError(f"unknown head mlp_init '{mlp_init}' (expected {' or '.join(get_args(HeadMlpInit))})")
        self.mlp_init = mlp_init
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_weights(EAGER)

    def init_weights(self, init: Init) -> None:
        """The head's distributions through ``init`` (eager or keyed, ``dinov2.layers.init``).

        ``trunc_normal`` (the reference, dinov2 ``layers/dino_head.py``): MLP weights truncated normal
        with std 0.02 (cut at ±2, absolute), zero biases; the prototypes' direction ``v`` as
        ``nn.Linear``'s default, uniform in ``±1/sqrt(fan_in)`` (the reference applies its init before
        creating ``last_layer``) and ``g = 1``. ``fan_in``: MLP std ``1/sqrt(fan_in)`` (cut at 2 std) and
        ``v`` truncated normal 0.02; about the reference at ViT-L/g widths, but it keeps the features'
        spread through the head of narrow backbones, where 0.02 squeezes every sample onto nearly one
        bottleneck direction (GELU's even part dominates tiny pre-activations): the CPU recipes (demo,
        cifar10) use it."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                if self.mlp_init == "trunc_normal":
                    init.trunc_normal_(m.weight, std=0.02)
                else:
                    std = m.in_features**-0.5
                    init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                init.zeros_(m.bias)
        weight = self.last_layer.parametrizations.weight
        direction = weight.original1
        if self.mlp_init == "trunc_normal":
            bound = direction.shape[1] ** -0.5  # kaiming_uniform_(a=sqrt(5)), nn.Linear.reset_parameters
            init.uniform_(direction, -bound, bound)
        else:
            init.trunc_normal_(direction, std=0.02)
        init.ones_(weight.original0)  # norm g

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6)
        return self.last_layer(x)
