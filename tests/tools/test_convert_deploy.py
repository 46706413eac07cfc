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
                 'file size', 'vs float64 truth', 'original float32 err',
                 'ratio'):
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
    code, stdout, err = _run([TOY_CONFIG, ckpt.parent, out,
                              '--no-verify'], capsys)
    assert code == 0, err
    assert _files(out) == ['epoch_1_deploy.pth', 'epoch_1_deploy.py',
                           'epoch_2_deploy.pth', 'epoch_2_deploy.py']
    assert 'converting' in err  # progress bar
    out2 = tmp_path / 'glob'
    code, _, err = _run([TOY_CONFIG, str(ckpt.parent / 'epoch_*.pth'),
                         str(out2) + os.sep], capsys)
    assert code == 0, err
    assert len(_files(out2)) == 4


def _malicious(path, marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}', ))
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': Evil()}, path)


def _tampered(ckpt, path, key_part, fn):
    obj = torch.load(ckpt, weights_only=False)  # our own test file
    key = next(k for k in obj['state_dict'] if key_part in k)
    obj['state_dict'][key] = fn(obj['state_dict'][key])
    torch.save(obj, path)
    return key


BAD_CASES = ['missing', 'not_a_checkpoint', 'truncated', 'mismatch',
             'no_repvgg', 'already_deployed', 'missing_config', 'same_path',
             'malicious', 'not_pth', 'nan_weight', 'inf_bias',
             'nan_running_mean', 'negative_var', 'complex_weight',
             'input_named_like_config', 'output_through_symlink',
             'out_py_is_folder', 'huge_shape', 'small_noise_factor',
             'nan_noise_factor', 'output_is_a_base_config']


@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_inputs_exit_1_with_one_line_and_no_output(case, ckpt, tmp_path,
                                                       capsys):
    out_dir = tmp_path / 'out'
    out = out_dir / 'model.pth'
    config, src = TOY_CONFIG, ckpt
    extra = ['--shape', '64', '64']
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
    elif case == 'not_pth':
        out, expect = out_dir / 'model.ckpt', 'must end with .pth'
    elif case in ('nan_weight', 'inf_bias', 'nan_running_mean',
                  'negative_var', 'complex_weight'):
        part, fn, expect = {
            'nan_weight': ('branch_3x3.conv.weight',
                           lambda t: t.index_fill(0, torch.tensor([0]),
                                                  float('nan')),
                           'non-finite'),
            'inf_bias': ('bbox_head.retina_cls.bias',
                         lambda t: t.index_fill(0, torch.tensor([1]),
                                                float('inf')), 'non-finite'),
            'nan_running_mean': ('running_mean',
                                 lambda t: t.index_fill(
                                     0, torch.tensor([0]), float('nan')),
                                 'non-finite'),
            'negative_var': ('running_var', lambda t: -t,
                             'negative variance'),
            'complex_weight': ('branch_1x1.conv.weight',
                               lambda t: t.to(torch.complex64), 'complex'),
        }[case]
        src = tmp_path / f'{case}.pth'
        key = _tampered(ckpt, src, part, fn)
        expect = f'{key} '
    elif case == 'input_named_like_config':
        # the checkpoint is model.py: its deploy config would be model.py
        src = out_dir / 'model.py'
        out_dir.mkdir()
        shutil.copy(ckpt, src)
        expect = 'refusing to overwrite the input checkpoint'
    elif case == 'output_through_symlink':
        # OUT.py reached through a symlinked folder is the input config
        cfg_dir = tmp_path / 'cfgs'
        cfg_dir.mkdir()
        config = cfg_dir / 'toy.py'
        config.write_text(f"_base_ = {TOY_CONFIG!r}\n")
        os.symlink(cfg_dir, tmp_path / 'link')
        out_dir = tmp_path / 'link'
        out = out_dir / 'toy.pth'
        expect = 'refusing to overwrite the input config'
    elif case == 'output_is_a_base_config':
        # OUT.py would replace the _base_ file the config inherits
        out_dir.mkdir()
        shutil.copy(TOY_CONFIG, out_dir / 'base.py')
        config = tmp_path / 'child.py'
        config.write_text(f"_base_ = [{str(out_dir / 'base.py')!r}]\n")
        out = out_dir / 'base.pth'
        expect = 'refusing to overwrite the base config of'
    elif case == 'out_py_is_folder':
        out_dir.mkdir()
        (out_dir / 'model.py').mkdir()
        expect = 'is a folder'
    elif case == 'huge_shape':
        extra = ['--shape', '8000', '8000']
        expect = '--shape must be two integers in [1, 4096]'
    elif case in ('small_noise_factor', 'nan_noise_factor'):
        value = '0' if case == 'small_noise_factor' else 'nan'
        extra = extra + ['--noise-factor', value]
        expect = '--noise-factor must be a finite number >= 1'
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


