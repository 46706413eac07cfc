"""Every config in configs/ loads, builds, runs, and switches exactly."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmrepvgg
from mmrepvgg.apis.convert import collect_outputs, make_inputs, verify_models
from mmrepvgg.deploy.verify import describe
from mmrepvgg.testing import randomize_

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
#: Folders of detection configs; each X.py has its twin in deploy/X.py.
CONFIG_DIRS = ('repvgg', 'qarepvgg', 'neon_trees')
ALL_CONFIGS = sorted(
    [p for d in CONFIG_DIRS
     for p in glob.glob(osp.join(ROOT, 'configs', d, '*.py'))] +
    glob.glob(osp.join(ROOT, 'configs', 'toy', '*.py')))
#: Baselines without RepVGG blocks (mmdet's ResNet-18 on the tree crowns).
BASELINES = [p for p in ALL_CONFIGS if 'repvgg' not in osp.basename(p)]
TRAIN_CONFIGS = [p for p in ALL_CONFIGS if p not in BASELINES]


def assert_identical(ref, new):
    """The same outputs, bit for bit; a non-finite value never matches."""
    assert list(ref) == list(new)
    for k, a in ref.items():
        assert torch.isfinite(a).all() and torch.equal(a, new[k]), k


def _build(path):
    from mmdet.registry import MODELS
    cfg = Config.fromfile(path)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    return cfg, MODELS.build(cfg.model)


def test_configs_found():
    names = {osp.basename(p) for p in TRAIN_CONFIGS}
    for prefix in ('retinanet_repvgg-a0', 'fcos_repvgg-a0', 'atss_repvgg-a0',
                   'faster-rcnn_repvgg-a0', 'retinanet_repvgg-b1g2',
                   'faster-rcnn_repvgg-b1g2'):
        assert any(n.startswith(prefix) for n in names), prefix
    assert any('syncbn' in n for n in names)
    assert any('repvgg-fpn' in n for n in names)
    for prefix in ('retinanet_qarepvgg-a0', 'atss_qarepvgg-a0',
                   'retinanet_qarepvgg-tiny_qarepvgg-fpn_toy'):
        assert any(n.startswith(prefix) for n in names), prefix
    assert [osp.basename(p) for p in BASELINES] == [
        'atss_r18_fpn_neon-trees.py']


@pytest.mark.parametrize('path', BASELINES, ids=osp.basename)
def test_baseline_config_builds_and_runs(path):
    """A baseline shares everything but the backbone with its RepVGG
    sibling, and switching it is a no-op."""
    cfg, model = _build(path)
    sibling, _ = _build(path.replace('r18', 'repvgg-a0'))
    for key in ('bbox_head', 'train_cfg', 'test_cfg'):
        assert cfg.model[key] == sibling.model[key], key
    for key in ('train_dataloader', 'val_dataloader', 'optim_wrapper',
                'param_scheduler', 'train_cfg', 'val_evaluator'):
        assert cfg[key] == sibling[key], key
    neck = {k: v for k, v in cfg.model.neck.items() if k != 'in_channels'}
    assert neck == {k: v for k, v in sibling.model.neck.items()
                    if k != 'in_channels'}
    randomize_(model, seed=0).eval()
    x, samples = make_inputs((64, 96))
    assert mmrepvgg.count_reparam_blocks(model)['total'] == 0
    same = mmrepvgg.switch_to_deploy(model, verbose=False)
    assert_identical(collect_outputs(model, x, samples),
                     collect_outputs(same, x, samples))


@pytest.mark.parametrize('path', TRAIN_CONFIGS, ids=osp.basename)
def test_config_builds_runs_and_switches(path, dist_world1):
    cfg, model = _build(path)
    assert cfg.custom_imports['imports'] == ['mmrepvgg']
    if 'syncbn' in path:  # SyncBN only runs distributed; check, then use BN
        assert cfg.model.backbone.norm_cfg.type == 'SyncBN'
        from torch.nn.modules.batchnorm import SyncBatchNorm
        assert any(isinstance(m, SyncBatchNorm) for m in model.modules())
    blocks = {type(m).__name__ for m in model.modules()
              if hasattr(m, 'get_equivalent_kernel_bias')}
    # qarepvgg configs: every block quantization-friendly, and vice versa.
    qa = 'qarepvgg' in osp.basename(path)
    assert blocks == {'QARepVGGBlock' if qa else 'RepVGGBlock'}, blocks
    randomize_(model, seed=0).eval()
    x, samples = make_inputs((64, 96))
    fused = mmrepvgg.switch_to_deploy(model, verbose=False)
    counts = mmrepvgg.count_reparam_blocks(fused)
    assert counts['total'] > 0 and counts['deployed'] == counts['total']
    # Every backbone/neck/head output within the detector's own float32
    # noise against its float64 evaluation (never a fixed float32 number).
    verdict = verify_models(model, fused, x, samples)
    assert verdict['passed'], describe(verdict)

    if 'toy' in path:
        return
    twin = osp.join(osp.dirname(path), 'deploy', osp.basename(path))
    assert osp.isfile(twin), f'{twin}: deploy twin missing'
    _, deployed = _build(twin)
    assert mmrepvgg.count_reparam_blocks(deployed) == dict(
        total=counts['total'], deployed=counts['total'])
    deployed.load_state_dict(fused.state_dict(), strict=True)
    deployed.eval()
    assert_identical(collect_outputs(fused, x, samples),
                     collect_outputs(deployed, x, samples))


def test_deploy_twins_have_a_training_config():
    for d in CONFIG_DIRS:
        twins = glob.glob(osp.join(ROOT, 'configs', d, 'deploy', '*.py'))
        assert twins, d
        for twin in twins:
            assert osp.isfile(osp.join(ROOT, 'configs', d,
                                       osp.basename(twin))), twin
