"""tools/model_converters/import_checkpoint.py: official / mmpretrain / timm
RepVGG weights ->
mmrepvgg RepVGG backbone weights.

Source checkpoints are built here, without downloads:

* by walking a randomized reference ``RepVGG`` block by block (through its
  modules, not its state-dict keys) and writing each tensor under the name
  the source code base gives it (key names checked against DingXiaoH/RepVGG
  repvgg.py, mmpretrain repvgg.py and timm byobnet.py ``RepVggBlock``);
* independently, from a small re-implementation of the official RepVGG
  module layout (``stage0..4``, ``rbr_dense`` / ``rbr_1x1`` /
  ``rbr_identity``, ``se.down`` / ``se.up``) whose forward is compared with
  the imported backbone.
"""
import argparse
import importlib.util
import os
import os.path as osp
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrepvgg import ARCH_SETTINGS, RepVGG, switch_to_deploy
from mmrepvgg.apis.import_checkpoint import (CheckpointImportError,
                                             import_state_dict)
from mmrepvgg.deploy import load_checkpoint
from mmrepvgg.testing import assert_fp32_equivalent, randomize_

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOL = osp.join(ROOT, 'tools', 'model_converters',
                'import_checkpoint.py')
#: Tiny arch with groups and SE (hidden = channels // 16 >= 1 everywhere).
SE_ARCH = dict(num_blocks=(1, 2, 2, 1), width_factor=(0.25, 0.25, 0.25, 0.5),
               group_layer_map={2: 2, 4: 4}, se_cfg=dict(ratio=16))
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _load_tool():
    spec = importlib.util.spec_from_file_location('import_checkpoint_tool',
                                                  TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()

# ----------------------------------------------------- source-format layouts
BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
LAYOUTS = {
    # DingXiaoH/RepVGG repvgg.py
    'official': dict(
        stem='stage0', stage='stage{n}.{m}', conv3='rbr_dense.conv',
        norm3='rbr_dense.bn', conv1='rbr_1x1.conv', norm1='rbr_1x1.bn',
        ident='rbr_identity', fused='rbr_reparam', se_down='se.down',
        se_up='se.up', head='linear'),
    # mmpretrain models/backbones/repvgg.py inside an ImageClassifier
    'mmpretrain': dict(
        stem='backbone.stem', stage='backbone.stage_{n}.{m}',
        conv3='branch_3x3.conv', norm3='branch_3x3.norm',
        conv1='branch_1x1.conv', norm1='branch_1x1.norm', ident='branch_norm',
        fused='branch_reparam', se_down='se_layer.conv1.conv',
        se_up='se_layer.conv2.conv', head='head.fc'),
    # timm models/byobnet.py ByobNet with RepVggBlock stem and stages
    'timm': dict(
        stem='stem', stage='stages.{n0}.{m}', conv3='conv_kxk.conv',
        norm3='conv_kxk.bn', conv1='conv_1x1.conv', norm1='conv_1x1.bn',
        ident='identity', fused='reparam_conv', se_down='attn.fc1',
        se_up='attn.fc2', head='head.fc'),
}


def _blocks(model):
    yield None, None, model.stem
    for n, name in enumerate(model.stage_names, 1):
        for m, block in enumerate(getattr(model, name)):
            yield n, m, block


def _conv(m):
    return getattr(m, 'conv', m)


def to_source(model, fmt, head=True):
    """State dict of ``model`` under the key names of ``fmt``."""
    lay = LAYOUTS[fmt]
    sd = OrderedDict()
    for n, m, b in _blocks(model):
        unit = lay['stem'] if n is None else lay['stage'].format(
            n=n, n0=n - 1, m=m)

        def put(role, tensors):
            for field, t in tensors.items():
                sd[f'{unit}.{lay[role]}.{field}'] = t.detach().clone()

        if b.deploy:
            put('fused', dict(weight=b.conv_reparam.weight,
                              bias=b.conv_reparam.bias))
        else:
            put('conv3', dict(weight=b.branch_3x3.conv.weight))
            put('norm3', b.branch_3x3.norm.state_dict())
            put('conv1', dict(weight=b.branch_1x1.conv.weight))
            put('norm1', b.branch_1x1.norm.state_dict())
            if b.branch_norm is not None:
                put('ident', b.branch_norm.state_dict())
        if not isinstance(b.se, nn.Identity):
            down, up = _conv(b.se.squeeze), _conv(b.se.excite)
            put('se_down', dict(weight=down.weight, bias=down.bias))
            put('se_up', dict(weight=up.weight, bias=up.bias))
    if head:
        c = model.out_channels[-1]
        sd[f'{lay["head"]}.weight'] = torch.randn(10, c)
        sd[f'{lay["head"]}.bias'] = torch.randn(10)
    return sd


def _wrap(sd, wrapper):
    if wrapper == 'bare':
        return sd
    if wrapper == 'module':
        return {'state_dict': OrderedDict(
            ('module.' + k, v) for k, v in sd.items()), 'epoch': 3}
    if wrapper == 'state_dict':
        return {'meta': {'epoch': 100}, 'state_dict': sd}
    return {'model': sd}


# ------------------------------------------------------------------ helpers
def run_tool(capsys, *args):
    rc = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def load_out(path, arch, deploy):
    ckpt = load_checkpoint(str(path))
    model = RepVGG(arch, deploy=deploy)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    return model.eval(), ckpt['meta']['mmrepvgg']


def assert_same_features(ref, model, x=X):
    ref.eval()
    model.eval()
    with torch.no_grad():
        a, b = ref(x), model(x)
    assert len(a) == len(b) == 4
    for u, v in zip(a, b):
        assert u.shape == v.shape
    # Two float32 implementations of one function: judged against the
    # source model in float64, by its own float32 noise (any CPU).
    assert_fp32_equivalent(ref, model, x)


def assert_failed(rc, err, tmp_path, *needles, keep=()):
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'Traceback' not in err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert not (tmp_path / 'out.pth').exists()
    # No temporary file left behind by the atomic writer.
    assert sorted(os.listdir(tmp_path)) == sorted(keep), os.listdir(tmp_path)


@pytest.fixture(scope='module')
def a0():
    """(training, fused) randomized reference A0 backbones."""
    ref = randomize_(RepVGG('A0'), seed=3).eval()
    return ref, switch_to_deploy(ref, verbose=False)


@pytest.fixture(scope='module')
def se_tiny():
    ref = randomize_(RepVGG(SE_ARCH), seed=5).eval()
    return ref, switch_to_deploy(ref, verbose=False)


# ----------------------------------------------------- formats (round trip)
@pytest.mark.parametrize('fmt,deploy,wrapper', [
    ('official', False, 'bare'),
    ('official', True, 'module'),
    ('mmpretrain', False, 'state_dict'),
    ('mmpretrain', True, 'state_dict'),
    ('timm', False, 'model'),
    ('timm', True, 'bare'),
])
def test_import_a0(a0, tmp_path, capsys, fmt, deploy, wrapper):
    ref, fused = a0
    src = tmp_path / 'src.pth'
    torch.save(_wrap(to_source(fused if deploy else ref, fmt), wrapper), src)
    rc, out, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert rc == 0, err
    assert f'source format : {fmt}' in out and "'A0'" in out
    model, meta = load_out(tmp_path / 'out.pth', 'A0', deploy)
    assert meta['source_format'] == fmt and meta['arch'] == 'A0'
    assert meta['deploy'] is deploy and meta['version']
    assert meta['source_checkpoint'] == str(src)
    assert meta['dropped_keys'] and all(
        k.split('.')[0] in ('linear', 'head') for k in meta['dropped_keys'])
    assert_same_features(fused if deploy else ref, model)
    if deploy:  # and the fused import computes what the training form does
        assert_same_features(ref, model)


def test_import_b1g4_grouped(tmp_path, capsys):
    # Convs keep their (random) default init; only the norms are randomized
    # (default statistics would hide a wrong mapping): randomizing all of
    # B1g4's 40M weights in float64 would dominate this file's run time.
    ref = RepVGG('B1g4').eval()
    norms = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, m in enumerate(norms):
        randomize_(m, seed=i)
    src = tmp_path / 'src.pth'
    torch.save(_wrap(to_source(ref, 'official'), 'state_dict'), src)
    rc, out, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert rc == 0, err
    model, meta = load_out(tmp_path / 'out.pth', 'B1g4', False)
    assert meta['arch'] == 'B1g4'
    assert model.stage_1[1].groups == 4 and model.stage_1[0].groups == 1
    assert_same_features(ref, model)


@pytest.mark.parametrize('fmt,deploy', [
    ('official', False), ('mmpretrain', False), ('timm', False),
    ('official', True), ('timm', True)])
def test_import_se_grouped_arch_dict(se_tiny, tmp_path, capsys, fmt, deploy):
    """SE and groups on a tiny arch: refused by the tool (no published
    arch), imported by the library with the arch dict forced."""
    ref, fused = se_tiny
    src = tmp_path / 'src.pth'
    torch.save(to_source(fused if deploy else ref, fmt), src)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, 'no published RepVGG arch',
                  keep=['src.pth'])
    state, info = import_state_dict(to_source(fused if deploy else ref, fmt),
                                    arch=SE_ARCH, fmt=fmt)
    assert info['format'] == fmt and info['deploy'] is deploy
    model = RepVGG(SE_ARCH, deploy=deploy)
    model.load_state_dict(state, strict=True)
    assert_same_features(fused if deploy else ref, model)


