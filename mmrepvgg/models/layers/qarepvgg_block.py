"""QARepVGGBlock: the quantization-friendly RepVGG block (QARepVGG)."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_norm_layer
from mmdet.registry import MODELS

from mmrepvgg.deploy.fusion import (fuse_conv_norm, identity_kernel,
                                    pad_kernel_to)
from .repvgg_block import RepBlockBase, check_norm_cfg


@MODELS.register_module()
class QARepVGGBlock(RepBlockBase):
    """Quantization-aware RepVGG block (Chu et al., "Make RepVGG Greater
    Again: A Quantization-aware Approach", arXiv 2212.01593, AAAI 2024).

    Training form (the paper's final design)::

        y = act(se(post_norm(branch_3x3(x) + alpha * branch_1x1(x) + x)))

    * ``branch_3x3``: 3x3 conv + batch norm (as in :class:`RepVGGBlock`);
    * ``branch_1x1``: a plain 1x1 conv, no norm and no bias;
    * identity: ``x`` itself, no norm (only where shapes allow it and
      ``without_branch_norm`` is False; ``has_identity`` says whether it is
      there, ``branch_norm`` is always None);
    * ``post_norm``: one batch norm after the sum, then SE (optional) and the
      activation.

    The per-branch norms of RepVGG are what makes its fused kernel hard to
    quantize (their scales ``gamma / sigma`` multiply the 1x1 and identity
    taps and produce outlier weights, and the sum of three normalized
    branches has a large, uncontrolled variance); QARepVGG removes them from
    the 1x1 and identity branches and controls the variance of the sum with
    ``post_norm``. Published effect of post-training INT8 quantization:
    RepVGG-A0 72.4 -> 52.2 top-1, QARepVGG-A0 70.4 (ImageNet).

    Design decisions (implementations differ; see the README):

    * **No bias on the 1x1 conv** (as YOLOv6's QARepVGGBlock; super-gradients
      adds one and notes that the paper does not say): a per-channel
      constant added right before a batch norm is removed again by the
      batch mean in training (its gradient is zero) and in eval mode only
      shifts ``running_mean``; without norms (``norm_cfg=None``) the 3x3
      conv's own bias already provides it. It would be a dead parameter.
    * **post_norm before SE**: ``act(se(post_norm(sum)))``. With the norm
      right after the (linear) sum it folds into the conv even when SE is
      used (YOLOv6 puts its norm after SE, which cannot be folded through
      the SE gate; super-gradients applies SE after the activation).
    * **Everything is folded at deploy time**, ``post_norm`` included
      (YOLOv6 keeps its norm for quantization-aware training,
      super-gradients keeps it unless asked): the deployed block is exactly
      ``act(conv_reparam(x))`` (``act(se(conv_reparam(x)))`` with SE), the
      same layout, state-dict keys and forward as a deployed
      :class:`RepVGGBlock`, so conversion, export and benchmark tools treat
      both alike. A post-training quantizer (onnxruntime, TensorRT) folds a
      conv + BN pair before quantizing anyway, so quantization sees the same
      kernel; what makes it quantization-friendly is the training form.
    * The fusion runs in float64 through :mod:`mmrepvgg.deploy.fusion`:
      3x3 conv+BN, padded 1x1 kernel, identity kernel, then the post-sum
      norm folded onto that kernel and bias (``fuse_conv_norm``).

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        stride (int): stride of the 3x3 and 1x1 convs. Defaults to 1.
        padding (int): padding of the 3x3 conv; the 1x1 conv uses
            ``padding - dilation``. Must be >= ``dilation``. Defaults to 1.
        dilation (int): dilation of the 3x3 conv. Defaults to 1.
        groups (int): conv groups; must divide both channel counts.
            Defaults to 1.
        padding_mode (str): 'zeros', 'reflect', 'replicate' or 'circular'.
            Defaults to 'zeros'.
        norm_cfg (dict, optional): norm of the 3x3 branch and of
            ``post_norm``. Must be a batch norm (BN, SyncBN, MMSyncBN) so
            that it can be fused; None gives a 3x3 conv with bias and no
            norm at all. Defaults to
            ``dict(type='BN', momentum=0.03, eps=0.001)``.
        act_cfg (dict, optional): activation after the sum, any type in
            mmcv's registry; None for no activation.
            Defaults to ``dict(type='ReLU', inplace=True)``.
        without_branch_norm (bool): do not build the identity branch even
            where shapes allow it (same meaning as for :class:`RepVGGBlock`,
            whose identity branch is a norm). Defaults to True.
        init_cfg (dict, optional): initialization config. Defaults to None.
        se_cfg (dict, optional): squeeze-excitation after ``post_norm``,
            before the activation, e.g. ``dict(ratio=16)``; None for no SE.
            Keyword only.
        use_alpha (bool): learnable scalar on the 1x1 branch (PP-YOLOE+;
            meaningful here too: it weighs the 1x1 branch against the 3x3
            branch and the unscaled identity before the post-sum norm).
            Keyword only. Defaults to False.
        deploy (bool): build the fused form directly (``conv_reparam`` only),
            so that a converted state dict loads with ``strict=True``.
            Keyword only. Defaults to False.
        with_cp (bool): gradient checkpointing of the branches in training.
            Keyword only. Defaults to False.
        post_norm_init (float): initial weight (gamma) of ``post_norm``. 1 as
            in the paper. A RepVGGBlock with identity sums three normalized
            branches, so its initial output is about ``sqrt(3)`` times
            larger: ``3 ** 0.5`` restores that scale where the block output
            feeds layers without normalization directly (e.g. the
            ``RepVGGFPN`` outputs read by a RetinaNet head, see
            ``configs/toy/retinanet_qarepvgg-tiny_qarepvgg-fpn_toy.py``).
            Keyword only. Defaults to 1.0.
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
                         init_cfg, se_cfg, use_alpha, with_cp)
        self.has_identity = (not without_branch_norm
                             and self._identity_allowed())
        if norm_cfg is not None:
            check_norm_cfg(norm_cfg, out_channels)
        if isinstance(post_norm_init, bool) or not isinstance(
                post_norm_init, (int, float)) or not post_norm_init > 0:
            raise ValueError('post_norm_init must be a number > 0, got '
                             f'{post_norm_init!r}')
        if post_norm_init != 1 and norm_cfg is None:
            raise ValueError('post_norm_init needs a norm_cfg: without norms '
                             'there is no post_norm')
        self.post_norm_init = float(post_norm_init)
        self._build_act_se()

        if deploy:
            self._build_deploy()
            return

        conv_cfg = self._conv_cfg()
        self.branch_3x3 = ConvModule(
            in_channels, out_channels, 3, stride=stride, padding=padding,
            dilation=dilation, groups=groups, conv_cfg=conv_cfg,
            norm_cfg=norm_cfg, act_cfg=None)
        self.branch_1x1 = ConvModule(
            in_channels, out_channels, 1, stride=stride,
            padding=padding - dilation, groups=groups, bias=False,
            conv_cfg=conv_cfg, norm_cfg=None, act_cfg=None)
        # The identity branch is x itself: no module, no parameters.
        self.branch_norm = None
        self.post_norm = build_norm_layer(norm_cfg, out_channels)[1] \
            if norm_cfg is not None else None
        if self.post_norm_init != 1:
            if getattr(self.post_norm, 'weight', None) is None:
                raise ValueError('post_norm_init needs an affine norm '
                                 '(norm_cfg affine=True)')
            nn.init.constant_(self.post_norm.weight, self.post_norm_init)
        self.alpha = nn.Parameter(torch.ones(1)) if use_alpha else None

    # ---------------------------------------------------------------- forward
    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        out_1x1 = self.branch_1x1(x)
        if self.alpha is not None:
            out_1x1 = self.alpha * out_1x1
        out = self.branch_3x3(x) + out_1x1
        if self.has_identity:
            out = out + x
        if self.post_norm is not None:
            out = self.post_norm(out)
        return self.se(out)

    # --------------------------------------------------------------- re-param
    def _kernel_bias_f64(self) -> Tuple[torch.Tensor, torch.Tensor]:
        conv3, conv1 = self.branch_3x3.conv, self.branch_1x1.conv
        kernel, bias = fuse_conv_norm(conv3.weight, conv3.bias,
                                      self.branch_3x3.norm)
        k1, b1 = fuse_conv_norm(conv1.weight, conv1.bias, None)
        k1 = pad_kernel_to(k1, 3)
        if self.alpha is not None:
            a = self.alpha.to(k1)
            k1, b1 = k1 * a, b1 * a
        kernel, bias = kernel + k1, bias + b1
        if self.has_identity:
            kernel = kernel + identity_kernel(
                self.out_channels, self.groups, 3, dtype=kernel.dtype,
                device=kernel.device)
        if self.post_norm is not None:
            # post_norm(conv(x) + b) == a conv with the norm folded in.
            kernel, bias = fuse_conv_norm(kernel, bias, self.post_norm)
        return kernel, bias
