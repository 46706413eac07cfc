"""tools/deployment/export_onnx.py: end-to-end, raw-head and backbone export,
dynamic
shapes, training and deploy checkpoints, onnxruntime verification, bad
inputs; tools/test.py on an exported file (mmdet's test loop)."""
import json
import os
import os.path as osp
import pickle
import sys

import numpy as np
import pytest
import torch
from _toolkit import ROOT, TOOLS, TOY_CONFIG, load_tool, run_tool

pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

import onnx  # noqa: E402

from mmrepvgg.apis.convert import build_model, load_config  # noqa: E402
from mmrepvgg.deploy import switch_to_deploy  # noqa: E402
from mmrepvgg.testing import randomize_, relative_error  # noqa: E402

sys.path.insert(0, osp.join(ROOT, 'tests', 'export'))
from _export_helpers import calibrate_head_  # noqa: E402

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


def _run_usage(argv, capsys):
    """A command line argparse refuses: exit code from SystemExit."""
    with pytest.raises(SystemExit) as e:
        export_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """Random toy detector (training + deploy checkpoints) and a bare tiny
    backbone config with its checkpoint."""
    d = tmp_path_factory.mktemp('export')
    det = build_model(load_config(TOY_CONFIG))
    randomize_(det).eval()
    calibrate_head_(det, torch.randn(2, 3, 128, 128))  # scores 0.1-0.5
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
    assert 'raw tensors    : 6 outputs' in stdout and 'operators' in stdout
    assert 'ratio' in stdout and 'criterion' in stdout
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
                              '--shape', '64', '64', '--bench', '2',
                              '--opset', '18'],
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
             'two_stage', 'mismatch', 'malicious', 'missing_config',
             'postprocess_two_stage', 'postprocess_soft_nms',
             'img_shape_without_postprocess', 'postprocess_fails',
             'bad_cfg_option', 'score_thr_2', 'score_thr_nan',
             'iou_above_1', 'max_per_img_200000', 'min_bbox_size_nan',
             'noise_factor_inf', 'noise_factor_below_1', 'shape_6000',
             'test_resize_6000', 'verify_images_100000',
             'output_is_checkpoint', 'output_is_config']


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
        from mmrepvgg.export import runtime
        real = runtime.run
        monkeypatch.setattr(runtime, 'run', lambda s, f, o=None: [
            a + 1 for a in real(s, f, o)])
        expect = 'onnxruntime model error vs float64 truth'
    elif case == 'postprocess_fails':
        from mmrepvgg.export import runtime
        real = runtime.run

        def shifted(s, f, o=None):
            out = real(s, f, o)
            out[0] = out[0] + 1  # every box and score moved
            return out

        monkeypatch.setattr(runtime, 'run', shifted)
        extra = ['--postprocess', '--shape', '64', '64',
                 '--verify-images', '0']
        expect = 'the in-graph post-processing differs'
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
    elif case == 'postprocess_two_stage':
        config = osp.join(ROOT, 'configs/repvgg/'
                          'faster-rcnn_repvgg-a0_fpn_1x_coco.py')
        extra, expect = ['--postprocess'], 'not a single-stage detector'
    elif case == 'postprocess_soft_nms':
        extra = ['--postprocess', '--cfg-options',
                 'model.test_cfg.nms.type=soft_nms']
        expect = 'cannot put the post-processing in the graph'
    elif case == 'img_shape_without_postprocess':
        extra, expect = ['--img-shape-input'], '--img-shape-input needs ' \
            '--postprocess'
    elif case == 'bad_cfg_option':
        extra, expect = ['--cfg-options', 'model.test_cfg'], '--cfg-options'
    elif case in ('score_thr_2', 'score_thr_nan', 'iou_above_1',
                  'max_per_img_200000', 'min_bbox_size_nan'):
        key, value = {  # refused before loading weights
            'min_bbox_size_nan': ('test_cfg.min_bbox_size', 'nan'),
            'score_thr_2': ('test_cfg.score_thr', '2'),
            'score_thr_nan': ('test_cfg.score_thr', 'nan'),
            'iou_above_1': ('test_cfg.nms.iou_threshold', '1.5'),
            'max_per_img_200000': ('test_cfg.max_per_img', '200000')}[case]
        monkeypatch.setattr('mmrepvgg.export.onnx_export.load_deploy_model',
                            None)
        extra = ['--postprocess', '--cfg-options', f'model.{key}={value}']
        expect = f'{TOY_CONFIG}: cannot put the post-processing in the ' \
            f'graph: {key}={value}: must be'
    elif case in ('noise_factor_inf', 'noise_factor_below_1'):
        value = 'inf' if case == 'noise_factor_inf' else '0.5'
        extra = ['--noise-factor', value]
        expect = f'--noise-factor must be a finite number >= 1, got {value}'
    elif case == 'shape_6000':
        extra = ['--shape', '6000', '6000']
        expect = '--shape must be two integers in [1, 4096], got [6000, 6000]'
    elif case == 'test_resize_6000':
        extra = ['--cfg-options', 'test_pipeline.1.scale=(6000,6000)']
        expect = f'{TOY_CONFIG}: test resize 6016x6016 is beyond [1, 4096]'
    elif case == 'verify_images_100000':
        extra = ['--postprocess', '--verify-images', '100000']
        expect = '--verify-images must be in [0, 64]'
    elif case in ('output_is_checkpoint', 'output_is_config'):
        # OUTPUT a hard link of the checkpoint, a symlink to the config
        src = tmp_path / ('ckpt.pth' if case == 'output_is_checkpoint'
                          else 'config.py')
        src.write_bytes(open(ckpt if case == 'output_is_checkpoint'
                             else config, 'rb').read())
        if case == 'output_is_checkpoint':
            ckpt = src
            os.link(src, out)
        else:
            config = src
            out.symlink_to(src)
        expect = f'{out}: refusing to overwrite the input ' + (
            'checkpoint' if case == 'output_is_checkpoint' else 'config')
    code, stdout, err = _run([config, ckpt, out] + extra, capsys) \
        if case != 'bad_cfg_option' else _run_usage(
            [config, ckpt, out] + extra, capsys)
    assert code == (2 if case == 'bad_cfg_option' else 1), (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0], lines[0]
    assert 'Traceback' not in err
    if case in ('output_is_checkpoint', 'output_is_config'):
        assert _files(out_dir) == ['model.onnx']
        assert out.read_bytes() == open(
            models['dir'] / 'train.pth' if case == 'output_is_checkpoint'
            else TOY_CONFIG, 'rb').read()
    else:
        assert _files(out_dir) == []  # no output, no temporary file
    if case in ('missing_checkpoint', 'malicious', 'verification_fails',
                'postprocess_fails'):
        assert str(ckpt) in lines[0]
    if case == 'malicious':
        assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('case', ['file_size_limit', 'full_disk'])
