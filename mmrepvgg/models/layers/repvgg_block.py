"""RepVGGBlock, a multi-branch block that fuses into one 3x3 conv, and
:class:`RepBlockBase`, what it shares with ``QARepVGGBlock``."""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from .fusion import (fuse_conv_norm, fuse_identity_norm, is_fusable_norm,
                     pad_kernel_to)
from .se_layer import SELayer

PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value,
                                                 int) or value < minimum:
        raise ValueError(
            f'{name} must be an int >= {minimum}, got {value!r}')


def check_norm_cfg(norm_cfg: dict, channels: int) -> None:
    """``ValueError`` unless ``norm_cfg`` builds a fusable batch norm."""
    if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
        raise ValueError(
            f'norm_cfg must be a dict with a "type" key, got {norm_cfg!r}')
    try:
        norm = build_norm_layer(norm_cfg, channels)[1]
    except KeyError as e:
        raise ValueError(
            f'norm_cfg type {norm_cfg["type"]!r} is not a registered norm '
            f'layer: {e}') from None
    if not is_fusable_norm(norm):
        raise ValueError(
            f'norm_cfg type {norm_cfg["type"]!r} ({type(norm).__name__}) '
            'cannot be fused into a conv: use a batch norm with running '
            'statistics (BN, SyncBN or MMSyncBN)')


def is_reparam_block(module: nn.Module) -> bool:
    """Whether ``module`` is a re-parameterizable block (it has
    ``switch_to_deploy``, ``get_equivalent_kernel_bias`` and a boolean
    ``deploy``), not a container that forwards ``switch_to_deploy``."""
    return (callable(getattr(module, 'switch_to_deploy', None))
            and callable(getattr(module, 'get_equivalent_kernel_bias', None))
            and isinstance(getattr(module, 'deploy', None), bool))


def build_act(act_cfg: Optional[dict]) -> nn.Module:
    """Activation of ``act_cfg`` (``nn.Identity`` for None), or
    ``ValueError``."""
    if act_cfg is None:
        return nn.Identity()
    if not isinstance(act_cfg, dict) or 'type' not in act_cfg:
        raise ValueError(
            f'act_cfg must be a dict with a "type" key or None, '
            f'got {act_cfg!r}')
    try:
        return build_activation_layer(act_cfg)
    except KeyError as e:
        raise ValueError(
            f'act_cfg type {act_cfg["type"]!r} is not a registered '
            f'activation: {e}') from None


