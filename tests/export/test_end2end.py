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
from mmrepvgg.export.onnx_export import ExportError, export_onnx  # noqa
from mmrepvgg.export.postprocess import METADATA_KEY  # noqa: E402
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


@pytest.mark.parametrize('name,img_shape', [('retinanet', False),
                                            ('fcos', False), ('atss', True)])
def test_a0_detectors_export_end_to_end(name, img_shape, detectors,
                                        tmp_path):
    cfg, model, out, report = _export(name, detectors, tmp_path,
                                      img_shape_input=img_shape)
    assert report.verdict['passed']
    post, pred = report.postprocess_check, report.predict_check
    assert post['images'] == pred['images'] == 3  # batches of 1 and 2
    assert post['differing'] == [] and pred['differing'] == []
    assert pred['detections'] == pred['matched'] >= 30
    inputs = ['input', 'img_shape'] if img_shape else ['input']
    assert report.inputs == inputs
    model_proto = onnx.load(str(out))
    graph = model_proto.graph
    assert [i.name for i in graph.input] == inputs
    assert [o.name for o in graph.output] == ['dets', 'labels']
    dims = [d.dim_param or d.dim_value
            for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    assert 'NonMaxSuppression' in {n.op_type for n in graph.node}
    meta = {p.key: p.value for p in model_proto.metadata_props}
    settings = json.loads(meta[METADATA_KEY])
    assert settings['score_thr'] == 0.3 and settings['num_classes'] == 4
    assert settings['img_shape_input'] is img_shape

    # a batch size and image size the exporter did not see; with the
    # img_shape input, images padded inside the batch
    deploy = switch_to_deploy(model, verbose=False)
    x = torch.randn(3, 3, 96, 192)
    shapes = [(96, 192), (70, 192), (96, 133)] if img_shape else \
        [(96, 192)] * 3
    feeds = dict(input=x.numpy())
    if img_shape:
        feeds['img_shape'] = np.array(shapes)
    dets, labels = runtime.run(runtime.make_session(str(out)), feeds)
    k = cfg.model.test_cfg.max_per_img
    assert dets.shape == (3, k, 5) and labels.shape == (3, k)
    assert dets.dtype == np.float32 and labels.dtype == np.int64
    ours = split_dets(dets, labels)
    ref = mmdet_predict(deploy, x, make_samples(shapes, (96, 192)))
    res = compare_detections(ours, ref, box_tolerance((96, 192)), 1e-4)
    assert res['differing'] == [], res['differing']
    assert res['matched'] == res['reference_detections'] >= 10
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


def test_intermediate_graph_lives_in_a_scratch_folder(
        detectors, tmp_path, monkeypatch):
    """The verification graph goes to a private scratch folder (removed by
    the next run after a SIGKILL), never next to OUTPUT."""
    import os.path as osp

    from mmrepvgg.export import onnx_export
    seen, real = [], onnx_export.build_graph

    def build_graph(graph, path, opts):
        seen.append(path)
        return real(graph, path, opts)

    monkeypatch.setattr(onnx_export, 'build_graph', build_graph)
    _export('toy', detectors, tmp_path, shape=(64, 64))
    (path, ) = seen
    assert osp.basename(osp.dirname(path)).startswith('.mmrepvgg-export.')
    assert not osp.exists(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['toy.onnx',
                                                          'toy.pth']
