"""OnnxRuntimeDetector (the model of ``tools/test.py CONFIG MODEL.onnx``):
its predict() equals mmdet's predict(rescale=True) of the deploy model on
the same preprocessed batch: padded images, scale factors; hostile graphs
(wrong numbers, fixed or declared huge sizes, files that are not files) are
refused with one line naming the file (issue 19)."""
import os

import numpy as np
import onnx
import pytest
import torch
from _export_helpers import config_path, end2end_graph

pytest.importorskip('onnxruntime')

from mmrepvgg.deploy import switch_to_deploy  # noqa: E402
from mmrepvgg.export import runtime  # noqa: E402
from mmrepvgg.export.evaluate import (EvaluateError,  # noqa: E402
                                      OnnxRuntimeDetector,
                                      check_end2end_graph)
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


def test_predict_equals_mmdet_rescaled(toy_graph):
    cfg, deploy, path = toy_graph
    det = OnnxRuntimeDetector(str(path), cfg.model.data_preprocessor)
    assert det.with_img_shape
    # 3 images padded into a 96x160 batch, resized by various factors
    x = torch.randn(3, 3, 96, 160)
    shapes = [(96, 160), (70, 150), (96, 101)]
    scales = [(1.0, 1.0), (1.25, 1.1), (0.8, 0.5)]
    ours = det.predict(x, _samples(shapes, (96, 160), scales))
    with torch.no_grad():
        ref = deploy.predict(x, _samples(shapes, (96, 160), scales),
                             rescale=True)
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


# ------------------------------------------------- hostile graphs (issue 19)
#: The metadata an export of the toy detector writes.
SETTINGS = dict(score_thr=0.05, nms_pre=1000, iou_threshold=0.5,
                class_agnostic=False, max_per_img=20, min_bbox_size=0.0,
                num_classes=3, activation='sigmoid', priors='AnchorGenerator',
                strides=[[8, 8], [16, 16], [32, 32]],
                coder='DeltaXYWHBBoxCoder', clip_border=True)
BOX = [10.0, 10.0, 20.0, 30.0, 0.9]
PREPROCESSOR = dict(type='mmdet.DetDataPreprocessor')


def _predict(path, batch=1, num_classes=3):
    det = OnnxRuntimeDetector(str(path), PREPROCESSOR,
                              num_classes=num_classes)
    shapes = [(32, 32)] * batch
    return det.predict(torch.zeros(batch, 3, 32, 32),
                       _samples(shapes, (32, 32), [(1.0, 1.0)] * batch))


def test_hostile_graph_helper_scores_a_sane_graph(tmp_path):
    path = end2end_graph(tmp_path / 'ok.onnx', [[BOX, [0] * 5]], [[2, -1]],
                         metadata=SETTINGS)
    results = _predict(path, batch=2)
    for r in results:
        inst = r.pred_instances
        assert inst.labels.tolist() == [2]
        assert inst.bboxes.tolist() == [BOX[:4]]
        assert inst.scores.tolist() == pytest.approx([0.9])


@pytest.mark.parametrize('case', ['nan_box', 'inf_score', 'negative_label',
                                  'label_too_large', 'float_labels',
                                  'batch_mismatch', 'bad_rank',
                                  'too_many_detections'])
def test_outputs_that_would_score_wrongly_are_refused(case, tmp_path):
    dets, labels, batch = [[BOX]], [[1]], 1
    follow_batch, expect, label_dtype = True, None, 'int64'
    if case == 'nan_box':
        dets, expect = [[[float('nan')] + BOX[1:]]], 'non-finite'
    elif case == 'inf_score':
        dets, expect = [[BOX[:4] + [float('inf')]]], 'non-finite'
    elif case == 'negative_label':
        labels, expect = [[-3]], 'label -3: labels must be in [0, 3)'
    elif case == 'label_too_large':
        labels, expect = [[3]], 'label 3: labels must be in [0, 3)'
    elif case == 'float_labels':
        label_dtype, expect = 'float32', 'labels of type float32'
    elif case == 'batch_mismatch':
        follow_batch, batch = False, 2
        expect = 'for a batch of 2; expected (2, K, 5) and (2, K)'
    elif case == 'bad_rank':
        dets, expect = [BOX], 'expected (1, K, 5)'
    elif case == 'too_many_detections':  # 200000 rows from a tiny file
        dets, labels = ((1, 200000, 5), 0.0), ((1, 200000), -1)
        expect = 'returned 200000 detections per image; at most 1000'
    path = end2end_graph(tmp_path / f'{case}.onnx', dets, labels,
                         follow_batch=follow_batch, label_dtype=label_dtype)
    with pytest.raises(EvaluateError) as e:
        _predict(path, batch=batch)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(str(path)), msg
    assert expect in msg, msg