class RepBlockBase(BaseModule):
    """Common part of the re-parameterizable 3x3 blocks: argument checks,
    activation, SE, the conv branches and the deploy layout every tool
    relies on (``conv_reparam``, a 3x3 ``nn.Conv2d`` with bias, then SE and
    the activation; a boolean ``deploy``).

    Subclasses implement :meth:`_branches` (the training form up to SE) and
    :meth:`_kernel_bias_f64`, and list in ``_TRAINING_ATTRS`` what
    :meth:`switch_to_deploy` removes. Arguments: see :class:`RepVGGBlock`.
    """

    # mmengine's BaseModule.is_init cannot be compiled by torch.jit.script.
    __jit_unused_properties__ = ['is_init']

    #: Attributes removed by :meth:`switch_to_deploy`.
    _TRAINING_ATTRS: Tuple[str, ...] = ()

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 stride: int,
                 padding: int,
                 dilation: int,
                 groups: int,
                 padding_mode: str,
                 norm_cfg: Optional[dict],
                 act_cfg: Optional[dict],
                 without_branch_norm: bool,
                 init_cfg: Optional[dict],
                 se_cfg: Optional[dict],
                 use_alpha: bool,
                 with_cp: bool) -> None:
        super().__init__(init_cfg=init_cfg)
        _check_int('in_channels', in_channels, 1)
        _check_int('out_channels', out_channels, 1)
        _check_int('stride', stride, 1)
        _check_int('dilation', dilation, 1)
        _check_int('padding', padding, 0)
        _check_int('groups', groups, 1)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f'groups={groups} must divide in_channels={in_channels} and '
                f'out_channels={out_channels}')
        if padding < dilation:
            raise ValueError(
                f'padding ({padding}) must be >= dilation ({dilation}): the '
                '1x1 branch uses padding - dilation to stay aligned with the '
                'centre tap of the 3x3 branch')
        if padding_mode not in PADDING_MODES:
            raise ValueError(f'padding_mode must be one of {PADDING_MODES}, '
                             f'got {padding_mode!r}')
        if se_cfg is not None and not isinstance(se_cfg, dict):
            raise ValueError(
                f'se_cfg must be a dict or None, got {se_cfg!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.padding_mode = padding_mode
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.se_cfg = se_cfg
        self.use_alpha = use_alpha
        self.with_cp = with_cp
        self.deploy = False
        # An identity branch needs the same shape in and out.
        self.has_identity = (not without_branch_norm and in_channels ==
                             out_channels and stride == 1
                             and padding == dilation)
        if norm_cfg is not None:
            check_norm_cfg(norm_cfg, out_channels)
        self.act = build_act(act_cfg)
        self.se = SELayer(out_channels, **se_cfg) \
            if se_cfg is not None else nn.Identity()

    def _build_branches(self, norm_1x1: bool) -> None:
        # The padding mode goes to nn.Conv2d itself: mmcv's ConvModule
        # silently drops padding_mode='circular'.
        conv_cfg = dict(type='Conv2d', padding_mode=self.padding_mode)
        self.branch_3x3 = ConvModule(
            self.in_channels, self.out_channels, 3, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            conv_cfg=conv_cfg, norm_cfg=self.norm_cfg, act_cfg=None)
        self.branch_1x1 = ConvModule(
            self.in_channels, self.out_channels, 1, stride=self.stride,
            padding=self.padding - self.dilation, groups=self.groups,
            bias='auto' if norm_1x1 else False, conv_cfg=conv_cfg,
            norm_cfg=self.norm_cfg if norm_1x1 else None, act_cfg=None)
        self.alpha = nn.Parameter(torch.ones(1)) if self.use_alpha else None

    def _make_reparam_conv(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels, self.out_channels, 3, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=True, padding_mode=self.padding_mode)

    def _set_deploy(self, conv: nn.Conv2d) -> None:
        self.conv_reparam = conv
        self.deploy = True
        # A bound method (picklable, deep-copyable); torch.jit.script ignores
        # it and compiles the class-level forward, which gives the same.
        if isinstance(self.se, nn.Identity):
            self.forward = self._forward_deploy_plain
        else:
            self.forward = self._forward_deploy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-branch forward, or the fused conv once switched."""
        if hasattr(self, 'conv_reparam'):
            return self._forward_deploy(x)
        return self._forward_train(x)

    def _forward_deploy(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.se(self.conv_reparam(x)))

    def _forward_deploy_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_reparam(x))

    def _conv_branches(self, x: torch.Tensor) -> torch.Tensor:
        out_1x1 = self.branch_1x1(x)
        if self.alpha is not None:
            out_1x1 = self.alpha * out_1x1
        return self.branch_3x3(x) + out_1x1

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad and self.training:
            out = cp.checkpoint(self._branches, x, use_reentrant=False)
        else:
            out = self._branches(x)
        return self.act(out)

    def _conv_kernel_bias_f64(self) -> Tuple[torch.Tensor, torch.Tensor]:
        conv3, conv1 = self.branch_3x3.conv, self.branch_1x1.conv
        k3, b3 = fuse_conv_norm(conv3.weight, conv3.bias, self.branch_3x3.norm)
        k1, b1 = fuse_conv_norm(conv1.weight, conv1.bias, self.branch_1x1.norm)
        k1 = pad_kernel_to(k1, 3)
        if self.alpha is not None:
            a = self.alpha.to(k1)
            k1, b1 = k1 * a, b1 * a
        return k3 + k1, b3 + b1

    def _kernel_bias_f64(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def get_equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the one 3x3 conv equal to the branches
        (computed in float64, differentiable; in the block's dtype)."""
        if self.deploy:
            return self.conv_reparam.weight, self.conv_reparam.bias
        ref = self.branch_3x3.conv.weight
        kernel, bias = self._kernel_bias_f64()
        return (kernel.to(device=ref.device, dtype=ref.dtype),
                bias.to(device=ref.device, dtype=ref.dtype))

    def switch_to_deploy(self, test_cfg: Optional[dict] = None) -> None:
        """Fuse the branches into ``conv_reparam`` (idempotent);
        ``test_cfg`` is unused (OpenMMLab's signature)."""
        if self.deploy:
            return
        if self.training:
            warnings.warn(
                f'{type(self).__name__}.switch_to_deploy() called in training '
                'mode: the fusion uses the batch-norm running statistics, as '
                'eval mode does; call model.eval() first to silence this '
                'warning.', UserWarning, stacklevel=2)
        ref = self.branch_3x3.conv.weight
        with torch.no_grad():
            kernel, bias = self._kernel_bias_f64()
            conv = self._make_reparam_conv().to(device=ref.device,
                                                dtype=ref.dtype)
            conv.weight.copy_(kernel.to(conv.weight))
            conv.bias.copy_(bias.to(conv.bias))
        conv.train(self.training)
        for name in self._TRAINING_ATTRS:
            delattr(self, name)
        self._set_deploy(conv)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, '
                f'stride={self.stride}, padding={self.padding}, '
                f'dilation={self.dilation}, groups={self.groups}, '
                f'deploy={self.deploy}')