def test_glob_with_colliding_basenames_writes_nothing(ckpt, tmp_path, capsys):
    other = tmp_path / 'in2' / 'epoch_1.pth'
    other.parent.mkdir()
    shutil.copy(ckpt, other)
    out = tmp_path / 'out'
    out.mkdir()
    code, _, err = _run([TOY_CONFIG, str(tmp_path / 'in*' / 'epoch_1.pth'),
                         out], capsys)
    assert code == 1
    assert 'two outputs would share one file' in err, err
    assert _files(out) == []


def test_folder_into_itself_refuses_to_overwrite_inputs(ckpt, capsys):
    # epoch_1_deploy.pth exists as an input: converting the folder into
    # itself would overwrite it with epoch_1's conversion.
    shutil.copy(ckpt, ckpt.parent / 'epoch_1_deploy.pth')
    before = _files(ckpt.parent)
    code, _, err = _run([TOY_CONFIG, ckpt.parent, ckpt.parent], capsys)
    assert code == 1 and 'refusing to overwrite the input' in err, err
    assert _files(ckpt.parent) == before


def test_folder_converts_good_ones_and_summarizes_bad(ckpt, tmp_path,
                                                      capsys):
    (ckpt.parent / 'epoch_0.pth').write_bytes(b'garbage')
    shutil.copy(ckpt, ckpt.parent / 'epoch_2.pth')
    out = tmp_path / 'many'
    out.mkdir()
    code, stdout, err = _run([TOY_CONFIG, ckpt.parent, out,
                              '--shape', '64', '64'], capsys)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith('error: ')]
    assert len(lines) == 2, err
    assert 'epoch_0.pth' in lines[0]
    assert 'converted 2 of 3 checkpoints; failed: ' in lines[1]
    assert _files(out) == ['epoch_1_deploy.pth', 'epoch_1_deploy.py',
                           'epoch_2_deploy.pth', 'epoch_2_deploy.py']


def test_failed_pair_keeps_previous_good_output(ckpt, tmp_path, capsys,
                                                monkeypatch):
    out = tmp_path / 'out' / 'model.pth'
    args = [TOY_CONFIG, ckpt, out, '--shape', '64', '64']
    assert _run(args, capsys)[0] == 0
    old = out.read_bytes(), out.with_suffix('.py').read_bytes()
    # Writing the config fails after the checkpoint was written: the pair
    # on disk stays the previous one, with no temporary left.
    from mmrepvgg.apis import convert as convert_api

    def broken(path, text):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(convert_api, '_write_text', broken)
    code, _, err = _run(args, capsys)
    assert code == 1 and 'No space left' in err, err
    assert (out.read_bytes(), out.with_suffix('.py').read_bytes()) == old
    assert _files(out.parent) == ['model.pth', 'model.py']


def test_conversion_message_gives_both_numbers(ckpt, tmp_path, capsys,
                                               monkeypatch):
    """A wrong fusion is refused with the conversion's error and the
    network's own float32 error in the message."""
    from mmrepvgg import RepVGGBlock
    original = RepVGGBlock._kernel_bias_f64

    def off_by_shift(self):
        k, b = original(self)
        return k, b + 0.5
    monkeypatch.setattr(RepVGGBlock, '_kernel_bias_f64', off_by_shift)
    out = tmp_path / 'out' / 'model.pth'
    code, _, err = _run([TOY_CONFIG, ckpt, out, '--shape',
                         '64', '64'], capsys)
    assert code == 1
    assert 'conversion check failed: converted model error vs float64 ' \
        'truth' in err and "original model's own float32 error" in err, err
    assert not out.parent.exists() or _files(out.parent) == []


def test_memory_handed_out_by_a_pickle_never_reaches_the_output(
        ckpt, tmp_path, capsys):
    """Issue 19: torch.ByteTensor(n) in meta gave uninitialised process
    memory, which the conversion copied into the deploy checkpoint."""
    import struct
    import zipfile

    from mmrepvgg.deploy import load_checkpoint
    plain = tmp_path / 'plain.pth'
    torch.save(dict(load_checkpoint(str(ckpt)), meta='PLACEHOLDER'), plain)
    marker = b'X' + struct.pack('<I', 11) + b'PLACEHOLDER'
    gadget = b'ctorch\nByteTensor\nJ' + struct.pack('<i', 1 << 20) + b'\x85R'
    evil = tmp_path / 'evil.pth'
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(evil, 'w') as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('/data.pkl'):
                assert data.count(marker) == 1
                data = data.replace(marker, gadget)
            dst.writestr(info, data)
    out = tmp_path / 'out' / 'model.pth'
    code, _, err = _run([TOY_CONFIG, evil, out], capsys)
    assert code == 1 and err.count('\n') == 1, err
    assert 'torch.ByteTensor' in err and str(evil) in err
    assert _files(out.parent) == []
