import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn

import mmrepvgg
from mmrepvgg import RepVGGBlock, switch_to_deploy
from mmrepvgg.testing import (assert_fp32_equivalent, randomize_,
                              relative_error)

#: float64 fusion is exact up to float64 rounding. Float32 results are never
#: compared with a fixed number: see mmrepvgg.deploy.verify.
TOL64 = 1e-12


def _pair(block, x, seed=0):
    """Randomize, eval, convert a copy, and assert equal outputs: float64
    to TOL64, float32 within the block's own float32 noise."""
    randomize_(block, seed)
    block.eval()
    with torch.no_grad():
        ref = block(x)
        fused = switch_to_deploy(block, verbose=False)
        out = fused(x)
    assert out.shape == ref.shape
    if x.dtype == torch.float64:
        err = relative_error(ref, out)
        assert err <= TOL64, err
    else:
        assert_fp32_equivalent(block, fused, x)
    return fused, ref, out


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilation', [1, 2])
@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('identity', [True, False])
def test_equivalence_grid(stride, dilation, groups, identity):
    block = RepVGGBlock(8, 8, stride=stride, padding=dilation,
                        dilation=dilation, groups=groups,
                        without_branch_norm=not identity)
    assert (block.branch_norm is not None) == (identity and stride == 1)
    x = torch.randn(2, 8, 9, 11)
    fused, _, _ = _pair(block, x)
    assert fused.deploy and isinstance(fused.conv_reparam, nn.Conv2d)
    for name in ('branch_3x3', 'branch_1x1', 'branch_norm'):
        assert not hasattr(fused, name)


@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect', 'replicate',
                                          'circular'])
@pytest.mark.parametrize('padding,dilation', [(1, 1), (2, 1), (2, 2)])
def test_equivalence_padding_modes(padding_mode, padding, dilation):
    block = RepVGGBlock(4, 4, padding=padding, dilation=dilation,
                        padding_mode=padding_mode, without_branch_norm=False)
    fused, _, _ = _pair(block, torch.randn(1, 4, 7, 10))
    assert fused.conv_reparam.padding_mode == padding_mode


def test_equivalence_se_alpha_channels_change():
    block = RepVGGBlock(6, 12, stride=2, se_cfg=dict(ratio=4),
                        use_alpha=True)
    fused, _, _ = _pair(block, torch.randn(2, 6, 10, 7))
    assert not hasattr(fused, 'alpha')
    # SE pools adaptively: any input size works after the switch.
    assert fused(torch.randn(1, 6, 5, 13)).shape == (1, 12, 3, 7)


def test_alpha_is_applied():
    block = RepVGGBlock(4, 4, use_alpha=True, without_branch_norm=False)
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
    block = RepVGGBlock(4, 4, act_cfg=act, without_branch_norm=False)
    _pair(block, torch.randn(1, 4, 6, 6))


def test_norm_cfg_none_uses_conv_bias():
    block = RepVGGBlock(4, 8, norm_cfg=None)
    assert block.branch_3x3.conv.bias is not None
    _pair(block, torch.randn(1, 4, 6, 6))


@pytest.mark.parametrize('norm', ['BN', 'SyncBN', 'MMSyncBN'])
def test_equivalence_norm_types(norm, dist_world1):
    import mmcv.ops  # noqa: F401  (registers MMSyncBN)
    block = RepVGGBlock(4, 4, norm_cfg=dict(type=norm),
                        without_branch_norm=False)
    _pair(block, torch.randn(2, 4, 6, 5))


def test_equivalence_float64():
    block = RepVGGBlock(8, 8, groups=2, without_branch_norm=False,
                        use_alpha=True).double()
    fused, _, out = _pair(block, torch.randn(2, 8, 7, 9, dtype=torch.float64))
    assert fused.conv_reparam.weight.dtype == torch.float64
    assert out.dtype == torch.float64


def test_equivalent_kernel_matches_plain_conv():
    block = RepVGGBlock(4, 4, without_branch_norm=False)
    randomize_(block, 7).eval()
    k, b = block.get_equivalent_kernel_bias()
    x = torch.randn(1, 4, 5, 5)
    assert_fp32_equivalent(
        block, lambda t: block.act(nn.functional.conv2d(t, k, b, padding=1)),
        x)
    # In float64 the kernel is exact.
    block64 = copy.deepcopy(block).double()
    k64, b64 = block64.get_equivalent_kernel_bias()
    x64 = x.double()
    with torch.no_grad():
        ref = block64(x64)
        out = block64.act(nn.functional.conv2d(x64, k64, b64, padding=1))
    assert relative_error(ref, out) <= TOL64