@pytest.mark.parametrize('arch', list(ARCH_SETTINGS))
def test_detects_every_published_arch(arch):
    """Shapes alone identify each arch (groups g2/g4, SE of D2se): checked
    on the meta device, so even D2se costs no memory."""
    fmt = ('official', 'mmpretrain', 'timm')[len(arch) % 3]
    for deploy in (False, True):
        with torch.device('meta'):
            model = RepVGG(arch, deploy=deploy)
        state, info = import_state_dict(
            {'state_dict': to_source(model, fmt, head=False)})
        assert info['arch'] == arch and info['format'] == fmt
        assert info['deploy'] is deploy
        assert list(state) == list(model.state_dict())


def test_d2se_se_keys_map_onto_backbone():
    with torch.device('meta'):
        model = RepVGG('D2se')
    src = to_source(model, 'official')
    assert 'stage0.se.down.weight' in src and 'stage4.0.se.up.bias' in src
    state, info = import_state_dict(src)
    assert info['arch'] == 'D2se' and info['dropped'] == ['linear.weight',
                                                          'linear.bias']
    for key, t in model.state_dict().items():
        assert state[key].shape == t.shape


def test_pretrained_init_cfg_and_prefix(a0, tmp_path, capsys):
    ref, _ = a0
    src = tmp_path / 'src.pth'
    torch.save(to_source(ref, 'official'), src)
    out = tmp_path / 'out.pth'
    rc, text, err = run_tool(capsys, src, out)
    assert rc == 0, err
    assert "init_cfg=dict(type='Pretrained'" in text
    model = RepVGG('A0', init_cfg=dict(type='Pretrained',
                                       checkpoint=str(out)))
    model.init_weights()
    assert_same_features(ref, model)
    rc, _, err = run_tool(capsys, src, tmp_path / 'det.pth', '--prefix',
                          'backbone.')
    assert rc == 0, err
    ckpt = load_checkpoint(str(tmp_path / 'det.pth'))
    assert all(k.startswith('backbone.') for k in ckpt['state_dict'])
    assert ckpt['meta']['mmrepvgg']['key_prefix'] == 'backbone.'


