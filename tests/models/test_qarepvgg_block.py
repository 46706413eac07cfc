"""QARepVGGBlock: structure, exact fusion (post-sum norm included), the same
deploy layout as RepVGGBlock, serialization and errors.

Float64 fusion is checked to TOL64 per block; float32 results are judged
by the block's own float32 noise (mmrepvgg.deploy.verify.judge_fp32),
never by a fixed float32 number. Weights and batch-norm statistics are
randomized before every comparison.
"""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import mmrepvgg
from mmrepvgg import QARepVGGBlock, RepVGGBlock, switch_to_deploy
from mmrepvgg.deploy.switch import deepcopy_model
from mmrepvgg.deploy.verify import describe, flatten_outputs, judge_fp32
from mmrepvgg.testing import float64_outputs, randomize_, relative_error

TOL64 = 1e-12


def _fp32_verdict(reference, candidate, *inputs):
    """judge_fp32 of ``candidate`` against ``reference`` (float32), with
    ``reference`` in float64 as the truth."""
    truth = flatten_outputs(float64_outputs(reference, *inputs))
    with torch.no_grad():
        ref = flatten_outputs(reference(*inputs))
        cand = flatten_outputs(candidate(*inputs))
    return judge_fp32(truth, ref, cand)


def _assert_fp32(reference, candidate, *inputs):
    verdict = _fp32_verdict(reference, candidate, *inputs)
    assert verdict['passed'], describe(verdict)
    return verdict


def _assert_fp64(block, x):
    """Float64 copy of ``block``: multi-branch vs fused, to TOL64."""
    b64 = deepcopy_model(block).double().eval()  # MMSyncBN: shared group
    x64 = x.double()
    with torch.no_grad():
        ref = b64(x64)
        fused = switch_to_deploy(b64, verbose=False)
        out = fused(x64)
    assert fused.conv_reparam.weight.dtype == torch.float64
    err = relative_error(ref, out)
    assert err <= TOL64, err


def _pair(block, x, seed=0):
    """Randomize weights and statistics, eval, convert a copy; assert the
    fusion exact in float64 and within float32 noise in float32."""
    randomize_(block, seed)
    block.eval()
    _assert_fp64(block, x)
    fused = switch_to_deploy(block, verbose=False)
    _assert_fp32(block, fused, x)
    with torch.no_grad():
        ref, out = block(x), fused(x)
    assert out.shape == ref.shape
    return fused, ref, out


# -------------------------------------------------------------- structure
def test_structure_follows_the_paper():
    block = QARepVGGBlock(8, 8, without_branch_norm=False)
    assert block.has_identity and block.branch_norm is None
    assert isinstance(block.branch_3x3.norm, nn.BatchNorm2d)
    assert block.branch_1x1.norm is None
    assert block.branch_1x1.conv.bias is None
    assert isinstance(block.post_norm, nn.BatchNorm2d)
    assert block.post_norm.eps == 0.001 and block.post_norm.momentum == 0.03
    assert sorted(block.state_dict()) == sorted(
        ['branch_3x3.conv.weight'] +
        [f'branch_3x3.bn.{f}' for f in ('weight', 'bias', 'running_mean',
                                        'running_var',
                                        'num_batches_tracked')] +
        ['branch_1x1.conv.weight'] +
        [f'post_norm.{f}' for f in ('weight', 'bias', 'running_mean',
                                    'running_var', 'num_batches_tracked')])
    # Fewer parameters than RepVGG: two norms instead of three.
    rep = RepVGGBlock(8, 8, without_branch_norm=False)
    n = sum(p.numel() for p in block.parameters())
    assert n == sum(p.numel() for p in rep.parameters()) - 2 * 8
    # Default: no identity branch, as RepVGGBlock.
    assert not QARepVGGBlock(8, 8).has_identity


@pytest.mark.parametrize('kwargs,identity', [
    (dict(stride=2), False), (dict(padding=2, dilation=1), False),
    (dict(padding=2, dilation=2), True), (dict(groups=4), True)])