def test_get_equivalent_kernel_bias_is_differentiable():
    block = RepVGGBlock(4, 4, without_branch_norm=False, use_alpha=True)
    randomize_(block)
    k, b = block.get_equivalent_kernel_bias()
    assert k.dtype == torch.float32 and k.requires_grad
    (k.sum() + b.sum()).backward()
    for name in ('branch_3x3.conv.weight', 'branch_1x1.conv.weight',
                 'branch_3x3.bn.weight', 'branch_norm.bias', 'alpha'):
        grad = dict(block.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_deploy_built_block_loads_switched_state_dict_strict():
    kwargs = dict(stride=1, groups=2, without_branch_norm=False,
                  se_cfg=dict(ratio=2))
    block = RepVGGBlock(8, 8, **kwargs)
    x = torch.randn(2, 8, 6, 7)
    fused, _, out = _pair(block, x)
    deploy = RepVGGBlock(8, 8, deploy=True, **kwargs).eval()
    assert deploy.deploy and not hasattr(deploy, 'branch_3x3')
    deploy.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(deploy(x), out)


def test_switch_is_idempotent():
    block = randomize_(RepVGGBlock(4, 4, without_branch_norm=False)).eval()
    block.switch_to_deploy()
    w = block.conv_reparam.weight.clone()
    block.switch_to_deploy()
    block.switch_to_deploy(test_cfg=dict())
    assert torch.equal(block.conv_reparam.weight, w)
    model = switch_to_deploy(nn.Sequential(block), verbose=False)
    assert torch.equal(model[0].conv_reparam.weight, w)


def test_switch_in_training_mode_warns():
    block = randomize_(RepVGGBlock(4, 4))
    block.train()
    with pytest.warns(UserWarning, match='training mode'):
        block.switch_to_deploy()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        block.switch_to_deploy()  # already deployed: no second warning


def test_model_level_switch_not_inplace_leaves_original():
    model = nn.Sequential(
        RepVGGBlock(3, 8, stride=2),
        nn.Sequential(RepVGGBlock(8, 8, without_branch_norm=False),
                      nn.Conv2d(8, 4, 1)),
        RepVGGBlock(4, 4, use_alpha=True))
    randomize_(model).eval()
    x = torch.randn(1, 3, 12, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
    fused = switch_to_deploy(model)
    assert fused is not model
    assert mmrepvgg.count_reparam_blocks(fused) == dict(total=3, deployed=3)
    assert mmrepvgg.count_reparam_blocks(model) == dict(total=3, deployed=0)
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not fused.training
    assert_fp32_equivalent(model, fused, x)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    same = switch_to_deploy(model, inplace=True, verbose=False)
    assert same is model and model[0].deploy


def test_with_cp_matches_plain_training_forward():
    torch.manual_seed(0)
    a = RepVGGBlock(4, 4, without_branch_norm=False, with_cp=True)
    b = copy.deepcopy(a)
    b.with_cp = False
    x1 = torch.randn(2, 4, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    a(x1).sum().backward()
    b(x2).sum().backward()
    # Checkpointing re-runs the same kernels on the same inputs: the
    # gradients are bitwise equal, whatever the CPU.
    assert torch.equal(x1.grad, x2.grad)
    ga = a.branch_3x3.conv.weight.grad
    gb = b.branch_3x3.conv.weight.grad
    assert torch.equal(ga, gb)


# ------------------------------------------------------------ serialization
def _fused_model():
    model = nn.Sequential(
        RepVGGBlock(3, 8, stride=2, without_branch_norm=False),
        RepVGGBlock(8, 8, without_branch_norm=False, se_cfg=dict(ratio=4)),
        RepVGGBlock(8, 8, without_branch_norm=False))
    randomize_(model).eval()
    x = torch.randn(1, 3, 16, 12)
    fused = switch_to_deploy(model, verbose=False)
    assert_fp32_equivalent(model, fused, x)
    with torch.no_grad():
        ref = model(x)
    return fused, x, ref


def _assert_same_function(fused, other, x):
    """``other`` (traced, scripted, compiled) runs the fused model's own
    kernels: judged, like everything in float32, by the float64 truth."""
    assert_fp32_equivalent(fused, other, x)


def test_switched_model_deepcopies_and_pickles(tmp_path):
    fused, x, ref = _fused_model()
    with torch.no_grad():
        out = fused(x)
        clone = copy.deepcopy(fused)
        assert torch.equal(clone(x), out)
        # The copy's forward is bound to the copy, not the original.
        clone[0].conv_reparam.weight.zero_()
        assert torch.equal(fused(x), out)
        path = tmp_path / 'model.pt'
        torch.save(fused, path)
        loaded = torch.load(path, weights_only=False)  # our own file
        assert torch.equal(loaded(x), out)
        assert loaded[0].deploy and loaded[0].forward.__self__ is loaded[0]


def test_switched_model_jit_trace_and_script():
    fused, x, _ = _fused_model()
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)
        _assert_same_function(fused, traced, x)
        scripted = torch.jit.script(fused)
        _assert_same_function(fused, scripted, x)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        _assert_same_function(fused, torch.jit.load(buf), x)


def test_switched_model_torch_compile():
    fused, x, _ = _fused_model()
    with torch.no_grad():
        compiled = torch.compile(fused, backend='aot_eager', fullgraph=True)
        _assert_same_function(fused, compiled, x)


def test_switched_model_onnx_export(tmp_path):
    onnx = pytest.importorskip('onnx')
    fused, x, _ = _fused_model()
    model = nn.Sequential(fused[0], fused[2])  # no SE: conv + relu only
    path = tmp_path / 'm.onnx'
    torch.onnx.export(model, (x, ), str(path), dynamo=False,
                      input_names=['x'], output_names=['y'])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ['Conv', 'Relu', 'Conv', 'Relu'], ops


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize('kwargs,match', [
    (dict(norm_cfg=dict(type='GN', num_groups=2)), 'GN'),
    (dict(norm_cfg=dict(type='LN')), 'LN'),
    (dict(norm_cfg=dict(type='BN', track_running_stats=False)), 'BN'),
    (dict(norm_cfg=dict(type='NoSuchNorm')), 'norm_cfg'),
    (dict(padding=1, dilation=2), 'padding'),
    (dict(groups=3), 'groups'),
    (dict(act_cfg=dict(type='NoSuchAct')), 'act_cfg'),
    (dict(padding_mode='mirror'), 'padding_mode'),
    (dict(stride=0), 'stride'),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepVGGBlock(4, 8, **kwargs)


def test_registered_in_mmdet_registry():
    from mmdet.registry import MODELS
    block = MODELS.build(dict(type='RepVGGBlock', in_channels=4,
                              out_channels=4))
    assert isinstance(block, RepVGGBlock)
    assert MODELS.get('RepVGGBlock') is RepVGGBlock
