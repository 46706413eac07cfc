import copy

import pytest
import torch
import torch.nn as nn

from mmrepvgg import ARCH_SETTINGS, RepVGG, RepVGGBlock, switch_to_deploy
from mmrepvgg.testing import (assert_fp32_equivalent, fusion_errors,
                              randomize_, within_fp32_noise)

#: Published totals (deploy form, with the 1000-class classifier), millions,
#: from the RepVGG paper / official repository. B2g2 and B3g2 have no
#: published figure.
PUBLISHED_TOTAL_M = {
    'A0': 8.30, 'A1': 12.78, 'A2': 25.49, 'B0': 14.33, 'B1': 51.82,
    'B1g2': 41.36, 'B1g4': 36.12, 'B2': 80.31, 'B2g4': 55.77, 'B3': 110.96,
    'B3g4': 75.62, 'D2se': 120.39,
}
TINY_ARCH = dict(num_blocks=(1, 2, 2, 1), width_factor=(0.25, 0.25, 0.25, 0.5),
                 group_layer_map={2: 2, 4: 4})


def deploy_param_count(arch: str) -> int:
    with torch.device('meta'):
        model = RepVGG(arch, deploy=True)
    return sum(p.numel() for p in model.parameters())


def classifier_params(arch: str) -> int:
    return int(512 * ARCH_SETTINGS[arch]['width_factor'][3]) * 1000 + 1000


@pytest.mark.parametrize('arch', sorted(PUBLISHED_TOTAL_M))
def test_deploy_param_count_matches_published(arch):
    total = (deploy_param_count(arch) + classifier_params(arch)) / 1e6
    assert abs(total - PUBLISHED_TOTAL_M[arch]) <= 0.01, total


def test_training_form_has_more_params_than_deploy():
    with torch.device('meta'):
        train = RepVGG('A0')
    n_train = sum(p.numel() for p in train.parameters())
    assert n_train > deploy_param_count('A0')


@pytest.mark.parametrize('arch,channels', [
    ('A0', (48, 96, 192, 1280)), ('B1g4', (128, 256, 512, 2048)),
    ('D2se', (160, 320, 640, 2560))])
