"""End-to-end ONNX export (post-processing in the graph) of the RetinaNet,
FCOS and ATSS A0 configs with random weights: verified by the exporter, and
checked again here on a new batch size and image size against mmdet's
predict; dynamic axes; metadata; no file when verification fails."""
import json

import numpy as np
import pytest
import torch
from _export_helpers import config_path

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

import onnx  # noqa: E402

from mmrepvgg.deploy import switch_to_deploy  # noqa: E402
from mmrepvgg.export import runtime  # noqa: E402
from mmrepvgg.export.metadata import METADATA_KEY  # noqa: E402
from mmrepvgg.export.onnx_export import ExportError, export_onnx  # noqa
from mmrepvgg.export.verify import (box_tolerance,  # noqa: E402
                                    compare_detections, make_samples,
                                    mmdet_predict, split_dets)


def _export(name, detectors, tmp_path, **kwargs):
    cfg, model = detectors(name)
    ckpt = tmp_path / f'{name}.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    out = tmp_path / f'{name}.onnx'
    kwargs.setdefault('shape', (128, 160))  # GN needs >1 value at 1/128
    report = export_onnx(cfg, config_path(name), str(ckpt), str(out),
                         mode='end2end', verify_images=0, **kwargs)
    return cfg, model, out, report


@pytest.mark.parametrize('name', ['retinanet', 'fcos', 'atss'])
def test_a0_detectors_export_end_to_end(name, detectors, tmp_path):
    cfg, model, out, report = _export(name, detectors, tmp_path)
    assert report['verdict']['passed']
    post, pred = report['postprocess_check'], report['predict_check']
    assert post['images'] == pred['images'] == 3  # batches of 1 and 2
    assert post['differing'] == [] and pred['differing'] == []
    assert pred['detections'] == pred['matched'] >= 30
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ['input']
    assert [o.name for o in graph.output] == ['dets', 'labels']
    dims = [d.dim_param or d.dim_value
            for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    assert 'NonMaxSuppression' in {n.op_type for n in graph.node}
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    settings = json.loads(meta[METADATA_KEY])
    assert settings['score_thr'] == 0.3 and settings['num_classes'] == 4

    # a batch size and image size the exporter did not see
    deploy = switch_to_deploy(model, verbose=False)
    x = torch.randn(3, 3, 96, 192)
    dets, labels = runtime.run_onnx(runtime.make_session(str(out)),
                                    x.numpy())
    k = cfg.model.test_cfg.max_per_img
    assert dets.shape == (3, k, 5) and labels.shape == (3, k)
    assert dets.dtype == np.float32 and labels.dtype == np.int64
    ref = mmdet_predict(deploy, x, make_samples([(96, 192)] * 3, (96, 192)))
    res = compare_detections(split_dets(dets, labels), ref,
                             box_tolerance((96, 192)), 1e-4)
    assert res['differing'] == [], res['differing']
    assert res['matched'] == res['reference_detections'] >= 10


def test_img_shape_input_clips_like_mmdet(detectors, tmp_path):
    cfg, model, out, report = _export('atss', detectors, tmp_path,
                                      img_shape_input=True)
    assert report['inputs'] == ['input', 'img_shape']
    assert report['postprocess_check']['differing'] == []
    session = runtime.make_session(str(out))
    assert runtime.input_names(session) == ['input', 'img_shape']
    deploy = switch_to_deploy(model, verbose=False)
    x = torch.randn(2, 3, 128, 160)
    shapes = [(90, 160), (128, 101)]  # images padded to the batch shape
    dets, labels = runtime.run(session, dict(input=x.numpy(),
                                             img_shape=np.array(shapes)))
    ours = split_dets(dets, labels)
    ref = mmdet_predict(deploy, x, make_samples(shapes, (128, 160)))
    res = compare_detections(ours, ref, box_tolerance((128, 160)), 1e-4)
    assert res['differing'] == [] and res['matched'] >= 10
    for (h, w), o in zip(shapes, ours):
        assert o['bboxes'][:, 0::2].max() <= w
        assert o['bboxes'][:, 1::2].max() <= h


@pytest.mark.parametrize('case', ['nan', 'postprocess'])
def test_failed_verification_writes_nothing(case, detectors, tmp_path,
                                            monkeypatch):
    real = runtime.run

    def broken(session, feeds, outputs=None):
        out = real(session, feeds, outputs)
        if case == 'nan':  # a NaN in the raw class scores
            out[2] = np.full_like(out[2], np.nan)
        else:  # the graph's detections lose their best box
            out[0] = out[0].copy()
            out[0][:, 0] = 0
        return out

    monkeypatch.setattr(runtime, 'run', broken)
    with pytest.raises(ExportError) as e:
        _export('toy', detectors, tmp_path)
    msg = str(e.value)
    assert 'not written' in msg
    if case == 'nan':
        assert 'error vs float64 truth inf' in msg
    else:
        assert 'post-processing differs' in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ['toy.pth']