def test_missing_num_batches_tracked_is_filled(a0, tmp_path, capsys):
    ref, _ = a0
    sd = OrderedDict((k, v) for k, v in to_source(ref, 'official').items()
                     if not k.endswith('num_batches_tracked'))
    src = tmp_path / 'src.pth'
    torch.save(sd, src)
    rc, out, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert rc == 0, err
    assert 'num_batches_tracked' in out
    model, meta = load_out(tmp_path / 'out.pth', 'A0', False)
    assert meta['filled_keys']
    assert_same_features(ref, model)


# ------------------------------------ independent official re-implementation
def _conv_bn(cin, cout, k, stride, padding, groups):
    seq = nn.Sequential()
    seq.add_module('conv', nn.Conv2d(cin, cout, k, stride, padding,
                                     groups=groups, bias=False))
    seq.add_module('bn', nn.BatchNorm2d(cout))
    return seq


class OfficialSE(nn.Module):

    def __init__(self, channels, hidden):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x):
        y = F.avg_pool2d(x, kernel_size=x.size(3))
        return x * torch.sigmoid(self.up(F.relu(self.down(y))))


class OfficialBlock(nn.Module):

    def __init__(self, cin, cout, stride, groups, use_se):
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) \
            if cin == cout and stride == 1 else None
        self.rbr_dense = _conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, 0, groups)
        self.se = OfficialSE(cout, cout // 16) if use_se else nn.Identity()

    def forward(self, x):
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return F.relu(self.se(out))


class OfficialRepVGG(nn.Module):
    """The module layout of DingXiaoH/RepVGG's ``RepVGG`` (training form)."""

    def __init__(self, num_blocks, width_multiplier, override_groups_map=None,
                 use_se=False, num_classes=10):
        super().__init__()
        groups_map = override_groups_map or {}
        planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = OfficialBlock(3, planes, 2, 1, use_se)
        idx = 1
        for i, (n, w) in enumerate(zip(num_blocks, width_multiplier)):
            out = int(64 * 2**i * w)
            blocks = []
            for j in range(n):
                blocks.append(OfficialBlock(planes, out, 2 if j == 0 else 1,
                                            groups_map.get(idx, 1), use_se))
                planes, idx = out, idx + 1
            setattr(self, f'stage{i + 1}', nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.stage0(x)
        outs = []
        for i in range(1, 5):
            x = getattr(self, f'stage{i}')(x)
            outs.append(x)
        return tuple(outs)


@pytest.mark.parametrize('arch', ['A0', 'se_tiny'])
def test_independent_official_template(tmp_path, capsys, arch):
    if arch == 'A0':
        official = OfficialRepVGG((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5))
    else:
        official = OfficialRepVGG(SE_ARCH['num_blocks'],
                                  SE_ARCH['width_factor'],
                                  SE_ARCH['group_layer_map'], use_se=True)
    randomize_(official, seed=7).eval()
    keys = set(official.state_dict())
    assert 'stage0.rbr_dense.bn.running_var' in keys
    assert 'stage1.0.rbr_1x1.conv.weight' in keys
    if arch == 'A0':
        src = tmp_path / 'src.pth'
        torch.save({'state_dict': official.state_dict()}, src)
        rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
        assert rc == 0, err
        model, meta = load_out(tmp_path / 'out.pth', 'A0', False)
        assert meta['arch'] == 'A0'
    else:
        state, _ = import_state_dict({'state_dict': official.state_dict()},
                                     arch=SE_ARCH)
        model = RepVGG(SE_ARCH)
        model.load_state_dict(state, strict=True)
    assert_same_features(official, model)


# ---------------------------------------------------------------- failures
@pytest.fixture
def a0_src(a0, tmp_path):
    """Write an official-format A0 state dict (after ``edit``) to src.pth."""

    def write(edit=None):
        sd = to_source(a0[0], 'official')
        if edit is not None:
            edit(sd)
        path = tmp_path / 'src.pth'
        torch.save(sd, path)
        return path

    return write


def test_wrong_arch(a0_src, tmp_path, capsys):
    src = a0_src()
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth', '--arch', 'A1')
    assert_failed(rc, err, tmp_path, str(src), 'A1', 'shape mismatch',
                  'stage0.rbr_dense.conv.weight', 'look like arch A0',
                  keep=['src.pth'])


def test_truncated_checkpoint(a0_src, tmp_path, capsys):
    src = a0_src()
    data = src.read_bytes()
    src.write_bytes(data[:len(data) // 2])
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), keep=['src.pth'])


def test_extra_unknown_key(a0_src, tmp_path, capsys):
    def edit(sd):
        sd['stage2.1.rbr_dense.scale'] = torch.ones(1)
        sd['aux_head.weight'] = torch.ones(2)

    src = a0_src(edit)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), '2 key(s) not recognised',
                  'stage2.1.rbr_dense.scale', 'aux_head.weight',
                  keep=['src.pth'])


