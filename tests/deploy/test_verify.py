"""The float32 criterion: machine-independent, and it catches broken fusions.
"""
import math

import pytest
import torch

from mmrepvgg import RepVGG, RepVGGBlock, switch_to_deploy
from mmrepvgg.deploy import fuse_conv_norm, pad_kernel_to
from mmrepvgg.deploy.verify import (FP32_EPS, NonFiniteError, check_finite,
                                    describe, judge_fp32, relative_error)
from mmrepvgg.testing import fp32_verdict, fusion_errors, randomize_

TINY_ARCH = dict(num_blocks=(1, 2, 2, 1), width_factor=(0.25, 0.25, 0.25, 0.5))


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_relative_error_never_matches_non_finite():
    assert relative_error(_t(1, 2), _t(1, 2)) == 0
    assert relative_error(_t(1, 2), _t(1, float('nan'))) == math.inf
    assert relative_error(_t(1, float('inf')), _t(1, 2)) == math.inf
    assert relative_error(_t(0, 0), _t(0, 1e-3)) == pytest.approx(1e-3)


def test_judge_ratio_and_fixed_tolerance():
    truth = {'a': _t(1.0, -2.0, 4.0)}
    ref = {'a': _t(1.0, -2.0, 4.0 + 4e-6)}     # noise 1e-6
    good = {'a': _t(1.0 + 3e-6, -2.0, 4.0)}    # error 7.5e-7
    bad = {'a': _t(1.0, -2.0, 4.0 + 4e-4)}     # error 1e-4
    v = judge_fp32(truth, ref, good)
    assert v['passed'] and v['ratio'] == pytest.approx(0.75)
    v = judge_fp32(truth, ref, bad)
    assert not v['passed'] and v['ratio'] == pytest.approx(100)
    assert '0.0001' in describe(v) and '1e-06' in describe(v)


def test_judge_has_a_one_ulp_floor():
    truth = {'a': _t(1.0, 2.0)}
    exact = {'a': _t(1.0, 2.0)}
    near = {'a': _t(1.0, 2.0 + 2 * FP32_EPS)}
    assert judge_fp32(truth, exact, near)['passed']
    assert not judge_fp32(truth, exact, {'a': _t(1.0, 2.1)})['passed']


def test_judge_refuses_non_finite():
    truth = {'a': _t(1.0, 2.0)}
    nan = {'a': _t(1.0, float('nan'))}
    v = judge_fp32(truth, truth, nan)
    assert not v['passed'] and v['error'] == math.inf
    with pytest.raises(NonFiniteError, match='a'):
        judge_fp32(nan, truth, truth)
    with pytest.raises(NonFiniteError, match='reference'):
        judge_fp32(truth, nan, truth)
    with pytest.raises(ValueError, match='differ'):
        judge_fp32(truth, truth, {'b': _t(1.0, 2.0)})


def test_check_finite_names_first_bad_key():
    sd = {'w': torch.ones(2), 'bn.running_var': torch.tensor([1.0, -0.5]),
          'x': torch.tensor([float('inf')])}
    with pytest.raises(NonFiniteError, match='bn.running_var holds a negat'):
        check_finite(sd, 'ckpt.pth')
    del sd['bn.running_var']
    with pytest.raises(NonFiniteError, match=r'ckpt.pth: x holds 1 non-fin'):
        check_finite(sd, 'ckpt.pth')
    check_finite({'n': torch.tensor([3])}, 'ints are fine')


# ------------------------------------------------- deliberately broken fusion
def _drop_identity(self):
    conv3, conv1 = self.branch_3x3.conv, self.branch_1x1.conv
    k3, b3 = fuse_conv_norm(conv3.weight, conv3.bias, self.branch_3x3.norm)
    k1, b1 = fuse_conv_norm(conv1.weight, conv1.bias, self.branch_1x1.norm)
    return k3 + pad_kernel_to(k1, 3), b3 + b1


def _bias_twice(self):
    kernel, bias = ORIGINAL(self)
    _, b3 = fuse_conv_norm(self.branch_3x3.conv.weight, None,
                           self.branch_3x3.norm)
    return kernel, bias + b3  # one BN shift too many


def _transposed_1x1(self):
    conv3, conv1 = self.branch_3x3.conv, self.branch_1x1.conv
    k3, b3 = fuse_conv_norm(conv3.weight, conv3.bias, self.branch_3x3.norm)
    k1, b1 = fuse_conv_norm(conv1.weight, conv1.bias, self.branch_1x1.norm)
    if k1.shape[0] == k1.shape[1]:
        k1 = k1.transpose(0, 1)
    kernel, bias = k3 + pad_kernel_to(k1, 3), b3 + b1
    if self.branch_norm is not None:
        from mmrepvgg.deploy import fuse_identity_norm
        kid, bid = fuse_identity_norm(self.branch_norm, self.groups, 3)
        kernel, bias = kernel + kid, bias + bid
    return kernel, bias


ORIGINAL = RepVGGBlock._kernel_bias_f64
BROKEN = {'dropped_identity': _drop_identity, 'bias_twice': _bias_twice,
          'transposed_1x1': _transposed_1x1}


@pytest.mark.parametrize('arch', [TINY_ARCH, 'A0'])
def test_correct_fusion_passes(arch):
    model = randomize_(RepVGG(arch), seed=4).eval()
    x = torch.randn(1, 3, 64, 64)
    v = fp32_verdict(model, switch_to_deploy(model, verbose=False), x)
    assert v['passed'], describe(v)
    assert v['max_ratio'] < 4


@pytest.mark.parametrize('broken', sorted(BROKEN))
@pytest.mark.parametrize('arch', [TINY_ARCH, 'A0'])
def test_broken_fusion_fails_loudly(arch, broken, monkeypatch):
    model = randomize_(RepVGG(arch), seed=4).eval()
    x = torch.randn(1, 3, 64, 64)
    monkeypatch.setattr(RepVGGBlock, '_kernel_bias_f64', BROKEN[broken])
    fused = switch_to_deploy(model, verbose=False)
    v = fp32_verdict(model, fused, x)
    assert not v['passed'], describe(v)
    assert v['ratio'] > 1000, describe(v)  # orders of magnitude, not noise
    errs = fusion_errors(model, x)
    assert errs['block_fp64'] > 1e-4, errs


def test_fusion_errors_reports_the_ratio():
    model = randomize_(RepVGG(TINY_ARCH), seed=1).eval()
    errs = fusion_errors(model, torch.randn(1, 3, 32, 32))
    assert errs['block_fp64'] <= 1e-12
    assert errs['ratio'] == pytest.approx(
        errs['model_fp32'] / max(errs['floor_fp32'], FP32_EPS))
