"""Pure structural re-parameterization maths.

Everything here works on plain tensors and ``torch.nn`` modules and knows
nothing of mmdet: it is the single place where a conv + batch-norm pair, a
1x1 kernel or an identity branch is turned into an equivalent 3x3 kernel and
bias. All arithmetic is done in float64; callers cast the result back to the
dtype of the model they write into. It sits below the blocks that use it
(and is re-exported by :mod:`mmrepvgg.deploy`), so that building a model
imports no deploy or checkpoint code.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

KernelBias = Tuple[torch.Tensor, torch.Tensor]

#: dtype used for every fusion computation.
FUSE_DTYPE = torch.float64


def _fuse_device(t: torch.Tensor) -> torch.device:
    # MPS has no float64: fuse on the CPU there, everywhere else in place.
    return torch.device('cpu') if t.device.type == 'mps' else t.device


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(device=_fuse_device(t), dtype=FUSE_DTYPE)


def is_fusable_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a batch norm whose eval output is an affine map.

    True for every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm2d,
    torch SyncBatchNorm, ...) and for mmcv's ``MMSyncBN``, as long as it
    tracks running statistics (otherwise eval mode uses batch statistics and
    no fixed kernel can reproduce it).
    """
    if isinstance(norm, _BatchNorm):
        return bool(norm.track_running_stats)
    # mmcv.ops.SyncBatchNorm is an nn.Module, not a _BatchNorm subclass.
    cls = type(norm)
    if cls.__name__ == 'SyncBatchNorm' and cls.__module__.startswith('mmcv.'):
        return bool(norm.track_running_stats)
    return False


def norm_scale_shift(norm: nn.Module) -> KernelBias:
    """Per-channel ``(scale, shift)`` of a batch norm in eval mode, float64.

    ``norm(x) == x * scale + shift`` (per channel) with running statistics.

    Raises:
        ValueError: if ``norm`` is not a fusable batch norm.
    """
    if not is_fusable_norm(norm):
        raise ValueError(
            f'cannot fuse norm layer of type {type(norm).__name__}: only '
            'batch norms with running statistics (BN, SyncBN, MMSyncBN) '
            'have a fixed affine form in eval mode')
    var = _f64(norm.running_var)
    mean = _f64(norm.running_mean)
    std_inv = torch.rsqrt(var + norm.eps)
    weight = _f64(norm.weight) if norm.weight is not None else \
        torch.ones_like(var)
    bias = _f64(norm.bias) if norm.bias is not None else torch.zeros_like(var)
    scale = weight * std_inv
    shift = bias - mean * scale
    return scale, shift


def fuse_conv_norm(kernel: torch.Tensor,
                   conv_bias: Optional[torch.Tensor],
                   norm: Optional[nn.Module]) -> KernelBias:
    """Fold ``norm(conv(x))`` into a single kernel and bias (float64).

    Args:
        kernel (Tensor): conv weight ``(out, in / groups, kh, kw)``.
        conv_bias (Tensor, optional): conv bias ``(out,)`` or None.
        norm (nn.Module, optional): batch norm after the conv, or None.

    Returns:
        tuple[Tensor, Tensor]: fused kernel and bias, float64.
    """
    k = _f64(kernel)
    b = _f64(conv_bias) if conv_bias is not None else k.new_zeros(k.shape[0])
    if norm is None:
        return k, b
    scale, shift = norm_scale_shift(norm)
    return k * scale.reshape(-1, 1, 1, 1), b * scale + shift


def pad_kernel_to(kernel: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Zero-pad a ``(.., k, k)`` kernel to ``(.., size, size)``, centred.

    A 1x1 conv with padding ``p - d`` equals a 3x3 conv with padding ``p`` and
    dilation ``d`` whose only non-zero tap is the centre.
    """
    kh, kw = kernel.shape[-2:]
    if (size - kh) % 2 or (size - kw) % 2 or kh > size or kw > size:
        raise ValueError(
            f'kernel of size {kh}x{kw} cannot be centred in {size}x{size}')
    ph, pw = (size - kh) // 2, (size - kw) // 2
    return torch.nn.functional.pad(kernel, [pw, pw, ph, ph])


def identity_kernel(channels: int,
                    groups: int = 1,
                    size: int = 3,
                    dtype: torch.dtype = FUSE_DTYPE,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Grouped conv kernel ``(channels, channels / groups, size, size)``
    that maps its input to itself.

    Output channel ``i`` belongs to group ``i // (channels / groups)`` and
    sees that group's inputs; its own input is at index
    ``i % (channels / groups)`` within the group.
    """
    if channels % groups:
        raise ValueError(
            f'channels ({channels}) must be divisible by groups ({groups})')
    per_group = channels // groups
    k = torch.zeros(channels, per_group, size, size, dtype=dtype,
                    device=device)
    idx = torch.arange(channels, device=device)
    k[idx, idx % per_group, size // 2, size // 2] = 1
    return k


def fuse_identity_norm(norm: nn.Module, groups: int = 1,
                       size: int = 3) -> KernelBias:
    """Kernel and bias (float64) equivalent to ``norm(x)`` as a conv."""
    scale, shift = norm_scale_shift(norm)
    k = identity_kernel(scale.numel(), groups, size, device=scale.device)
    return k * scale.reshape(-1, 1, 1, 1), shift