def test_missing_key(a0_src, tmp_path, capsys):
    src = a0_src(lambda sd: sd.pop('stage3.5.rbr_1x1.bn.running_var'))
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), 'missing keys',
                  'stage3.5.rbr_1x1.bn.running_var', keep=['src.pth'])


def test_missing_block(a0_src, tmp_path, capsys):
    def edit(sd):
        for k in [k for k in sd if k.startswith('stage3.4.')]:
            del sd[k]

    rc, _, err = run_tool(capsys, a0_src(edit), tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, 'missing keys', 'stage_3.4.',
                  'stage3.4.rbr_dense.conv.weight', keep=['src.pth'])


def test_unexpected_key_after_mapping(a0_src, tmp_path, capsys):
    # A known suffix on a block that A0 does not have.
    def edit(sd):
        sd['stage4.1.rbr_identity.weight'] = torch.ones(1280)

    rc, _, err = run_tool(capsys, a0_src(edit), tmp_path / 'out.pth',
                          '--arch', 'A0')
    assert_failed(rc, err, tmp_path, 'unexpected keys',
                  'stage4.1.rbr_identity.weight', keep=['src.pth'])


def test_mixed_fused_and_branches(a0, tmp_path, capsys):
    ref, fused = a0
    sd = to_source(ref, 'timm')
    sd = OrderedDict((k, v) for k, v in sd.items()
                     if not k.startswith('stages.3.'))
    sd.update((k, v) for k, v in to_source(fused, 'timm').items()
              if k.startswith('stages.3.'))
    src = tmp_path / 'src.pth'
    torch.save(sd, src)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, 'mixes fused and multi-branch',
                  'stage_4.0', keep=['src.pth'])