@pytest.mark.parametrize('case', ['batch', 'side', 'pixels', 'detections',
                                  'classes', 'no_classes', 'score_thr',
                                  'score_thr_nan', 'iou', 'metadata_keys',
                                  'rank'])
def test_declared_sizes_and_metadata_refused_before_running(case, tmp_path):
    """Refused when the detector is built: nothing runs a graph declaring a
    fixed (12000-image, 6000x6000) input."""
    dims, meta, num_classes = ('batch', 3, 'height', 'width'), SETTINGS, 3
    dets = [[BOX]]
    fixed = 'expected dynamic batch, height and width'
    if case == 'batch':
        dims, expect = (12000, 3, 'height', 'width'), fixed
    elif case == 'side':
        dims, expect = ('batch', 3, 6000, 6000), fixed
    elif case == 'pixels':
        dims, expect = (64, 3, 4096, 4096), fixed
    elif case == 'detections':
        dets = ((1, 200000, 5), 0.0)
        expect = 'declares 200000 detections per image'
    elif case == 'classes':
        meta, expect = dict(SETTINGS, num_classes=80), \
            'the graph detects 80 classes, the config 3'
    elif case == 'no_classes':
        meta, num_classes = None, None
        expect = 'the number of classes is unknown'
    elif case == 'score_thr':
        meta, expect = dict(SETTINGS, score_thr=2), 'score_thr=2: must be'
    elif case == 'score_thr_nan':
        meta, expect = dict(SETTINGS, score_thr=float('nan')), 'score_thr=nan'
    elif case == 'iou':
        meta, expect = dict(SETTINGS, iou_threshold=1.5), 'iou_threshold=1.5'
    elif case == 'metadata_keys':
        meta = {k: v for k, v in SETTINGS.items() if k != 'nms_pre'}
        expect = "lacks 'nms_pre'"
    elif case == 'rank':
        dims, expect = ('batch', 3, 'height'), 'expected (N, 3, H, W)'
    path = tmp_path / f'{case}.onnx'
    end2end_graph(path, dets, [[1]] if case != 'detections' else
                  ((1, 200000), -1), input_dims=dims, metadata=meta)
    if case == 'detections':  # declare the fixed count in the file
        m = onnx.load(str(path))
        m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 200000
        onnx.save(m, str(path))
    with pytest.raises(EvaluateError) as e:
        OnnxRuntimeDetector(str(path), PREPROCESSOR, num_classes=num_classes)
    msg = str(e.value)
    assert '\n' not in msg and str(path) in msg, msg
    assert expect in msg, msg


@pytest.mark.parametrize('kind', ['folder', 'fifo', 'huge', 'missing'])
def test_onnx_file_that_is_not_a_file_is_one_line(kind, tmp_path):
    """Never opened (a FIFO would block the read); a sparse file beyond the
    2 GiB protobuf limit is refused by its size."""
    path = tmp_path / 'model.onnx'
    if kind == 'folder':
        path.mkdir()
    elif kind == 'fifo':
        os.mkfifo(path)
    elif kind == 'huge':
        with open(path, 'wb') as f:
            f.truncate(2**31 + 1)
    expect = {'folder': 'is a folder', 'fifo': 'not a regular file (a FIFO',
              'huge': '2147483649 bytes, more than an ONNX protobuf holds',
              'missing': 'does not exist'}[kind]
    with pytest.raises(runtime.OnnxRuntimeError, match=r'^ONNX file ') as e:
        check_end2end_graph(str(path))
    assert str(path) in str(e.value) and expect in str(e.value)
    assert 'file file' not in str(e.value)