def test_write_failure_names_the_output(case, models, tmp_path, capsys,
                                        monkeypatch):
    """A file system that refuses the write is one line naming OUTPUT,
    never "OSError: File too large" alone or onnx's C++ message."""
    import resource
    out_dir = tmp_path / 'out'
    out_dir.mkdir()
    out = out_dir / 'model.onnx'
    argv = [TOY_CONFIG, models['dir'] / 'train.pth', out, '--shape', '32',
            '32']
    if case == 'full_disk':  # onnx fails from C++ on a full file system
        import collections

        def enforce(path, *a, **k):
            raise RuntimeError('[enforce fail at onnx/checker.cc:1] failed '
                               'to read\n  second line')

        statvfs = collections.namedtuple('statvfs', 'f_bavail f_frsize')
        monkeypatch.setattr(onnx.checker, 'check_model', enforce)
        monkeypatch.setattr(os, 'statvfs', lambda p: statvfs(0, 4096))
        code, _, err = _run(argv, capsys)
        expect = 'its file system is full'
    else:  # the real OSError of torch's writer: [Errno 27] File too large
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**17, hard))
        try:
            code, _, err = _run(argv, capsys)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        expect = 'File too large'
    assert code == 1, err
    lines = err.strip().splitlines()
    assert lines == [f'error: {out}: cannot write it ({expect}); nothing '
                     'written'], err
    assert _files(out_dir) == []