def test_identity_only_where_shapes_allow(kwargs, identity):
    block = QARepVGGBlock(8, 8, without_branch_norm=False, **kwargs)
    assert block.has_identity == identity
    assert not QARepVGGBlock(4, 8, without_branch_norm=False).has_identity


def test_training_form_normalizes_the_sum():
    """post_norm acts on the sum: in training mode (batch statistics) the
    pre-activation output of every channel has mean ``post_norm.bias``, and
    a per-channel constant added to a branch (a 1x1 bias would be one) does
    not change the output (float64: exact up to rounding)."""
    block = QARepVGGBlock(4, 4, act_cfg=None, without_branch_norm=False)
    block = randomize_(block.double()).train()
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        mean = y.mean(dim=(0, 2, 3))
        assert relative_error(block.post_norm.bias, mean) <= TOL64
        block.branch_3x3.bn.bias.add_(3.0)
        assert relative_error(y, block(x)) <= TOL64


def test_post_norm_init():
    block = QARepVGGBlock(4, 4, post_norm_init=3**0.5)
    assert torch.allclose(block.post_norm.weight, torch.full((4, ), 3**0.5))
    assert torch.equal(block.branch_3x3.bn.weight, torch.ones(4))
    # A parent re-initializing its children keeps it (ConvModules reset
    # only their own norm).
    block.init_weights()
    assert torch.allclose(block.post_norm.weight, torch.full((4, ), 3**0.5))
    _pair(block, torch.randn(1, 4, 6, 6))


# ----------------------------------------------------------- equivalence
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilation', [1, 2])
@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('identity', [True, False])
def test_equivalence_grid(stride, dilation, groups, identity):
    block = QARepVGGBlock(8, 8, stride=stride, padding=dilation,
                          dilation=dilation, groups=groups,
                          without_branch_norm=not identity)
    assert block.has_identity == (identity and stride == 1)
    x = torch.randn(2, 8, 9, 11)
    fused, _, _ = _pair(block, x)
    assert fused.deploy and isinstance(fused.conv_reparam, nn.Conv2d)
    for name in ('branch_3x3', 'branch_1x1', 'branch_norm', 'post_norm',
                 'alpha'):
        assert not hasattr(fused, name)
    assert sorted(fused.state_dict()) == ['conv_reparam.bias',
                                          'conv_reparam.weight']


@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect', 'replicate',
                                          'circular'])
@pytest.mark.parametrize('padding,dilation', [(1, 1), (2, 1), (2, 2)])
def test_equivalence_padding_modes(padding_mode, padding, dilation):
    block = QARepVGGBlock(4, 4, padding=padding, dilation=dilation,
                          padding_mode=padding_mode,
                          without_branch_norm=False)
    fused, _, _ = _pair(block, torch.randn(1, 4, 7, 10))
    assert fused.conv_reparam.padding_mode == padding_mode


def test_equivalence_se_alpha_channels_change():
    block = QARepVGGBlock(6, 12, stride=2, se_cfg=dict(ratio=4),
                          use_alpha=True)
    fused, _, _ = _pair(block, torch.randn(2, 6, 10, 7))
    assert not hasattr(fused, 'alpha')
    assert fused.forward.__func__ is QARepVGGBlock._forward_deploy
    assert fused(torch.randn(1, 6, 5, 13)).shape == (1, 12, 3, 7)


def test_equivalence_se_with_identity_and_groups():
    block = QARepVGGBlock(8, 8, groups=2, se_cfg=dict(ratio=2),
                          use_alpha=True, without_branch_norm=False)
    _pair(block, torch.randn(2, 8, 6, 5), seed=4)


def test_alpha_is_applied():
    block = QARepVGGBlock(4, 4, use_alpha=True, without_branch_norm=False)
    randomize_(block).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        y1 = block(x)
        block.alpha.fill_(3.0)
        y2 = block(x)
    assert not torch.allclose(y1, y2)
    _pair(block, x, seed=3)


