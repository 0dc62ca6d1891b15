"""LayerScale: a learned per-channel gain on a residual branch (CaiT), initialised small."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinov2.layers.init import EAGER, Init


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        self.init_weights(EAGER)

    def init_weights(self, init: Init) -> None:
        init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma
