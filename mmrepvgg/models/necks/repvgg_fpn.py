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
    """Feature pyramid with RepVGG blocks as its 3x3 convs.

    As mmdet's ``FPN`` (1x1 laterals, nearest top-down fusion), but every
    output conv and every extra level (stride 2, on the last output) is built
    from ``block_cfg``, by default a :class:`RepVGGBlock`, so that the whole
    neck fuses into plain 3x3 convs with the rest of the detector.

    Args:
        in_channels (Sequence[int]): channels of each input level.
        out_channels (int): channels of every output level.
        num_outs (int): number of outputs (>= number of inputs; the extra
            ones are stride-2 blocks on the last output).
        block_cfg (dict): config of the 3x3 blocks; ``in_channels``,
            ``out_channels`` and ``stride`` are filled in. Add
            ``deploy=True`` for the fused form.
        upsample_cfg (dict): ``F.interpolate`` options for the top-down path.
        init_cfg (dict, optional): initialization config.
    """

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
        cfg.setdefault('_scope_', 'mmdet')  # any default scope (see RepVGG)
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