def test_forced_wrong_format(a0, tmp_path, capsys):
    src = tmp_path / 'src.pth'
    torch.save(to_source(a0[0], 'timm'), src)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth', '--format',
                          'official')
    assert_failed(rc, err, tmp_path, 'not recognised as official',
                  'stem.conv_kxk.conv.weight', keep=['src.pth'])


@pytest.mark.parametrize('content,needle', [
    (torch.ones(3), 'not a checkpoint'),
    ({'state_dict': {}}, 'empty state dict'),
    ({'epoch': 3, 'acc': 0.5}, 'non-tensor entries: epoch'),
    ({'conv.weight': torch.ones(1)}, 'not a RepVGG checkpoint'),
])
def test_not_a_repvgg_checkpoint(tmp_path, capsys, content, needle):
    src = tmp_path / 'src.pth'
    torch.save(content, src)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), needle, keep=['src.pth'])


def test_refuses_to_overwrite_source(a0_src, tmp_path, capsys):
    src = a0_src()
    before = src.read_bytes()
    rc, _, err = run_tool(capsys, src, src)
    assert rc == 1 and 'refusing to overwrite' in err
    assert src.read_bytes() == before


def test_unknown_arch_name(a0_src, tmp_path, capsys):
    rc, _, err = run_tool(capsys, a0_src(), tmp_path / 'out.pth', '--arch',
                          'C7')
    assert_failed(rc, err, tmp_path, "'C7' is unknown", 'D2se',
                  keep=['src.pth'])


def test_safe_load_by_default(a0, tmp_path, capsys):
    src = tmp_path / 'src.pth'
    torch.save({'state_dict': to_source(a0[0], 'official'),
                'args': argparse.Namespace(lr=0.1)}, src)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), 'argparse.Namespace',
                  '--unsafe-load', keep=['src.pth'])
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth', '--unsafe-load')
    assert rc == 0, err
    assert_same_features(a0[0], load_out(tmp_path / 'out.pth', 'A0',
                                         False)[0])


def test_debug_shows_traceback(a0_src, tmp_path):
    src = a0_src()
    with pytest.raises(Exception, match='shape mismatch'):
        tool.main([str(src), str(tmp_path / 'out.pth'), '--arch', 'A1',
                   '--debug'])
    assert not (tmp_path / 'out.pth').exists()


