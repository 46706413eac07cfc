"""QARepVGGBlock: the quantization-friendly RepVGG block (QARepVGG)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmdet.registry import MODELS

from .fusion import fuse_conv_norm, identity_kernel
from .repvgg_block import RepBlockBase


@MODELS.register_module()
class QARepVGGBlock(RepBlockBase):
    """Quantization-aware RepVGG block (Chu et al., AAAI 2024)::

        y = act(se(post_norm(branch_3x3(x) + alpha * branch_1x1(x) + x)))

    ``branch_1x1`` is a plain conv and the identity (``has_identity``) is
    ``x`` itself: one norm after the sum replaces RepVGG's per-branch norms,
    whose scales make the fused kernel hard to quantize. It deploys to
    :class:`RepVGGBlock`'s form (design decisions: docs/qarepvgg.md).

    Args:
        post_norm_init (float): initial weight of ``post_norm`` (1 in the
            paper; ``3 ** 0.5`` gives a RepVGGBlock's output scale where no
            norm follows, e.g. a ``RepVGGFPN`` read by a RetinaNet head).
    """

    _TRAINING_ATTRS = ('branch_3x3', 'branch_1x1', 'branch_norm',
                       'post_norm', 'alpha')

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
                 with_cp: bool = False,
                 post_norm_init: float = 1.0) -> None:
        super().__init__(in_channels, out_channels, stride, padding,
                         dilation, groups, padding_mode, norm_cfg, act_cfg,
                         without_branch_norm, init_cfg, se_cfg, use_alpha,
                         with_cp)
        if isinstance(post_norm_init, bool) or not isinstance(
                post_norm_init, (int, float)) or not post_norm_init > 0:
            raise ValueError('post_norm_init must be a number > 0, got '
                             f'{post_norm_init!r}')
        if post_norm_init != 1 and norm_cfg is None:
            raise ValueError('post_norm_init needs a norm_cfg: without norms '
                             'there is no post_norm')
        self.post_norm_init = float(post_norm_init)
        if deploy:
            self._set_deploy(self._make_reparam_conv())
            return
        self._build_branches(norm_1x1=False)
        # The identity branch is x itself: no module, no parameters.
        self.branch_norm = None
        self.post_norm = build_norm_layer(norm_cfg, out_channels)[1] \
            if norm_cfg is not None else None
        if self.post_norm_init != 1:
            if getattr(self.post_norm, 'weight', None) is None:
                raise ValueError('post_norm_init needs an affine norm '
                                 '(norm_cfg affine=True)')
            nn.init.constant_(self.post_norm.weight, self.post_norm_init)

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        out = self._conv_branches(x)
        if self.has_identity:
            out = out + x
        if self.post_norm is not None:
            out = self.post_norm(out)
        return self.se(out)

    def _kernel_bias_f64(self) -> Tuple[torch.Tensor, torch.Tensor]:
        kernel, bias = self._conv_kernel_bias_f64()
        if self.has_identity:
            kernel = kernel + identity_kernel(
                self.out_channels, self.groups, 3, dtype=kernel.dtype,
                device=kernel.device)
        if self.post_norm is not None:
            # post_norm(conv(x) + b) == a conv with the norm folded in.
            kernel, bias = fuse_conv_norm(kernel, bias, self.post_norm)
        return kernel, bias
