"""RepVGG backbone family (A0 ... B3, g2/g4 groupwise, D2se) for mmdet."""
import copy
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from ..layers import QARepVGGBlock, RepVGGBlock  # noqa: F401 (registered)
from ..layers.fusion import is_fusable_norm
from ..layers.repvgg_block import is_reparam_block

_A_BLOCKS = (2, 4, 14, 1)
_B_BLOCKS = (4, 6, 16, 1)
#: Global block indices (stem = 0) that are groupwise in the g2/g4 variants.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))
_G2 = {i: 2 for i in GROUPWISE_LAYERS}
_G4 = {i: 4 for i in GROUPWISE_LAYERS}


def _arch(blocks, widths, groups=None, se_cfg=None) -> dict:
    return dict(num_blocks=blocks, width_factor=widths,
                group_layer_map=groups, se_cfg=se_cfg)


#: Architectures published by the RepVGG authors.
ARCH_SETTINGS: Dict[str, dict] = {
    'A0': _arch(_A_BLOCKS, (0.75, 0.75, 0.75, 2.5)),
    'A1': _arch(_A_BLOCKS, (1, 1, 1, 2.5)),
    'A2': _arch(_A_BLOCKS, (1.5, 1.5, 1.5, 2.75)),
    'B0': _arch(_B_BLOCKS, (1, 1, 1, 2.5)),
    'B1': _arch(_B_BLOCKS, (2, 2, 2, 4)),
    'B1g2': _arch(_B_BLOCKS, (2, 2, 2, 4), _G2),
    'B1g4': _arch(_B_BLOCKS, (2, 2, 2, 4), _G4),
    'B2': _arch(_B_BLOCKS, (2.5, 2.5, 2.5, 5)),
    'B2g2': _arch(_B_BLOCKS, (2.5, 2.5, 2.5, 5), _G2),
    'B2g4': _arch(_B_BLOCKS, (2.5, 2.5, 2.5, 5), _G4),
    'B3': _arch(_B_BLOCKS, (3, 3, 3, 5)),
    'B3g2': _arch(_B_BLOCKS, (3, 3, 3, 5), _G2),
    'B3g4': _arch(_B_BLOCKS, (3, 3, 3, 5), _G4),
    'D2se': _arch((8, 14, 24, 1), (2.5, 2.5, 2.5, 5),
                  se_cfg=dict(ratio=16)),
}