def test_end2end_toy(models, tmp_path, capsys):
    out = tmp_path / 'toy.onnx'
    code, stdout, err = _run([TOY_CONFIG, models['dir'] / 'deploy.pth', out,
                              '--postprocess', '--shape', '96', '128',
                              '--verify-images', '0',  # whatever the cwd
                              '--cfg-options', 'model.test_cfg.score_thr=0.3',
                              '--bench', '2'],
                             capsys)
    assert code == 0, err
    assert _files(tmp_path) == ['toy.onnx']
    assert 'deploy form, 10 RepVGG block(s)' in stdout
    assert 'outputs          : dets (N, 20, 5), labels (N, 20)' in stdout
    assert ('test_cfg in graph: score_thr 0.3, nms_pre 1000 per level, nms '
            'iou 0.5, max_per_img 20, min_bbox_size 0; 3 classes (sigmoid), '
            'AnchorGenerator strides 8,16,32') in stdout
    assert 'post-processing vs mmdet predict_by_feat on the same head ' \
        'outputs: 3/3 images identical' in stdout
    assert "detections vs mmdet's model.predict (PyTorch float32): 3/3 " \
        'images identical' in stdout
    assert 'PyTorch deploy + mmdet post-processing' in stdout
    assert 'onnxruntime end to end' in stdout
    assert 'NonMaxSuppression 1' in stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta['mmrepvgg.postprocess'])['max_per_img'] == 20
    # detections of a new batch: same as mmdet's predict of the deploy model
    from mmrepvgg.export.verify import (compare_detections, make_samples,
                                        mmdet_predict, split_dets)
    x = torch.randn(2, 3, 128, 64)
    dets, labels = _ort(out, x)
    det = models['det']
    det.bbox_head.test_cfg.score_thr = 0.3
    try:
        ref = mmdet_predict(det, x, make_samples([(128, 64)] * 2, (128, 64)))
    finally:
        det.bbox_head.test_cfg.score_thr = 0.05
    res = compare_detections(split_dets(dets, labels), ref, 0.02, 1e-4)
    assert res['differing'] == [] and res['matched'] >= 5


def _test_tool(ws, config, ckpt, out, extra=()):
    proc = run_tool([sys.executable, osp.join(TOOLS, 'test.py'), str(config),
                     str(ckpt), '--out', str(out), '--work-dir',
                     str(ws / 'work_dirs' / osp.basename(str(out)))] +
                    list(extra), cwd=ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, 'rb') as f:
        results = pickle.load(f)
    maps = [line for line in (proc.stdout + proc.stderr).splitlines()
            if 'bbox_mAP_copypaste' in line]
    assert maps, proc.stdout[-2000:]
    return results, maps[-1].split('bbox_mAP_copypaste:')[1].split(), \
        proc.stdout


def test_onnx_file_in_mmdet_test_loop(toy_trained, tmp_path, capsys,
                                      monkeypatch):
    """tools/test.py CONFIG MODEL.onnx (its command line, in a process of
    its own): the same detections (rescaled to the original images) and the
    same metrics as the PyTorch deploy model."""
    ws, ckpt = toy_trained['ws'], toy_trained['ckpt']
    onnx_file = tmp_path / 'toy_e2e.onnx'
    monkeypatch.chdir(ws)
    code, stdout, err = _run([TOY_CONFIG, ckpt, onnx_file, '--postprocess',
                              '--verify-images', '8'], capsys)
    assert code == 0, err
    assert '8 test-set image(s) 8x3x128x128' in stdout
    torch_dets, torch_map, _ = _test_tool(ws, TOY_CONFIG, ckpt,
                                          tmp_path / 'torch.pkl',
                                          ['--deploy'])
    onnx_dets, onnx_map, log = _test_tool(ws, TOY_CONFIG, onnx_file,
                                          tmp_path / 'onnx.pkl')
    assert 'post-processing in the graph: score_thr 0.05' in log
    assert onnx_map == torch_map
    assert len(onnx_dets) == len(torch_dets) == 8
    n = 0
    for a, b in zip(onnx_dets, torch_dets):
        pa, pb = a['pred_instances'], b['pred_instances']
        assert np.array_equal(np.asarray(pa['labels']),
                              np.asarray(pb['labels']))
        np.testing.assert_allclose(np.asarray(pa['bboxes']),
                                   np.asarray(pb['bboxes']), atol=1e-2)
        np.testing.assert_allclose(np.asarray(pa['scores']),
                                   np.asarray(pb['scores']), atol=1e-5)
        n += len(pa['labels'])
    assert n > 0, 'no detection to compare'


@pytest.mark.parametrize('case', ['raw_graph', 'deploy_flag', 'missing'])
def test_onnx_test_loop_refuses(case, models, toy_workspace, tmp_path,
                                capsys, monkeypatch):
    """In-process (tools/test.py's main): the refusal comes before the
    runner, so the process-level behaviour is the same one line."""
    raw = tmp_path / 'raw.onnx'
    if case != 'missing':
        code = export_tool.main([TOY_CONFIG, str(models['dir'] / 'train.pth'),
                                 str(raw), '--shape', '64', '64'])
        assert code == 0
    capsys.readouterr()
    monkeypatch.chdir(toy_workspace)
    extra = ['--deploy'] if case == 'deploy_flag' else []
    code = load_tool('test').main([TOY_CONFIG, str(raw), '--work-dir',
                                   str(tmp_path / 'wd')] + extra)
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    expect = {'raw_graph': 'not an end-to-end detector graph',
              'deploy_flag': '--deploy does not apply to an ONNX file',
              'missing': 'does not exist'}[case]
    assert expect in lines[0]
    assert not (tmp_path / 'wd').exists()
