"""tools/convert_deploy.py: conversion, verification and every bad input."""
import os
import os.path as osp
import shutil

import pytest
import torch
from _toolkit import ROOT, TOY_CONFIG, load_tool

convert_tool = load_tool('convert_deploy')


def _run(argv, capsys):
    code = convert_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def ckpt(toy_trained, tmp_path):
    path = tmp_path / 'in' / 'epoch_1.pth'
    path.parent.mkdir()
    shutil.copy(toy_trained['ckpt'], path)
    return path


def test_convert_writes_checkpoint_and_deploy_config(ckpt, tmp_path, capsys):
    out = tmp_path / 'out' / 'model.pth'
    before = ckpt.read_bytes()
    code, stdout, err = _run([TOY_CONFIG, ckpt, out, '--shape', '64', '96'],
                             capsys)
    assert code == 0, err
    assert _files(out.parent) == ['model.pth', 'model.py']
    assert ckpt.read_bytes() == before  # input untouched
    for line in ('blocks converted : 10', 'parameters', 'conv layers',
                 'file size', 'max rel err', 'forward latency'):
        assert line in stdout, line
    sd = torch.load(out, weights_only=True)['state_dict']
    assert not any('branch_' in k for k in sd)
    assert any('conv_reparam' in k for k in sd)
    # the deploy config rebuilds the fused model and loads it strictly
    from mmengine.config import Config
    from mmdet.registry import MODELS
    cfg = Config.fromfile(str(out.with_suffix('.py')))
    assert cfg.model.backbone.deploy is True
    assert cfg.model.neck.block_cfg.deploy is True
    model = MODELS.build(cfg.model)
    model.load_state_dict(sd, strict=True)


def test_convert_folder_and_glob(ckpt, tmp_path, capsys):
    shutil.copy(ckpt, ckpt.parent / 'epoch_2.pth')
    out = tmp_path / 'many'
    out.mkdir()
    code, stdout, err = _run([TOY_CONFIG, ckpt.parent, out, '--repeats', '0',
                              '--no-verify'], capsys)
    assert code == 0, err
    assert _files(out) == ['epoch_1_deploy.pth', 'epoch_1_deploy.py',
                           'epoch_2_deploy.pth', 'epoch_2_deploy.py']
    assert 'converting' in err  # progress bar
    out2 = tmp_path / 'glob'
    code, _, err = _run([TOY_CONFIG, str(ckpt.parent / 'epoch_*.pth'),
                         str(out2) + os.sep, '--repeats', '0'], capsys)
    assert code == 0, err
    assert len(_files(out2)) == 4


def _malicious(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': Evil()}, path)


BAD_CASES = ['missing', 'not_a_checkpoint', 'truncated', 'mismatch',
             'no_repvgg', 'already_deployed', 'missing_config', 'same_path',
             'malicious', 'tolerance', 'not_pth']


@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_inputs_exit_1_with_one_line_and_no_output(case, ckpt, tmp_path,
                                                       capsys):
    out_dir = tmp_path / 'out'
    out = out_dir / 'model.pth'
    config, src = TOY_CONFIG, ckpt
    extra = ['--repeats', '0', '--shape', '64', '64']
    expect = None
    if case == 'missing':
        src, expect = tmp_path / 'nope.pth', 'no such checkpoint file'
    elif case == 'not_a_checkpoint':
        src = tmp_path / 'notes.pth'
        src.write_text('hello, not a checkpoint\n')
        expect = 'not a valid checkpoint'
    elif case == 'truncated':
        src = tmp_path / 'cut.pth'
        data = ckpt.read_bytes()
        src.write_bytes(data[:len(data) // 2])
        expect = 'truncated or corrupt'
    elif case == 'mismatch':
        config = osp.join(ROOT, 'configs/repvgg/'
                          'retinanet_repvgg-a0_fpn_1x_coco.py')
        expect = 'missing keys: '
    elif case == 'no_repvgg':
        config = tmp_path / 'resnet.py'
        config.write_text(
            "_base_ = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'\n"
            "model = dict(backbone=dict(init_cfg=None))\n")
        expect = 'no RepVGG'
    elif case == 'already_deployed':
        first = tmp_path / 'deployed' / 'd.pth'
        assert _run([TOY_CONFIG, ckpt, first] + extra, capsys)[0] == 0
        src, expect = first, 'already in deploy form'
    elif case == 'missing_config':
        config, expect = tmp_path / 'nope.py', 'config file does not exist'
    elif case == 'same_path':
        out, expect = ckpt, 'refusing to overwrite the input'
        out_dir = ckpt.parent
    elif case == 'malicious':
        src = tmp_path / 'evil.pth'
        _malicious(src, tmp_path / 'pwned')
        expect = 'system'
    elif case == 'tolerance':
        extra = extra + ['--tolerance', '1e-15']
        expect = '> tolerance'
    elif case == 'not_pth':
        out, expect = out_dir / 'model.ckpt', 'must end with .pth'
    before = _files(out_dir)
    code, stdout, err = _run([config, src, out] + extra, capsys)
    assert code == 1, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0], lines[0]
    assert 'Traceback' not in err
    assert _files(out_dir) == before  # nothing written, no temp files
    if case == 'mismatch':
        assert 'unexpected keys: ' in lines[0] and 'neck.' in lines[0]
    if case == 'malicious':
        assert not (tmp_path / 'pwned').exists()
        assert str(src) in lines[0]
    if case in ('missing', 'not_a_checkpoint', 'truncated'):
        assert str(src) in lines[0]
