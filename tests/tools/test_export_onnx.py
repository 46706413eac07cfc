"""tools/export_onnx.py: detector and backbone export, dynamic shapes,
training and deploy checkpoints, onnxruntime verification, bad inputs."""
import os
import os.path as osp

import numpy as np
import pytest
import torch
from _toolkit import ROOT, TOY_CONFIG, load_tool

pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

import onnx  # noqa: E402

from mmrepvgg.apis.convert import build_model, load_config  # noqa: E402
from mmrepvgg.deploy import switch_to_deploy  # noqa: E402
from mmrepvgg.testing import randomize_, relative_error  # noqa: E402

export_tool = load_tool('export_onnx')

BACKBONE_CONFIG = """\
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)
model = dict(type='RepVGG', arch=dict(num_blocks=(1, 1, 1, 1),
                                      width_factor=(0.25, 0.25, 0.25, 0.25)))
"""


def _run(argv, capsys):
    code = export_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """Random toy detector (training + deploy checkpoints) and a bare tiny
    backbone config with its checkpoint."""
    d = tmp_path_factory.mktemp('export')
    det = build_model(load_config(TOY_CONFIG))
    randomize_(det).eval()
    torch.save({'state_dict': det.state_dict()}, d / 'train.pth')
    fused = switch_to_deploy(det, verbose=False)
    torch.save({'state_dict': fused.state_dict()}, d / 'deploy.pth')
    (d / 'backbone.py').write_text(BACKBONE_CONFIG)
    bb = build_model(load_config(str(d / 'backbone.py')))
    randomize_(bb, seed=1).eval()
    torch.save({'state_dict': bb.state_dict()}, d / 'backbone.pth')
    return dict(dir=d, det=fused, backbone=switch_to_deploy(bb,
                                                            verbose=False))


def _ort(path, x):
    sess = ort.InferenceSession(str(path),
                                providers=['CPUExecutionProvider'])
    return sess.run(None, {'input': x.numpy()})


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_detector_export_dynamic_shapes(models, tmp_path, capsys):
    out = tmp_path / 'det.onnx'
    code, stdout, err = _run([TOY_CONFIG, models['dir'] / 'train.pth', out,
                              '--shape', '64', '96'], capsys)
    assert code == 0, err
    assert _files(tmp_path) == ['det.onnx']
    assert 'training form, 10 RepVGG block(s)' in stdout
    assert 'max rel err' in stdout and 'operators' in stdout
    assert '1x3x64x96, 2x3x96x64' in stdout  # two verified shapes
    graph = onnx.load(str(out)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == [
        'batch', 3, 'height', 'width']
    ops = _ops(out)
    assert 'BatchNormalization' not in ops and {'Conv', 'Relu'} <= ops
    # a third shape, against the PyTorch raw head outputs
    det = models['det']
    x = torch.randn(3, 3, 128, 64)
    with torch.no_grad():
        cls, reg = det.bbox_head(det.extract_feat(x))
    ref = list(cls) + list(reg)
    got = _ort(out, x)
    assert len(got) == len(ref) == 6
    for a, b in zip(ref, got):
        assert tuple(a.shape) == b.shape
        assert relative_error(a, torch.from_numpy(b)) <= 1e-4


def test_backbone_only_from_deploy_checkpoint(models, tmp_path, capsys):
    out_t, out_d = tmp_path / 'bb_train.onnx', tmp_path / 'bb_deploy.onnx'
    for ckpt, out in (('train.pth', out_t), ('deploy.pth', out_d)):
        code, stdout, err = _run([TOY_CONFIG, models['dir'] / ckpt, out,
                                  '--backbone-only', '--shape', '64', '64'],
                                 capsys)
        assert code == 0, err
        assert 'Conv + activation only' in stdout
    assert 'deploy form, 10 RepVGG block(s)' in stdout
    assert _ops(out_t) == _ops(out_d) == {'Conv', 'Relu'}
    x = torch.randn(2, 3, 96, 32)
    for a, b in zip(_ort(out_t, x), _ort(out_d, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * abs(a).max())
    with torch.no_grad():
        ref = models['det'].backbone(x)
    got = _ort(out_d, x)
    assert len(got) == 3  # out_indices (1, 2, 3) of the toy backbone
    for a, b in zip(ref, got):
        assert relative_error(a, torch.from_numpy(b)) <= 1e-4


def test_bare_backbone_config_and_bench(models, tmp_path, capsys):
    out = tmp_path / 'backbone.onnx'
    cfg = models['dir'] / 'backbone.py'
    code, stdout, err = _run([cfg, models['dir'] / 'backbone.pth', out,
                              '--shape', '64', '64', '--bench', '--repeats',
                              '2', '--warmup', '1', '--opset', '18'],
                             capsys)
    assert code == 0, err
    assert 'exported RepVGG' in stdout and 'opset 18' in stdout
    assert 'operators        : Conv 5, Relu 5' in stdout
    assert 'onnxruntime/PyTorch' in stdout
    assert _ops(out) == {'Conv', 'Relu'}
    x = torch.randn(1, 3, 32, 160)
    with torch.no_grad():
        ref = models['backbone'](x)
    for a, b in zip(ref, _ort(out, x)):
        assert relative_error(a, torch.from_numpy(b)) <= 1e-4


BAD_CASES = ['missing_checkpoint', 'verification_fails', 'not_onnx',
             'two_stage', 'mismatch', 'malicious', 'missing_config']


@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_inputs_exit_1_with_one_line_and_no_output(case, models,
                                                       tmp_path, capsys,
                                                       monkeypatch):
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    out = out_dir / 'model.onnx'
    config, ckpt = TOY_CONFIG, models['dir'] / 'train.pth'
    extra = ['--backbone-only', '--shape', '32', '32']
    if case == 'missing_checkpoint':
        ckpt, expect = tmp_path / 'nope.pth', 'no such checkpoint file'
    elif case == 'verification_fails':
        from mmrepvgg.apis import export as export_api
        real = export_api.run_onnx
        monkeypatch.setattr(export_api, 'run_onnx', lambda s, x: [
            o + 1 for o in real(s, x)])
        expect = '> tolerance 0.0001; '
    elif case == 'not_onnx':
        out, expect = out_dir / 'model.pth', 'must end with .onnx'
    elif case == 'two_stage':
        config = osp.join(ROOT, 'configs/repvgg/'
                          'faster-rcnn_repvgg-a0_fpn_1x_coco.py')
        extra, expect = [], 'not a single-stage detector'
    elif case == 'mismatch':
        config = models['dir'] / 'backbone.py'
        extra, expect = [], 'missing keys: '
    elif case == 'malicious':
        class Evil:
            def __reduce__(self):
                return (os.system, (f'touch {tmp_path / "pwned"}', ))
        ckpt = tmp_path / 'evil.pth'
        torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': Evil()}, ckpt)
        expect = 'system'
    elif case == 'missing_config':
        config, expect = tmp_path / 'nope.py', 'config file does not exist'
    code, stdout, err = _run([config, ckpt, out] + extra, capsys)
    assert code == 1, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0], lines[0]
    assert 'Traceback' not in err
    assert _files(out_dir) == []  # no output, no temporary file
    if case in ('missing_checkpoint', 'malicious', 'verification_fails'):
        assert str(ckpt) in lines[0]
    if case == 'malicious':
        assert not (tmp_path / 'pwned').exists()
