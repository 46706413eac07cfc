"""Pure fusion maths in float64 (conv + batch norm, 1x1 padded to 3x3,
identity kernel), on plain tensors so that models import no deploy code."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

KernelBias = Tuple[torch.Tensor, torch.Tensor]

#: dtype used for every fusion computation.
FUSE_DTYPE = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    # MPS has no float64: fuse on the CPU there, everywhere else in place.
    device = torch.device('cpu') if t.device.type == 'mps' else t.device
    return t.to(device=device, dtype=FUSE_DTYPE)


def is_fusable_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a batch norm (torch's or mmcv's ``MMSyncBN``)
    with running statistics, i.e. an affine map in eval mode."""
    cls = type(norm)
    # mmcv.ops.SyncBatchNorm is an nn.Module, not a _BatchNorm subclass.
    if isinstance(norm, _BatchNorm) or (
            cls.__name__ == 'SyncBatchNorm'
            and cls.__module__.startswith('mmcv.')):
        return bool(norm.track_running_stats)
    return False


def norm_scale_shift(norm: nn.Module) -> KernelBias:
    """Per-channel ``(scale, shift)``, float64, with ``norm(x) == x * scale
    + shift`` in eval mode; ``ValueError`` if ``norm`` is not fusable."""
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
    """Kernel and bias (float64) of ``norm(conv(x))``; ``conv_bias`` and
    ``norm`` may be None."""
    k = _f64(kernel)
    b = _f64(conv_bias) if conv_bias is not None else k.new_zeros(k.shape[0])
    if norm is None:
        return k, b
    scale, shift = norm_scale_shift(norm)
    return k * scale.reshape(-1, 1, 1, 1), b * scale + shift


def pad_kernel_to(kernel: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Zero-pad a ``(.., k, k)`` kernel to ``(.., size, size)``, centred: a
    1x1 conv with padding ``p - d`` equals a 3x3 conv with padding ``p`` and
    dilation ``d`` whose only non-zero tap is the centre."""
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
    that maps its input to itself."""
    if channels % groups:
        raise ValueError(
            f'channels ({channels}) must be divisible by groups ({groups})')
    per_group = channels // groups
    k = torch.zeros(channels, per_group, size, size, dtype=dtype,
                    device=device)
    # Output channel i sees its group's inputs; its own is i % per_group.
    idx = torch.arange(channels, device=device)
    k[idx, idx % per_group, size // 2, size // 2] = 1
    return k


def fuse_identity_norm(norm: nn.Module, groups: int = 1,
                       size: int = 3) -> KernelBias:
    """Kernel and bias (float64) equivalent to ``norm(x)`` as a conv."""
    scale, shift = norm_scale_shift(norm)
    k = identity_kernel(scale.numel(), groups, size, device=scale.device)
    return k * scale.reshape(-1, 1, 1, 1), shift