@MODELS.register_module()
class RepVGGBlock(RepBlockBase):
    """RepVGG block (Ding et al., CVPR 2021) of mmcv ``ConvModule``s::

        y = act(se(branch_3x3(x) + alpha * branch_1x1(x) + branch_norm(x)))

    ``branch_norm``, the identity branch, exists where shapes allow it.
    :meth:`switch_to_deploy` replaces the branches by one exactly equal
    ``nn.Conv2d``, ``conv_reparam``.

    Args:
        padding (int): of the 3x3 conv, >= ``dilation``; the 1x1 conv uses
            ``padding - dilation``.
        norm_cfg (dict, optional): a batch norm (BN, SyncBN, MMSyncBN), so
            that it fuses; None: branches with bias, no identity branch.
        without_branch_norm (bool): no identity branch at all.
        se_cfg (dict, optional): squeeze-excitation before the activation,
            e.g. ``dict(ratio=16)``.
        use_alpha (bool): learnable scalar on the 1x1 branch (PP-YOLOE+).
        deploy (bool): build the fused form, so that a converted state dict
            loads with ``strict=True``.
    """

    _TRAINING_ATTRS = ('branch_3x3', 'branch_1x1', 'branch_norm', 'alpha')

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 stride: int = 1,
                 padding: int = 1,
                 dilation: int = 1,
                 groups: int = 1,
                 padding_mode: str = 'zeros',
                 norm_cfg: Optional[dict] = dict(
                     type='BN', momentum=0.03, eps=0.001),
                 act_cfg: Optional[dict] = dict(type='ReLU', inplace=True),
                 without_branch_norm: bool = True,
                 init_cfg: Optional[dict] = None,
                 *,
                 se_cfg: Optional[dict] = None,
                 use_alpha: bool = False,
                 deploy: bool = False,
                 with_cp: bool = False) -> None:
        super().__init__(in_channels, out_channels, stride, padding,
                         dilation, groups, padding_mode, norm_cfg, act_cfg,
                         without_branch_norm, init_cfg, se_cfg, use_alpha,
                         with_cp)
        if not without_branch_norm and norm_cfg is None:
            raise ValueError('without_branch_norm=False needs a norm_cfg: the '
                             'identity branch is a norm layer')
        if deploy:
            self._set_deploy(self._make_reparam_conv())
            return
        self._build_branches(norm_1x1=True)
        self.branch_norm = build_norm_layer(norm_cfg, out_channels)[1] \
            if self.has_identity else None

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_branches(x)
        if self.branch_norm is not None:
            out = out + self.branch_norm(x)
        return self.se(out)

    def _kernel_bias_f64(self) -> Tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = self._conv_kernel_bias_f64()
        if self.branch_norm is not None:
            kid, bid = fuse_identity_norm(self.branch_norm, self.groups, 3)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias
