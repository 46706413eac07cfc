import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrepvgg.deploy import (fuse_conv_norm, fuse_identity_norm,
                             identity_kernel, is_fusable_norm,
                             norm_scale_shift, pad_kernel_to)
from mmrepvgg.testing import randomize_, relative_error


def _bn(c, affine=True):
    bn = nn.BatchNorm2d(c, affine=affine)
    randomize_(bn, 3)
    return bn.eval()


@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('conv_bias', [True, False])
def test_fuse_conv_norm_matches_conv_then_bn(affine, conv_bias):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=conv_bias)
    randomize_(conv, 1)
    bn = _bn(6, affine)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    k, b = fuse_conv_norm(conv.weight, conv.bias, bn)
    assert k.dtype == b.dtype == torch.float64
    with torch.no_grad():
        ref = bn.double()(conv.double()(x))
    assert relative_error(ref, F.conv2d(x, k, b, padding=1)) <= 1e-12


def test_fuse_conv_without_norm_keeps_bias():
    w, bias = torch.randn(3, 2, 3, 3), torch.randn(3)
    k, b = fuse_conv_norm(w, bias, None)
    assert torch.equal(k, w.double()) and torch.equal(b, bias.double())
    _, b0 = fuse_conv_norm(w, None, None)
    assert torch.equal(b0, torch.zeros(3, dtype=torch.float64))


def test_pad_kernel_to_centres():
    k = torch.arange(6.).reshape(6, 1, 1, 1)
    p = pad_kernel_to(k, 3)
    assert p.shape == (6, 1, 3, 3)
    assert torch.equal(p[:, :, 1, 1], k[:, :, 0, 0])
    assert p.abs().sum() == k.abs().sum()
    with pytest.raises(ValueError, match='centred'):
        pad_kernel_to(torch.zeros(1, 1, 2, 2), 3)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_identity_kernel_is_identity(groups):
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    k = identity_kernel(8, groups)
    assert k.shape == (8, 8 // groups, 3, 3)
    assert torch.equal(F.conv2d(x, k, padding=1, groups=groups), x)
    with pytest.raises(ValueError, match='groups'):
        identity_kernel(6, 4)


def test_fuse_identity_norm_matches_bn():
    bn = _bn(4)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    k, b = fuse_identity_norm(bn, groups=2)
    with torch.no_grad():
        ref = bn.double()(x)
    assert relative_error(ref, F.conv2d(x, k, b, padding=1, groups=2)) <= 1e-12


def test_norm_scale_shift_refuses_unfusable():
    assert not is_fusable_norm(nn.GroupNorm(2, 4))
    assert not is_fusable_norm(nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match='GroupNorm'):
        norm_scale_shift(nn.GroupNorm(2, 4))
