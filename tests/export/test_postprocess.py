"""The in-graph post-processing (PyTorch, no ONNX): identical to mmdet's
predict on RetinaNet, FCOS, ATSS and the toy detector; unsupported heads
and test_cfgs refused with a reason."""
import pytest
import torch
from _export_helpers import random_detector

from mmrepvgg.deploy import switch_to_deploy
from mmrepvgg.export.postprocess import (End2EndDetector, PostProcessError,
                                         check_head, describe_settings)
from mmrepvgg.export.verify import (compare_detections, make_samples,
                                    mmdet_predict, split_dets)


@pytest.mark.parametrize('name', ['toy', 'retinanet', 'fcos', 'atss'])
@pytest.mark.parametrize('img_shape', [False, True])
def test_postprocess_equals_mmdet_predict(name, img_shape, detectors):
    _, model = detectors(name)
    model = switch_to_deploy(model, verbose=False)
    e2e = End2EndDetector(model, with_img_shape=img_shape).eval()
    x = torch.randn(2, 3, 128, 160)
    shapes = [(100, 150), (128, 97)] if img_shape else [(128, 160)] * 2
    with torch.no_grad():
        dets, labels = e2e(x, torch.tensor(shapes))
    assert dets.shape == (2, e2e.postprocess.max_per_img, 5)
    assert labels.shape == (2, e2e.postprocess.max_per_img)
    assert labels.dtype == torch.long
    ref = mmdet_predict(model, x, make_samples(shapes, (128, 160)))
    ours = split_dets(dets.numpy(), labels.numpy())
    # the same float32 operations: equal up to the last bit of the
    # vectorized sigmoid/exp (which lane computes an element varies)
    res = compare_detections(ours, ref, box_tol=1e-3, score_tol=1e-6)
    assert res['differing'] == [], res['differing']
    assert res['detections'] == res['reference_detections'] >= 3
    # padding: zero rows and label -1 after the detections, best first
    for d, lab in zip(dets, labels):
        n = int((lab >= 0).sum())
        assert (lab[n:] == -1).all() and (d[n:] == 0).all()
        assert (d[1:n, 4] <= d[:n - 1, 4]).all()
    if img_shape:  # clipped to each image's own shape
        for (h, w), o in zip(shapes, ours):
            assert o['bboxes'][:, 0::2].max() <= w
            assert o['bboxes'][:, 1::2].max() <= h


@pytest.mark.parametrize('case', ['soft_nms', 'nms_pre', 'max_per_img',
                                  'coder', 'nms_option'])
def test_unsupported_head_refused(case):
    extra = {
        'soft_nms': {'model.test_cfg.nms.type': 'soft_nms'},
        'nms_pre': {'model.test_cfg.nms_pre': -1},
        'max_per_img': {'model.test_cfg.max_per_img': 0},
        'coder': {'model.bbox_head.bbox_coder': dict(
            _delete_=True, type='TBLRBBoxCoder')},
        'nms_option': {'model.test_cfg.nms.score_threshold': 0.1},
    }[case]
    expect = {'soft_nms': 'only "nms"', 'nms_pre': 'nms_pre=-1',
              'max_per_img': 'max_per_img=0', 'coder': 'TBLRBBoxCoder',
              'nms_option': 'score_threshold'}[case]
    _, model = random_detector('toy', extra=extra)
    with pytest.raises(PostProcessError, match=expect):
        check_head(model.bbox_head)


def test_settings_are_described(detectors):
    _, model = detectors('fcos')
    e2e = End2EndDetector(model)
    text = describe_settings(e2e.postprocess.settings)
    assert text.startswith('score_thr 0.3, nms_pre 1000 per level, nms iou '
                           '0.5, max_per_img 100, min_bbox_size 0; 4 classes '
                           '(sigmoid), MlvlPointGenerator strides '
                           '8,16,32,64,128, DistancePointBBoxCoder')
