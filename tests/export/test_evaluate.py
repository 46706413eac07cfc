"""OnnxRuntimeDetector (the model of ``tools/test.py CONFIG MODEL.onnx``):
its predict() equals mmdet's predict(rescale=True) of the deploy model on
the same preprocessed batch: padded images, scale factors, a fixed-size
graph."""
import numpy as np
import onnx
import pytest
import torch
from _export_helpers import config_path

pytest.importorskip('onnxruntime')

from mmrepvgg.deploy import switch_to_deploy  # noqa: E402
from mmrepvgg.export.evaluate import OnnxRuntimeDetector  # noqa: E402
from mmrepvgg.export.onnx_export import export_onnx  # noqa: E402
from mmrepvgg.export.verify import (compare_detections,  # noqa: E402
                                    instances_to_numpy, make_samples)


@pytest.fixture(scope='module')
def toy_graph(detectors, tmp_path_factory):
    d = tmp_path_factory.mktemp('evaluate')
    cfg, model = detectors('toy')
    torch.save({'state_dict': model.state_dict()}, d / 'toy.pth')
    export_onnx(cfg, config_path('toy'), str(d / 'toy.pth'),
                str(d / 'toy.onnx'), mode='end2end', img_shape_input=True,
                shape=(128, 128), verify_images=0)
    return cfg, switch_to_deploy(model, verbose=False), d / 'toy.onnx'


def _samples(shapes, batch_shape, scales):
    samples = make_samples(shapes, batch_shape)
    for s, (h, w), (sx, sy) in zip(samples, shapes, scales):
        s.set_metainfo(dict(scale_factor=(sx, sy),
                            ori_shape=(round(h / sy), round(w / sx))))
    return samples


def _compare(ours, ref):
    res = compare_detections(instances_to_numpy(ours),
                             instances_to_numpy(ref), 0.02, 1e-4)
    assert res['differing'] == [], res['differing']
    assert res['matched'] >= 5
    return res


@pytest.mark.parametrize('fixed', [False, True])
def test_predict_equals_mmdet_rescaled(toy_graph, tmp_path, fixed):
    cfg, deploy, path = toy_graph
    if fixed:  # the same graph with a fixed 2x3x128x160 input
        m = onnx.load(str(path))
        dims = m.graph.input[0].type.tensor_type.shape.dim
        for d, v in zip(dims, (2, 3, 128, 160)):
            d.ClearField('dim_param')
            d.dim_value = v
        path = tmp_path / 'fixed.onnx'
        onnx.save(m, str(path))
    det = OnnxRuntimeDetector(str(path), cfg.model.data_preprocessor)
    assert det.with_img_shape
    assert det.fixed_hw == ((128, 160) if fixed else None)
    # 3 images padded into a 96x160 batch, resized by various factors
    x = torch.randn(3, 3, 96, 160)
    shapes = [(96, 160), (70, 150), (96, 101)]
    scales = [(1.0, 1.0), (1.25, 1.1), (0.8, 0.5)]
    ours = det.predict(x, _samples(shapes, (96, 160), scales))
    if fixed:  # the evaluator pads to the graph's size: mmdet on the same
        x = torch.nn.functional.pad(x, (0, 0, 0, 32))
    with torch.no_grad():
        ref = deploy.predict(x, _samples(shapes, tuple(x.shape[2:]),
                                         scales), rescale=True)
    _compare(ours, ref)


def test_graph_without_img_shape_on_unpadded_batch(detectors, tmp_path):
    cfg, model = detectors('toy')
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'toy.pth')
    export_onnx(cfg, config_path('toy'), str(tmp_path / 'toy.pth'),
                str(tmp_path / 'toy.onnx'), mode='end2end',
                shape=(128, 128), verify_images=0)
    det = OnnxRuntimeDetector(str(tmp_path / 'toy.onnx'),
                              cfg.model.data_preprocessor)
    assert not det.with_img_shape and det.settings['max_per_img'] == 20
    x = torch.randn(2, 3, 128, 128)
    scales = [(2.0, 2.0), (0.5, 0.75)]
    ours = det.predict(x, _samples([(128, 128)] * 2, (128, 128), scales))
    with torch.no_grad():
        ref = switch_to_deploy(model, verbose=False).predict(
            x, _samples([(128, 128)] * 2, (128, 128), scales), rescale=True)
    res = _compare(ours, ref)
    # boxes are in the original images' frame (divided by scale_factor)
    boxes = instances_to_numpy(ours)[1]['bboxes']
    assert boxes[:, 0::2].max() <= 128 / 0.5 and boxes.max() > 128
    assert res['images'] == 2
    assert np.isfinite(boxes).all()