@pytest.mark.parametrize('act', [dict(type='ReLU'), dict(type='SiLU'),
                                 dict(type='LeakyReLU', negative_slope=0.1),
                                 None])
def test_equivalence_activations(act):
    block = QARepVGGBlock(4, 4, act_cfg=act, without_branch_norm=False)
    _pair(block, torch.randn(1, 4, 6, 6))


def test_norm_cfg_none_has_no_norm_at_all():
    block = QARepVGGBlock(4, 4, norm_cfg=None, without_branch_norm=False)
    assert block.post_norm is None and block.branch_3x3.norm is None
    assert block.branch_3x3.conv.bias is not None
    assert block.branch_1x1.conv.bias is None
    assert block.has_identity  # a true identity needs no norm
    _pair(block, torch.randn(1, 4, 6, 6))


@pytest.mark.parametrize('norm', ['BN', 'SyncBN', 'MMSyncBN'])
def test_equivalence_norm_types(norm, dist_world1):
    import mmcv.ops  # noqa: F401  (registers MMSyncBN)
    block = QARepVGGBlock(4, 4, norm_cfg=dict(type=norm),
                          without_branch_norm=False)
    assert type(block.post_norm) is type(block.branch_3x3.norm)
    _pair(block, torch.randn(2, 4, 6, 5))


def test_equivalence_float64_block():
    block = QARepVGGBlock(8, 8, groups=2, without_branch_norm=False,
                          use_alpha=True).double()
    randomize_(block, 2).eval()
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        fused = switch_to_deploy(block, verbose=False)
        out = fused(x)
    assert fused.conv_reparam.weight.dtype == out.dtype == torch.float64
    assert relative_error(ref, out) <= TOL64


def test_equivalent_kernel_matches_plain_conv():
    block = QARepVGGBlock(4, 4, without_branch_norm=False)
    randomize_(block, 7).eval()
    k, b = block.get_equivalent_kernel_bias()
    assert k.dtype == torch.float32
    x = torch.randn(1, 4, 5, 5)
    _assert_fp32(
        block, lambda t: block.act(nn.functional.conv2d(t, k, b, padding=1)),
        x)
    block64 = copy.deepcopy(block).double()
    k64, b64 = block64.get_equivalent_kernel_bias()
    with torch.no_grad():
        ref = block64(x.double())
        out = block64.act(nn.functional.conv2d(x.double(), k64, b64,
                                               padding=1))
    assert relative_error(ref, out) <= TOL64


def test_get_equivalent_kernel_bias_is_differentiable():
    block = QARepVGGBlock(4, 4, without_branch_norm=False, use_alpha=True)
    randomize_(block)
    k, b = block.get_equivalent_kernel_bias()
    assert k.requires_grad
    (k.sum() + b.sum()).backward()
    for name in ('branch_3x3.conv.weight', 'branch_1x1.conv.weight',
                 'branch_3x3.bn.weight', 'post_norm.weight',
                 'post_norm.bias', 'alpha'):
        grad = dict(block.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


# --------------------------------------------------- a broken fusion fails
def _drop_post_norm(block):
    block.post_norm = None


def _drop_identity(block):
    block.has_identity = False


def _drop_1x1(block):
    with torch.no_grad():
        block.branch_1x1.conv.weight.zero_()


def _drop_3x3_norm_shift(block):
    with torch.no_grad():
        block.branch_3x3.bn.running_mean.zero_()


@pytest.mark.parametrize('breakage', [_drop_post_norm, _drop_identity,
                                      _drop_1x1, _drop_3x3_norm_shift],
                         ids=lambda f: f.__name__)
def test_broken_fusion_fails_the_criterion(breakage):
    """A fusion that forgets one part (post-sum norm, identity, 1x1 branch,
    a norm's shift) is caught by the same criteria that pass above."""
    block = randomize_(QARepVGGBlock(8, 8, groups=2,
                                     without_branch_norm=False), 5).eval()
    x = torch.randn(2, 8, 7, 6)
    broken = copy.deepcopy(block)
    breakage(broken)  # the fused conv is computed from a damaged copy
    broken.switch_to_deploy()
    verdict = _fp32_verdict(block, broken, x)
    assert not verdict['passed'] and verdict['ratio'] > 100, verdict
    with torch.no_grad():
        err64 = relative_error(block.double()(x.double()),
                               broken.double()(x.double()))
    assert err64 > 1e-3


# ------------------------------------------------------ deploy and switch
def test_deploy_layout_same_as_repvgg_block():
    kwargs = dict(stride=1, groups=2, without_branch_norm=False,
                  se_cfg=dict(ratio=2))
    block = QARepVGGBlock(8, 8, **kwargs)
    x = torch.randn(2, 8, 6, 7)
    fused, _, out = _pair(block, x)
    deploy = QARepVGGBlock(8, 8, deploy=True, **kwargs).eval()
    assert deploy.deploy and not hasattr(deploy, 'branch_3x3')
    assert not hasattr(deploy, 'post_norm')
    deploy.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(deploy(x), out)
    # A deployed QARepVGGBlock is a deployed RepVGGBlock: same keys, same
    # shapes, same function.
    rep = RepVGGBlock(8, 8, deploy=True, **kwargs).eval()
    rep.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rep(x), out)


