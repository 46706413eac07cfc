"""Random-weight detectors whose outputs make post-processing meaningful.

With random weights every score saturates (all 1.0, ties everywhere) or
falls below ``score_thr``, and box regressions explode: nothing tests the
decoding, the thresholds or NMS. :func:`random_detector` randomizes a
detector (weights and batch-norm statistics, :func:`mmrepvgg.testing.
randomize_`) and then rescales the head's last convolutions so that class
logits spread around ``-1`` (scores 0.1-0.5, many above a 0.3 threshold,
none saturated), box regressions stay moderate and score factors vary.
"""
import os.path as osp

import torch
import torch.nn as nn

from mmrepvgg.apis.convert import build_model, load_config
from mmrepvgg.testing import randomize_

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CONFIG = osp.join(ROOT, 'configs', 'toy',
                      'retinanet_repvgg-tiny_repvgg-fpn_toy.py')
A0_CONFIGS = {
    'retinanet': 'configs/repvgg/retinanet_repvgg-a0_fpn_1x_coco.py',
    'fcos': 'configs/repvgg/fcos_repvgg-a0_fpn_gn-head_1x_coco.py',
    'atss': 'configs/repvgg/atss_repvgg-a0_fpn_1x_coco.py',
}
#: Shrink the A0 detectors' neck and head (the backbone stays A0) and give
#: them 4 classes and a score threshold random scores cross.
SMALL = {
    'model.neck.out_channels': 32,
    'model.bbox_head.in_channels': 32,
    'model.bbox_head.feat_channels': 32,
    'model.bbox_head.stacked_convs': 1,
    'model.bbox_head.num_classes': 4,
    'model.test_cfg.score_thr': 0.3,
}
TOY = {'model.test_cfg.score_thr': 0.3}

#: (suffix of the head's last conv, target std of its output, bias)
_TARGETS = (('cls', 1.0, -1.0), ('reg', 0.3, None), ('centerness', 1.0,
                                                     0.0))


def config_path(name: str) -> str:
    return TOY_CONFIG if name == 'toy' else osp.join(ROOT, A0_CONFIGS[name])


def options(name: str) -> dict:
    return dict(TOY if name == 'toy' else SMALL)


@torch.no_grad()
def calibrate_head_(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Rescale the head's last convs (see the module docstring)."""
    head = model.bbox_head
    convs = {}
    for name, m in head.named_modules():
        for suffix, std, bias in _TARGETS:
            if isinstance(m, nn.Conv2d) and name.endswith(suffix):
                convs[name] = (m, std, bias)
    outs = {name: [] for name in convs}
    hooks = [m.register_forward_hook(
        lambda mod, a, out, n=name: outs[n].append(out.flatten()))
        for name, (m, _, _) in convs.items()]
    try:
        head(model.extract_feat(x))
    finally:
        for h in hooks:
            h.remove()
    for name, (m, std, bias) in convs.items():
        y = torch.cat(outs[name])
        m.weight.mul_(std / max(float(y.std()), 1e-12))
        if bias is None:  # anchor deltas around 0, FCOS distances ~ stride
            bias = 1.0 if 'conv_reg' in name else 0.0
        m.bias.fill_(bias)
    return model


def random_detector(name: str, seed: int = 0, extra: dict = None):
    """``(cfg, model)``: the config ``name`` (``toy`` or an A0 config) with
    :func:`options`, random weights, calibrated head, eval mode."""
    cfg = load_config(config_path(name), dict(options(name), **(extra or {})))
    model = build_model(cfg)
    randomize_(model, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    calibrate_head_(model, torch.randn(2, 3, 128, 128, generator=g))
    return cfg, model


def end2end_graph(path, dets, labels,
                  input_dims=('batch', 3, 'height', 'width'),
                  metadata=None, follow_batch=True, label_dtype='int64'):
    """Write a tiny graph with the end-to-end detector signature (input
    ``input``; outputs ``dets``, ``labels``) that ignores its image and
    returns the given values: hostile outputs without a detector.

    Args:
        path: the ``.onnx`` file written.
        dets, labels: arrays ``(1, K, 5)`` / ``(1, K)``, or ``(shape,
            value)`` pairs made at run time by ``ConstantOfShape`` (large
            outputs from a small file).
        input_dims: the declared input dims (ints fixed, strings dynamic).
        metadata (dict, optional): the ``mmrepvgg.postprocess`` metadata.
        follow_batch (bool): repeat the outputs for every image of the
            batch (else always one image).
        label_dtype (str): numpy dtype of ``labels``.
    """
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mmrepvgg.export.postprocess import METADATA_KEY
    nodes, inits = [], []

    def value(name, v, dtype):
        if isinstance(v, tuple):  # (shape, fill value)
            shape, fill = v
            inits.append(numpy_helper.from_array(
                np.asarray(shape, np.int64), f'{name}_shape'))
            nodes.append(helper.make_node(
                'ConstantOfShape', [f'{name}_shape'], [f'{name}_c'],
                value=numpy_helper.from_array(np.asarray([fill], dtype))))
        else:
            inits.append(numpy_helper.from_array(np.asarray(v, dtype),
                                                 f'{name}_c'))
        if not follow_batch:
            nodes.append(helper.make_node('Identity', [f'{name}_c'],
                                          [name]))
            return
        # Tile over the batch: repeats (N, 1, 1...)
        rank = len(v[0]) if isinstance(v, tuple) else np.ndim(v)
        inits.append(numpy_helper.from_array(
            np.ones(rank - 1, np.int64), f'{name}_ones'))
        nodes.append(helper.make_node('Concat', ['n', f'{name}_ones'],
                                      [f'{name}_reps'], axis=0))
        nodes.append(helper.make_node('Tile', [f'{name}_c', f'{name}_reps'],
                                      [name]))

    inits.append(numpy_helper.from_array(np.asarray([0], np.int64), 'zero'))
    inits.append(numpy_helper.from_array(np.asarray([1], np.int64), 'one'))
    nodes.append(helper.make_node('Shape', ['input'], ['shape']))
    nodes.append(helper.make_node('Slice', ['shape', 'zero', 'one'], ['n']))
    value('dets', dets, np.float32)
    value('labels', labels, np.dtype(label_dtype))
    graph = helper.make_graph(
        nodes, 'hostile',
        [helper.make_tensor_value_info('input', TensorProto.FLOAT,
                                       list(input_dims))],
        [helper.make_tensor_value_info('dets', TensorProto.FLOAT,
                                       ['n', 'k', 5]),
         helper.make_tensor_value_info(
             'labels', helper.np_dtype_to_tensor_dtype(np.dtype(label_dtype)),
             ['n', 'k'])],
        initializer=inits)
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid('', 17)])
    if metadata is not None:
        helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    onnx.save(model, str(path))
    return path
