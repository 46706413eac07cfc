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
    ``post_norm``. The paper reports that post-training INT8 quantization
    ruins RepVGG's ImageNet accuracy and barely moves QARepVGG's (figures in
    ``docs/qarepvgg.md``).

    Design decisions (implementations differ):

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
    * The fusion runs in float64 through
      :mod:`~mmrepvgg.models.layers.fusion`: 3x3 conv+BN, padded 1x1
      kernel, identity kernel, then the post-sum norm folded onto that
      kernel and bias (``fuse_conv_norm``).

    Args:
        The arguments of :class:`RepVGGBlock`, in the same order and with the
        same defaults; these differ in meaning:

        norm_cfg (dict, optional): norm of the 3x3 branch and of
            ``post_norm``. Must be a batch norm (BN, SyncBN, MMSyncBN) so
            that it can be fused; None gives a 3x3 conv with bias and no
            norm at all.
        without_branch_norm (bool): do not build the identity branch even
            where shapes allow it (the identity of :class:`RepVGGBlock` is a
            norm; here it is ``x`` itself). Defaults to True.
        se_cfg (dict, optional): squeeze-excitation after ``post_norm``,
            before the activation. Keyword only.
        use_alpha (bool): learnable scalar on the 1x1 branch; it weighs the
            1x1 branch against the 3x3 branch and the unscaled identity
            before the post-sum norm. Keyword only. Defaults to False.
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
            self._build_deploy()
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