def test_switch_is_idempotent():
    block = randomize_(QARepVGGBlock(4, 4, without_branch_norm=False)).eval()
    block.switch_to_deploy()
    w = block.conv_reparam.weight.clone()
    block.switch_to_deploy()
    block.switch_to_deploy(test_cfg=dict())
    assert torch.equal(block.conv_reparam.weight, w)
    model = switch_to_deploy(nn.Sequential(block), verbose=False)
    assert torch.equal(model[0].conv_reparam.weight, w)


def test_switch_in_training_mode_warns():
    block = randomize_(QARepVGGBlock(4, 4))
    block.train()
    with pytest.warns(UserWarning, match='QARepVGGBlock.*training mode'):
        block.switch_to_deploy()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        block.switch_to_deploy()


def test_model_level_switch_mixed_blocks():
    model = nn.Sequential(
        QARepVGGBlock(3, 8, stride=2),
        nn.Sequential(RepVGGBlock(8, 8, without_branch_norm=False),
                      QARepVGGBlock(8, 8, without_branch_norm=False)),
        nn.Conv2d(8, 4, 1),
        QARepVGGBlock(4, 4, use_alpha=True, se_cfg=dict(ratio=2)))
    randomize_(model).eval()
    x = torch.randn(1, 3, 12, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = switch_to_deploy(model)
    assert mmrepvgg.count_reparam_blocks(fused) == dict(total=4, deployed=4)
    assert mmrepvgg.count_reparam_blocks(model) == dict(total=4, deployed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    _assert_fp32(model, fused, x)


def test_with_cp_matches_plain_training_forward():
    torch.manual_seed(0)
    a = QARepVGGBlock(4, 4, without_branch_norm=False, with_cp=True)
    b = copy.deepcopy(a)
    b.with_cp = False
    x1 = torch.randn(2, 4, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    a(x1).sum().backward()
    b(x2).sum().backward()
    # Checkpointing re-runs the same kernels on the same inputs.
    assert torch.equal(x1.grad, x2.grad)
    for name in ('branch_3x3.conv.weight', 'branch_1x1.conv.weight',
                 'post_norm.weight'):
        ga = dict(a.named_parameters())[name].grad
        gb = dict(b.named_parameters())[name].grad
        assert ga is not None and torch.equal(ga, gb), name


# ------------------------------------------------------------ serialization
def _fused_model():
    model = nn.Sequential(
        QARepVGGBlock(3, 8, stride=2, without_branch_norm=False),
        QARepVGGBlock(8, 8, without_branch_norm=False, se_cfg=dict(ratio=4)),
        QARepVGGBlock(8, 8, without_branch_norm=False))
    randomize_(model).eval()
    x = torch.randn(1, 3, 16, 12)
    fused = switch_to_deploy(model, verbose=False)
    _assert_fp32(model, fused, x)
    return fused, x


def test_switched_model_deepcopies_and_pickles(tmp_path):
    fused, x = _fused_model()
    with torch.no_grad():
        out = fused(x)
        clone = copy.deepcopy(fused)
        assert torch.equal(clone(x), out)
        clone[0].conv_reparam.weight.zero_()
        assert torch.equal(fused(x), out)
        path = tmp_path / 'model.pt'
        torch.save(fused, path)
        loaded = torch.load(path, weights_only=False)  # our own file
        assert torch.equal(loaded(x), out)
        assert loaded[0].deploy and loaded[0].forward.__self__ is loaded[0]


def test_training_form_deepcopies_and_pickles(tmp_path):
    block = randomize_(QARepVGGBlock(4, 4, without_branch_norm=False,
                                     use_alpha=True)).eval()
    x = torch.randn(1, 4, 5, 5)
    path = tmp_path / 'block.pt'
    torch.save(block, path)
    with torch.no_grad():
        out = block(x)
        assert torch.equal(copy.deepcopy(block)(x), out)
        assert torch.equal(torch.load(path, weights_only=False)(x), out)


def test_switched_model_jit_trace_and_script():
    fused, x = _fused_model()
    with torch.no_grad():
        out = fused(x)
        traced = torch.jit.trace(fused, x)
        scripted = torch.jit.script(fused)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
    assert out.shape == (1, 8, 8, 6)
    for other in (traced, scripted, loaded):
        _assert_fp32(fused, other, x)


def test_switched_model_onnx_export(tmp_path):
    onnx = pytest.importorskip('onnx')
    fused, x = _fused_model()
    model = nn.Sequential(fused[0], fused[2])  # no SE: conv + relu only
    path = tmp_path / 'm.onnx'
    torch.onnx.export(model, (x, ), str(path), dynamo=False,
                      input_names=['x'], output_names=['y'])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ['Conv', 'Relu', 'Conv', 'Relu'], ops
    ort = pytest.importorskip('onnxruntime')
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    y = torch.from_numpy(sess.run(None, {'x': x.numpy()})[0])
    _assert_fp32(model, lambda t: y, x)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize('kwargs,match', [
    (dict(norm_cfg=dict(type='GN', num_groups=2)), 'GN'),
    (dict(norm_cfg=dict(type='LN')), 'LN'),
    (dict(norm_cfg=dict(type='IN')), 'IN'),
    (dict(norm_cfg=dict(type='BN', track_running_stats=False)), 'BN'),
    (dict(norm_cfg=dict(type='NoSuchNorm')), 'norm_cfg'),
    (dict(norm_cfg='BN'), 'norm_cfg'),
    (dict(padding=1, dilation=2), 'padding'),
    (dict(groups=3), 'groups'),
    (dict(act_cfg=dict(type='NoSuchAct')), 'act_cfg'),
    (dict(padding_mode='mirror'), 'padding_mode'),
    (dict(stride=0), 'stride'),
    (dict(se_cfg=16), 'se_cfg'),
    (dict(post_norm_init=0), 'post_norm_init'),
    (dict(post_norm_init=2.0, norm_cfg=None), 'post_norm_init'),
    (dict(post_norm_init=2.0, norm_cfg=dict(type='BN', affine=False)),
     'affine'),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QARepVGGBlock(4, 8, **kwargs)


def test_registered_in_mmdet_registry():
    from mmdet.registry import MODELS
    block = MODELS.build(dict(type='QARepVGGBlock', in_channels=4,
                              out_channels=4, without_branch_norm=False))
    assert isinstance(block, QARepVGGBlock) and block.has_identity
    assert MODELS.get('QARepVGGBlock') is QARepVGGBlock
    assert not isinstance(block, RepVGGBlock)