def resolve_arch(arch: Union[str, dict]) -> dict:
    """The checked, complete arch dict of a name or a dict."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'arch {arch!r} is unknown; choose one of '
                             f'{sorted(ARCH_SETTINGS)} or pass a dict')
        return copy.deepcopy(ARCH_SETTINGS[arch])
    if not isinstance(arch, dict):
        raise ValueError('arch must be a str or dict, got '
                         f'{type(arch).__name__}')
    required = {'num_blocks', 'width_factor'}
    missing = required - set(arch)
    if missing:
        raise ValueError(f'arch dict is missing keys {sorted(missing)}')
    unknown = set(arch) - required - {'group_layer_map', 'se_cfg'}
    if unknown:
        raise ValueError(f'arch dict has unknown keys {sorted(unknown)}')
    if len(arch['num_blocks']) != len(arch['width_factor']):
        raise ValueError('arch num_blocks and width_factor must have the '
                         'same length')
    out = dict(group_layer_map=None, se_cfg=None)
    out.update(copy.deepcopy(arch))
    return out


#: Block arguments the backbone sets itself (per block, from the arch).
_BLOCK_SET_BY_BACKBONE = ('in_channels', 'out_channels', 'stride', 'padding',
                          'dilation', 'groups', 'without_branch_norm',
                          'se_cfg')
#: Block arguments accepted in ``block_cfg`` only with the backbone's value
#: (a deploy twin sets ``deploy=True`` in every module config).
_BLOCK_MIRRORS = ('deploy', 'with_cp', 'norm_cfg', 'act_cfg')


def resolve_block_cfg(block_cfg: Optional[dict], **backbone: Any) -> dict:
    """A checked copy of the backbone's ``block_cfg``, with a type.

    ``ValueError`` if it is not a dict naming a registered block, sets what
    the backbone derives from the arch, or contradicts a backbone option
    (``backbone``: the backbone's values of :data:`_BLOCK_MIRRORS`).
    """
    cfg = dict(type='RepVGGBlock') if block_cfg is None else block_cfg
    if not isinstance(cfg, dict):
        raise ValueError(f'block_cfg must be a dict or None, got {cfg!r}')
    cfg = copy.deepcopy(dict(cfg))
    cfg.setdefault('type', 'RepVGGBlock')
    block_type = cfg['type']
    cls = MODELS.get(block_type) if isinstance(block_type, str) \
        else block_type
    if cls is None or not isinstance(cls, type) or not issubclass(
            cls, nn.Module):
        raise ValueError(f'block_cfg type {block_type!r} is not a block '
                         'registered in mmdet\'s MODELS (RepVGGBlock, '
                         'QARepVGGBlock, ...)')
    derived = sorted(set(cfg) & set(_BLOCK_SET_BY_BACKBONE))
    if derived:
        raise ValueError(f'block_cfg must not set {derived}: the RepVGG '
                         'backbone sets them for every block from its arch')
    for key in _BLOCK_MIRRORS:
        if key in cfg and cfg.pop(key) != backbone[key]:
            raise ValueError(
                f'block_cfg {key}={block_cfg[key]!r} contradicts the '
                f'backbone\'s {key}={backbone[key]!r}; set {key} on the '
                'backbone')
    return cfg


@MODELS.register_module()
class RepVGG(BaseModule):
    """RepVGG backbone: a stride-2 stem block, then four stages of
    re-parameterizable 3x3 blocks (the first with the stage's stride), of
    widths ``[64 a, 128 a, 256 a, 512 b]`` (stem ``min(64, int(64 a))``).

    Args:
        arch (str | dict): a name of :data:`ARCH_SETTINGS`, or a dict with
            ``num_blocks``, ``width_factor`` and optional
            ``group_layer_map`` (global block index -> groups, stem = 0) and
            ``se_cfg``.
        dilations (Sequence[int]): dilation (and padding) of each stage.
        frozen_stages (int): -1 freezes nothing, 0 the stem, ``n`` the stem
            and stages 1..n.
        norm_cfg (dict): eps 1e-5, as the published ImageNet weights.
        block_cfg (dict, optional): ``dict(type='QARepVGGBlock')`` or the
            default RepVGGBlock, with options for every block (``use_alpha``,
            ``padding_mode``, ``post_norm_init``); the rest comes from the
            backbone.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'A0',
                 in_channels: int = 3,
                 base_channels: int = 64,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 strides: Sequence[int] = (2, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 act_cfg: dict = dict(type='ReLU'),
                 with_cp: bool = False,
                 deploy: bool = False,
                 init_cfg: Optional[Union[dict, list]] = None,
                 *,
                 block_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.arch = resolve_arch(arch)
        self.block_cfg = resolve_block_cfg(
            block_cfg, deploy=deploy, with_cp=with_cp, norm_cfg=norm_cfg,
            act_cfg=act_cfg)
        num_stages = len(self.arch['num_blocks'])
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(
                f'strides and dilations need {num_stages} entries (one per '
                f'stage), got strides={tuple(strides)}, '
                f'dilations={tuple(dilations)}')
        out_indices = tuple(out_indices)
        if not out_indices or any(
                not isinstance(i, int) or not 0 <= i < num_stages
                for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of '
                             f'0..{num_stages - 1}, got {out_indices}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be in -1..{num_stages}, '
                             f'got {frozen_stages}')
        self.out_indices = out_indices
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.deploy = deploy

        group_map = self.arch['group_layer_map'] or {}
        block_kwargs = dict(
            norm_cfg=norm_cfg, act_cfg=act_cfg, without_branch_norm=False,
            se_cfg=self.arch['se_cfg'], deploy=deploy, with_cp=with_cp)
        widths = self.arch['width_factor']
        self.stem_channels = min(base_channels, int(base_channels * widths[0]))
        self.stem = self._make_block(in_channels, self.stem_channels,
                                     stride=2, **block_kwargs)
        self.stage_names = []
        self.out_channels = []
        channels, layer_idx = self.stem_channels, 1
        for i, (n, w) in enumerate(zip(self.arch['num_blocks'], widths)):
            out_ch = int(base_channels * 2**i * w)
            dil = self.dilations[i]
            blocks = []
            for j in range(n):
                blocks.append(
                    self._make_block(
                        channels, out_ch,
                        stride=self.strides[i] if j == 0 else 1,
                        padding=dil, dilation=dil,
                        groups=group_map.get(layer_idx, 1), **block_kwargs))
                channels = out_ch
                layer_idx += 1
            name = f'stage_{i + 1}'
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.out_channels.append(out_ch)
        self._freeze_stages()

    def _make_block(self, in_channels: int, out_channels: int,
                    **kwargs: Any) -> nn.Module:
        cfg = copy.deepcopy(self.block_cfg)
        cfg.update(kwargs, in_channels=in_channels, out_channels=out_channels)
        # mmdet's registry whatever the default scope (under 'mmengine' the
        # root registry would miss the block).
        cfg.setdefault('_scope_', 'mmdet')
        return MODELS.build(cfg)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x = self.stem(x)
        outs = []
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _freeze_stages(self) -> None:
        units = [self.stem] + [getattr(self, n) for n in self.stage_names]
        for unit in units[:self.frozen_stages + 1]:
            unit.eval()
            for p in unit.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'RepVGG':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                # A batch norm without running statistics normalizes by
                # the batch in both modes: only these have a mode to fix.
                if is_fusable_norm(m):
                    m.eval()
        return self

    def switch_to_deploy(self, test_cfg: Optional[dict] = None) -> None:
        """Fuse every block into a single 3x3 conv (idempotent)."""
        for m in self.modules():
            if m is not self and is_reparam_block(m):
                m.switch_to_deploy(test_cfg)
        self.deploy = True
        self._freeze_stages()
