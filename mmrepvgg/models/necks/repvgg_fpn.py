"""FPN whose output and extra-level convs are RepVGG blocks."""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmengine.model import BaseModule


@MODELS.register_module()
class RepVGGFPN(BaseModule):
    """mmdet's ``FPN`` (1x1 laterals, nearest top-down fusion) whose output
    convs and extra levels (``num_outs`` beyond the inputs: stride 2, on the
    last output) are blocks of ``block_cfg``, so that the whole neck fuses
    into plain 3x3 convs; ``upsample_cfg``: ``F.interpolate`` options."""

    def __init__(self,
                 in_channels: Sequence[int],
                 out_channels: int,
                 num_outs: int,
                 block_cfg: dict = dict(type='RepVGGBlock'),
                 upsample_cfg: dict = dict(mode='nearest'),
                 init_cfg: Optional[dict] = dict(
                     type='Xavier', layer='Conv2d', distribution='uniform')
                 ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels = list(in_channels)
        if num_outs < len(self.in_channels):
            raise ValueError(f'num_outs ({num_outs}) must be >= the number '
                             f'of inputs ({len(self.in_channels)})')
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.upsample_cfg = dict(upsample_cfg)
        self.lateral_convs = nn.ModuleList(
            ConvModule(c, out_channels, 1, act_cfg=None)
            for c in self.in_channels)
        self.fpn_convs = nn.ModuleList(
            self._block(block_cfg, out_channels, 1)
            for _ in self.in_channels)
        self.extra_convs = nn.ModuleList(
            self._block(block_cfg, out_channels, 2)
            for _ in range(num_outs - len(self.in_channels)))

    @staticmethod
    def _block(block_cfg: dict, channels: int, stride: int) -> nn.Module:
        cfg = copy.deepcopy(dict(block_cfg))
        cfg.update(in_channels=channels, out_channels=channels, stride=stride)
        cfg.setdefault('_scope_', 'mmdet')  # any default scope
        return MODELS.build(cfg)

    def forward(self, inputs: Tuple[torch.Tensor, ...]) -> tuple:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f'RepVGGFPN expects {len(self.in_channels)} '
                             f'inputs, got {len(inputs)}')
        laterals: List[torch.Tensor] = [
            conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:],
                **self.upsample_cfg)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        for conv in self.extra_convs:
            outs.append(conv(outs[-1]))
        return tuple(outs)