def test_stage_channels_and_strides(arch, channels):
    with torch.device('meta'):
        model = RepVGG(arch)
        outs = model(torch.empty(1, 3, 64, 96))
    assert tuple(model.out_channels) == channels
    assert [o.shape[1] for o in outs] == list(channels)
    assert [o.shape[2:] for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_group_layout_of_g4():
    model = RepVGG('B1g4', deploy=True)
    blocks = [model.stem] + [b for n in model.stage_names
                             for b in getattr(model, n)]
    groups = [b.groups for b in blocks]
    assert groups == [4 if i in range(2, 27, 2) else 1
                      for i in range(len(blocks))]


def test_d2se_blocks_have_se():
    with torch.device('meta'):
        model = RepVGG('D2se')
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 1 + 8 + 14 + 24 + 1
    assert all(not isinstance(b.se, nn.Identity) for b in blocks)


def test_out_indices_and_dilations():
    model = RepVGG(TINY_ARCH, out_indices=(1, 3), strides=(2, 2, 2, 1),
                   dilations=(1, 1, 1, 2)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert len(outs) == 2
    assert outs[0].shape[2:] == (8, 8) and outs[1].shape[2:] == (4, 4)


@pytest.mark.parametrize('arch', [TINY_ARCH, 'A0'])
def test_whole_backbone_equivalence(arch):
    model = randomize_(RepVGG(arch), seed=1).eval()
    x = torch.randn(2, 3, 64, 80)
    fused = switch_to_deploy(model, verbose=False)
    assert_fp32_equivalent(model, fused, x)
    with torch.no_grad():
        outs = fused(x)
    # A deploy-built backbone takes the converted state dict strictly.
    deploy = RepVGG(arch, deploy=True).eval()
    deploy.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        for o, d in zip(outs, deploy(x)):
            assert torch.equal(o, d)


def test_backbone_switch_method():
    model = randomize_(RepVGG(TINY_ARCH)).eval()
    x = torch.randn(1, 3, 32, 32)
    original = copy.deepcopy(model)
    with torch.no_grad():
        model.switch_to_deploy()
    assert model.deploy
    assert all(b.deploy for b in model.modules()
               if isinstance(b, RepVGGBlock))
    assert_fp32_equivalent(original, model, x)


def test_frozen_stages_and_norm_eval():
    model = RepVGG(TINY_ARCH, frozen_stages=1, norm_eval=False)
    model.train()
    for name, p in model.named_parameters():
        frozen = name.startswith(('stem.', 'stage_1.'))
        assert p.requires_grad != frozen, name
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            frozen = name.startswith(('stem.', 'stage_1.'))
            assert m.training != frozen, name
    # Frozen statistics do not move in a training step.
    stem_mean = model.stem.branch_3x3.norm.running_mean.clone()
    stage2_mean = model.stage_2[0].branch_3x3.norm.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    assert torch.equal(model.stem.branch_3x3.norm.running_mean, stem_mean)
    assert not torch.equal(model.stage_2[0].branch_3x3.norm.running_mean,
                           stage2_mean)
    assert model.stem.branch_3x3.conv.weight.grad is None
    assert model.stage_2[0].branch_3x3.conv.weight.grad is not None

    model = RepVGG(TINY_ARCH, frozen_stages=0, norm_eval=True).train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.stage_1.parameters())
    assert not any(m.training for m in model.modules()
                   if isinstance(m, nn.BatchNorm2d))
    assert model.stage_1[0].branch_3x3.conv.training


def test_with_cp_same_outputs_and_grads():
    torch.manual_seed(0)
    a = RepVGG(TINY_ARCH, with_cp=True).train()
    b = RepVGG(TINY_ARCH, with_cp=False).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    oa, ob = a(x), b(x)
    # Checkpointing re-runs the same kernels on the same inputs: bitwise
    # equal outputs and gradients on any CPU.
    for u, v in zip(oa, ob):
        assert torch.equal(u, v)
    sum(o.sum() for o in oa).backward()
    sum(o.sum() for o in ob).backward()
    ga = a.stage_2[0].branch_3x3.conv.weight.grad
    gb = b.stage_2[0].branch_3x3.conv.weight.grad
    assert ga is not None and torch.equal(ga, gb)


@pytest.mark.parametrize('kwargs,match', [
    (dict(arch='C9'), 'arch'),
    (dict(arch=dict(num_blocks=(1, 1))), 'width_factor'),
    (dict(out_indices=(4, )), 'out_indices'),
    (dict(frozen_stages=7), 'frozen_stages'),
    (dict(strides=(2, 2)), 'strides'),
])
def test_bad_backbone_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepVGG(**kwargs)


def test_build_from_mmdet_registry():
    from mmdet.registry import MODELS
    model = MODELS.build(dict(type='RepVGG', arch='A0', out_indices=(1, 2, 3)))
    assert isinstance(model, RepVGG) and model.out_indices == (1, 2, 3)


@pytest.mark.parametrize('arch', ['A0', 'B1g4'])
def test_fusion_errors_fast(arch):
    """Exact float64 fusion per block; the float32 deploy form no further
    from the float64 truth than a few times the training form's own float32
    error, measured in the same run (never a fixed float32 number)."""
    model = randomize_(RepVGG(arch), seed=2).eval()
    errs = fusion_errors(model, torch.randn(1, 3, 64, 64))
    assert errs['block_fp64'] <= 1e-12, errs
    assert errs['floor_fp32'] > 0, errs  # float32 really was measured
    assert within_fp32_noise(errs), errs


@pytest.mark.slow
@pytest.mark.parametrize('arch', sorted(ARCH_SETTINGS))
def test_fusion_errors_all_archs(arch):
    """Fusion is exact (float64) for every block of every arch; the float32
    whole-backbone error stays within the float32 noise of the network
    itself (D2se's 47 random SE blocks are chaotic: see the README)."""
    model = randomize_(RepVGG(arch), seed=0).eval()
    errs = fusion_errors(model, torch.randn(1, 3, 64, 64))
    assert errs['block_fp64'] <= 1e-12, errs
    assert within_fp32_noise(errs), errs


# ------------------------------------------------ block choice (QARepVGG)
QA = dict(type='QARepVGGBlock')


def _blocks_of(model):
    return [model.stem] + [b for n in model.stage_names
                           for b in getattr(model, n)]


@pytest.mark.parametrize('arch', sorted(ARCH_SETTINGS))
def test_every_arch_builds_with_either_block(arch):
    from mmrepvgg import QARepVGGBlock
    with torch.device('meta'):
        qa = RepVGG(arch, block_cfg=QA)
        rep = RepVGG(arch)
        qa_deploy = RepVGG(arch, deploy=True, block_cfg=QA)
        rep_deploy = RepVGG(arch, deploy=True)
    blocks = _blocks_of(qa)
    assert all(type(b) is QARepVGGBlock for b in blocks)
    assert [(b.in_channels, b.out_channels, b.stride, b.groups)
            for b in blocks] == [(b.in_channels, b.out_channels, b.stride,
                                  b.groups) for b in _blocks_of(rep)]
    # Identity exactly where RepVGG has its identity norm.
    assert [b.has_identity for b in blocks] == [
        b.branch_norm is not None for b in _blocks_of(rep)]
    assert all(b.post_norm is not None for b in blocks)
    # Same deploy form: same keys and shapes, so the published deploy
    # parameter counts hold for QARepVGG too.
    assert {k: v.shape for k, v in qa_deploy.state_dict().items()} == {
        k: v.shape for k, v in rep_deploy.state_dict().items()}
    if ARCH_SETTINGS[arch]['se_cfg']:
        assert all(not isinstance(b.se, nn.Identity) for b in blocks)


def test_qarepvgg_backbone_fusion_and_strict_reload():
    from mmrepvgg.testing import fusion_errors, within_fp32_noise
    model = randomize_(RepVGG(TINY_ARCH, block_cfg=QA), seed=3).eval()
    assert any(k.endswith('post_norm.running_var')
               for k in model.state_dict())
    x = torch.randn(2, 3, 32, 48)
    errs = fusion_errors(model, x)  # switches ``model`` in place
    assert errs['block_fp64'] <= 1e-12, errs
    assert within_fp32_noise(errs), errs
    assert all(b.deploy for b in _blocks_of(model))
    # Strict reload into a deploy build of either block type.
    for block_cfg in (QA, None):
        deploy = RepVGG(TINY_ARCH, deploy=True, block_cfg=block_cfg).eval()
        deploy.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            for a, b in zip(model(x), deploy(x)):
                assert torch.equal(a, b)


def test_qarepvgg_a0_fusion_errors_fast():
    from mmrepvgg.testing import fusion_errors, within_fp32_noise
    model = randomize_(RepVGG('A0', block_cfg=QA), seed=2).eval()
    errs = fusion_errors(model, torch.randn(1, 3, 64, 64))
    assert errs['block_fp64'] <= 1e-12, errs
    assert within_fp32_noise(errs), errs


def test_broken_qarepvgg_fusion_fails_the_backbone_criterion(monkeypatch):
    """Folding everything but the post-sum norm is caught by the same
    float32 criterion and by the float64 per-block check."""
    from mmrepvgg import QARepVGGBlock
    from mmrepvgg.testing import fusion_errors, within_fp32_noise
    original = QARepVGGBlock._kernel_bias_f64

    def without_post_norm(self):
        post, self.post_norm = self.post_norm, None
        try:
            return original(self)
        finally:
            self.post_norm = post

    monkeypatch.setattr(QARepVGGBlock, '_kernel_bias_f64', without_post_norm)
    model = randomize_(RepVGG(TINY_ARCH, block_cfg=QA), seed=3).eval()
    errs = fusion_errors(model, torch.randn(1, 3, 32, 32))
    assert errs['block_fp64'] > 1e-3, errs
    assert not within_fp32_noise(errs), errs


def test_qarepvgg_backbone_detection_options():
    model = RepVGG(TINY_ARCH, block_cfg=QA, frozen_stages=1,
                   norm_eval=True, out_indices=(1, 3)).train()
    for name, p in model.named_parameters():
        assert p.requires_grad != name.startswith(('stem.', 'stage_1.')), name
    # norm_eval covers the post-sum norms too.
    norms = [m for n, m in model.named_modules() if n.endswith('post_norm')]
    assert norms and not any(m.training for m in norms)
    outs = model(torch.randn(1, 3, 32, 32))
    assert len(outs) == 2
    # with_cp: same outputs and gradients.
    a = RepVGG(TINY_ARCH, block_cfg=QA, with_cp=True).train()
    b = RepVGG(TINY_ARCH, block_cfg=QA).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    oa, ob = a(x), b(x)
    for u, v in zip(oa, ob):
        assert torch.equal(u, v)
    sum(o.sum() for o in oa).backward()
    sum(o.sum() for o in ob).backward()
    ga = a.stage_2[0].branch_1x1.conv.weight.grad
    assert ga is not None and torch.equal(
        ga, b.stage_2[0].branch_1x1.conv.weight.grad)


def test_block_cfg_options_and_deploy_twin_form():
    model = RepVGG(TINY_ARCH, block_cfg=dict(type='QARepVGGBlock',
                                             use_alpha=True))
    assert all(b.alpha is not None for b in _blocks_of(model))
    # A deploy twin config sets deploy=True everywhere, block_cfg included.
    model = RepVGG(TINY_ARCH, deploy=True,
                   block_cfg=dict(type='QARepVGGBlock', deploy=True))
    assert model.deploy and all(b.deploy for b in _blocks_of(model))
    # Default and explicit RepVGGBlock: the historical keys.
    keys = set(RepVGG(TINY_ARCH).state_dict())
    assert keys == set(RepVGG(TINY_ARCH,
                              block_cfg=dict(type='RepVGGBlock')).state_dict())
    assert keys != set(RepVGG(TINY_ARCH, block_cfg=QA).state_dict())


@pytest.mark.parametrize('block_cfg,match', [
    (dict(type='NoSuchBlock'), 'NoSuchBlock'),
    ('QARepVGGBlock', 'block_cfg'),
    (dict(type='QARepVGGBlock', stride=2), 'stride'),
    (dict(type='QARepVGGBlock', se_cfg=dict(ratio=4)), 'se_cfg'),
    (dict(type='QARepVGGBlock', deploy=True), 'deploy'),
    (dict(type='QARepVGGBlock', norm_cfg=dict(type='SyncBN')), 'norm_cfg'),
])
def test_bad_block_cfg(block_cfg, match):
    with pytest.raises(ValueError, match=match):
        RepVGG(TINY_ARCH, block_cfg=block_cfg)


def test_qarepvgg_backbone_from_mmdet_registry():
    from mmdet.registry import MODELS

    from mmrepvgg import QARepVGGBlock
    model = MODELS.build(dict(type='RepVGG', arch='A0', out_indices=(1, 2, 3),
                              block_cfg=dict(type='QARepVGGBlock')))
    assert isinstance(model.stage_4[0], QARepVGGBlock)


def test_builds_under_any_default_scope():
    """A runner whose default scope is not mmdet (e.g. 'mmengine') still
    builds the blocks of backbone and neck from mmdet's registry."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    # (tests/conftest.py restores the current scope after the test)
    scope = DefaultScope.get_instance('test_builds_under_any_default_scope',
                                      scope_name='mmengine')
    assert DefaultScope.get_current_instance() is scope
    RepVGG(TINY_ARCH)
    MODELS.build(dict(type='RepVGGFPN', in_channels=[16, 32],
                      out_channels=16, num_outs=2, _scope_='mmdet',
                      block_cfg=dict(type='RepVGGBlock')))
