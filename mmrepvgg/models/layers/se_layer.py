"""Squeeze-and-excitation used by RepVGG-D2se blocks."""
from typing import Optional, Sequence

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer
from mmengine.model import BaseModule


class SELayer(BaseModule):
    """Squeeze-and-excitation, ``x * gate(mean_hw(x))``, hidden width
    ``max(1, channels // ratio)``, ``act_cfg`` after the squeeze and the
    excitation; adaptive pooling works at any input size."""

    __jit_unused_properties__ = ['is_init']

    def __init__(self,
                 channels: int,
                 ratio: int = 16,
                 act_cfg: Sequence[dict] = (dict(type='ReLU'),
                                            dict(type='Sigmoid')),
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(ratio, int) or ratio < 1:
            raise ValueError(
                f'se_cfg ratio must be a positive int, got {ratio!r}')
        if len(act_cfg) != 2:
            raise ValueError('se_cfg act_cfg must hold two activation configs')
        hidden = max(1, channels // ratio)
        # Plain convs (with bias) keep the layer scriptable and exportable.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(channels, hidden, 1, bias=True)
        self.squeeze_act = build_activation_layer(act_cfg[0])
        self.excite = nn.Conv2d(hidden, channels, 1, bias=True)
        self.excite_act = build_activation_layer(act_cfg[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.squeeze_act(self.squeeze(self.pool(x)))
        return x * self.excite_act(self.excite(gate))