def test_command_line_exit_code(tmp_path):
    src = tmp_path / 'src.pth'
    src.write_bytes(b'\x00' * 10)
    proc = subprocess.run(
        [sys.executable, TOOL, str(src), str(tmp_path / 'out.pth')],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith('error: ') and str(src) in \
        proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_library_error_type(a0):
    sd = to_source(a0[0], 'official')
    sd.pop('stage0.rbr_dense.conv.weight')
    with pytest.raises(CheckpointImportError, match='stem'):
        import_state_dict(sd)


# ------------------------------------------------ QARepVGG is not RepVGG
def _qarepvgg_source(layout, deploy=False):
    """A randomized QARepVGG backbone under the key names of ``layout``:
    'yolov6' (meituan/YOLOv6 QARepVGGBlock: ``rbr_dense.{conv,bn}``, a bare
    ``rbr_1x1`` conv, post-sum ``bn``, kept beside ``rbr_reparam`` in its
    deploy form), 'super-gradients' (``branch_3x3.{conv,bn}``, bare
    ``branch_1x1``, ``post_bn``) or 'mmrepvgg' (this package's own
    ``RepVGG(block_cfg=dict(type='QARepVGGBlock'))`` state dict)."""
    model = randomize_(RepVGG(SE_ARCH, block_cfg=dict(type='QARepVGGBlock')),
                       seed=6).eval()
    if layout == 'mmrepvgg':
        return model.state_dict()
    names = dict(yolov6=('rbr_dense', 'bn', 'rbr_1x1', 'bn'),
                 **{'super-gradients': ('branch_3x3', 'bn', 'branch_1x1',
                                        'post_bn')})[layout]
    dense, dense_bn, one, post = names
    sd = OrderedDict()
    for n, m, b in _blocks(model):
        unit = 'stage0' if n is None else f'stage{n}.{m}'
        if deploy:
            k, bias = b.get_equivalent_kernel_bias()
            sd[f'{unit}.rbr_reparam.weight'] = k.detach()
            sd[f'{unit}.rbr_reparam.bias'] = bias.detach()
        else:
            sd[f'{unit}.{dense}.conv.weight'] = b.branch_3x3.conv.weight
            for f, t in b.branch_3x3.norm.state_dict().items():
                sd[f'{unit}.{dense}.{dense_bn}.{f}'] = t
            sd[f'{unit}.{one}.weight'] = b.branch_1x1.conv.weight
        for f, t in b.post_norm.state_dict().items():
            sd[f'{unit}.{post}.{f}'] = t
    return sd


@pytest.mark.parametrize('layout,deploy,key', [
    ('yolov6', False, 'stage0.rbr_1x1.weight'),
    ('yolov6', True, 'stage0.bn.weight'),
    ('super-gradients', False, 'stage0.branch_1x1.weight'),
    ('mmrepvgg', False, 'stem.post_norm.weight'),
])
def test_refuses_qarepvgg_checkpoint(tmp_path, capsys, layout, deploy, key):
    src = tmp_path / 'src.pth'
    torch.save({'state_dict': _qarepvgg_source(layout, deploy)}, src)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), 'QARepVGG checkpoint',
                  'not a RepVGG one', key, keep=['src.pth'])
    with pytest.raises(CheckpointImportError, match='QARepVGG'):
        import_state_dict(_qarepvgg_source(layout, deploy))
    # Forcing a format does not load half of it either.
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth', '--format',
                          'official' if layout == 'yolov6' else 'mmrepvgg')
    assert_failed(rc, err, tmp_path, str(src), 'not recognised',
                  keep=['src.pth'])


def test_repvgg_checkpoints_are_not_taken_for_qarepvgg(a0):
    for fmt in LAYOUTS:
        for model in a0:
            assert import_state_dict(to_source(model, fmt))[1]['format'] == fmt
    assert import_state_dict(a0[0].state_dict())[1]['format'] == 'mmrepvgg'


def _poison(key, fn):
    def edit(sd):  # a modified copy: the fixture's model stays intact
        sd[key] = fn(sd[key].clone())
    return edit


@pytest.mark.parametrize('edit,needle', [
    (_poison('stage0.rbr_dense.conv.weight',
             lambda t: t.index_fill_(0, torch.tensor([0]), float('nan'))),
     'stage0.rbr_dense.conv.weight holds 27 non-finite value(s) (NaN'),
    (_poison('stage1.0.rbr_1x1.bn.running_mean',
             lambda t: t.fill_(float('inf'))),
     'stage1.0.rbr_1x1.bn.running_mean holds 48 non-finite value(s)'),
    (_poison('stage1.1.rbr_identity.running_var', lambda t: t.neg_()),
     'stage1.1.rbr_identity.running_var holds a negative variance'),
])
def test_refuses_non_finite_weights(a0_src, tmp_path, capsys, edit, needle):
    src = a0_src(edit=edit)
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.pth')
    assert_failed(rc, err, tmp_path, str(src), needle, keep=['src.pth'])


def test_refuses_hard_link_to_source_and_other_extensions(
        a0_src, tmp_path, capsys):
    src = a0_src()
    os.link(src, tmp_path / 'alias.pth')
    rc, _, err = run_tool(capsys, src, tmp_path / 'alias.pth')
    assert rc == 1 and 'refusing to overwrite the source checkpoint' in err
    rc, _, err = run_tool(capsys, src, tmp_path / 'out.onnx')
    assert rc == 1 and 'OUT must end with .pth' in err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['alias.pth', 'src.pth']
