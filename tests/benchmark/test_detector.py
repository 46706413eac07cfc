"""mmrepvgg.benchmark.detector: the demo's summary table and picture."""
import pickle

import pytest
import torch
from _toolkit import TOY_CONFIG

from mmrepvgg.benchmark.detector import (demo_summary, format_summary,
                                         side_by_side)


def test_format_summary():
    table = format_summary([
        dict(form='PyTorch training', map=0.5, latency_ms=10.0, speedup=1.0),
        dict(form='ONNX INT8', map=None, latency_ms=2.5, speedup=4.0)],
        title='input 1x3x128x128')
    assert table.splitlines() == [
        'input 1x3x128x128', '| form | toy-val mAP | latency ms | speed-up |',
        '|---|---:|---:|---:|', '| PyTorch training | 0.500 | 10.00 | 1.00x |',
        '| ONNX INT8 | n/a | 2.50 | 4.00x |']


def test_demo_summary_times_the_forms(toy_data, tmp_path, monkeypatch):
    from mmrepvgg.apis.convert import build_model, load_config
    from mmrepvgg.testing import randomize_
    monkeypatch.chdir(toy_data)
    cfg = load_config(TOY_CONFIG)
    model = build_model(cfg)
    randomize_(model, seed=0)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'ckpt.pth')
    s = demo_summary(cfg, TOY_CONFIG, str(tmp_path / 'ckpt.pth'), {},
                     {'PyTorch deploy': 0.25}, repeats=2, warmup=1)
    assert [r['form'] for r in s['rows']] == ['PyTorch training',
                                              'PyTorch deploy']
    assert s['rows'][0]['speedup'] == 1.0 and s['rows'][0]['map'] is None
    assert '| PyTorch deploy | 0.250 |' in s['table']
    assert len(s['timing'].reasons) == 2


def test_side_by_side_picture(toy_data, tmp_path):
    import cv2
    images = sorted((toy_data / 'data' / 'toy' / 'val').iterdir())[:3]
    h, w = cv2.imread(str(images[0])).shape[:2]

    def dump(path, shift):
        res = [dict(img_path=str(p), pred_instances=dict(
            bboxes=torch.tensor([[4.0 + shift, 4.0, 40.0, 40.0]]),
            scores=torch.tensor([0.9]), labels=torch.tensor([1])))
            for p in images]
        with open(path, 'wb') as f:
            pickle.dump(res, f)

    dump(tmp_path / 'a.pkl', 0)
    dump(tmp_path / 'b.pkl', 3)
    out = tmp_path / 'side.png'
    assert side_by_side({'deploy': tmp_path / 'a.pkl',
                         'INT8': tmp_path / 'b.pkl'}, str(out),
                        ('square', 'circle', 'triangle'), num_images=2,
                        scale=2) == str(out)
    pic = cv2.imread(str(out))
    assert pic.shape == (2 * (2 * h + 24), 2 * 2 * w, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'a.pkl', 'b.pkl', 'side.png']
    # boxes of score 0.9 are drawn from score_thr 0.5 up, not from 0.95
    drawn = {}
    for thr in (0.5, 0.95, 2.0):
        side_by_side({'deploy': tmp_path / 'a.pkl'}, str(out),
                     ('square', 'circle', 'triangle'), num_images=1,
                     scale=1, score_thr=thr)
        drawn[thr] = cv2.imread(str(out))
    assert (drawn[0.95] == drawn[2.0]).all()
    assert not (drawn[0.5] == drawn[2.0]).all()
    with pytest.raises(ValueError, match='no detection results'):
        side_by_side({}, str(out), ())


def test_demo_summary_openvino_rows(toy_data, tmp_path, monkeypatch):
    """The end-to-end graph also run by OpenVINO in the same rounds; a
    machine where OpenVINO is not usable gets the reason, not a crash."""
    import os.path as osp
    import sys
    pytest.importorskip('onnxruntime')
    from mmrepvgg.export import openvino
    from mmrepvgg.export.onnx_export import export_onnx
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(
        osp.abspath(__file__))), 'export'))
    from _export_helpers import random_detector
    monkeypatch.chdir(toy_data)
    cfg, model = random_detector('toy')  # scores that do not saturate
    ckpt, onnx_file = tmp_path / 'ckpt.pth', tmp_path / 'e2e.onnx'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    export_onnx(cfg, TOY_CONFIG, str(ckpt), str(onnx_file), mode='end2end',
                img_shape_input=True, verify_images=0)
    s = demo_summary(cfg, TOY_CONFIG, str(ckpt), {'ONNX': str(onnx_file)},
                     {'ONNX (OpenVINO)': 0.5}, repeats=2, warmup=1,
                     openvino=True)
    reason = openvino.unusable_reason()
    forms = [r['form'] for r in s['rows']]
    if reason is None:
        assert forms[2:] == ['ONNX', 'ONNX (OpenVINO)'] and not s['skipped']
        assert '| ONNX (OpenVINO) | 0.500 |' in s['table']
        assert len(s['timing'].times['ONNX (OpenVINO)']) == 2
    monkeypatch.setattr(openvino, '_verdict', {})
    monkeypatch.setattr(openvino, '_probe', lambda: 'simulated SIGFPE')
    s = demo_summary(cfg, TOY_CONFIG, str(ckpt), {'ONNX': str(onnx_file)},
                     {}, repeats=2, warmup=1, openvino=True)
    assert [r['form'] for r in s['rows']][2:] == ['ONNX']
    assert s['skipped'] == {'ONNX (OpenVINO)': 'simulated SIGFPE'}
