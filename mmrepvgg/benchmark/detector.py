"""Whole-detector forms for the demo's one-table summary: accuracy on the
config's test set and end-to-end latency (preprocessed batch in, detections
out) of the PyTorch training form, the PyTorch deploy form (float32 and
bfloat16) and exported onnxruntime graphs (FP32, INT8), timed in the same
rounds (:func:`mmrepvgg.utils.timing.measure`); and a picture of the
detections of two forms side by side (:func:`side_by_side`).

The bfloat16 form (:func:`to_bf16_detector`) runs backbone, neck and head
convolutions in bfloat16 and the post-processing (decoding, NMS) in float32,
like the INT8 graph does.
"""
import copy
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from mmrepvgg.utils.timing import measure


def _to_float32(outs):
    if isinstance(outs, torch.Tensor):
        return outs.float() if outs.is_floating_point() else outs
    if isinstance(outs, (list, tuple)):
        return type(outs)(_to_float32(o) for o in outs)
    return outs


def to_bf16_detector(model: nn.Module) -> nn.Module:
    """A copy of a (deploy-form) single-stage detector whose backbone, neck
    and head run in bfloat16: the input is cast to bfloat16 before the
    backbone and the head's outputs back to float32 before the
    post-processing.

    Args:
        model (nn.Module): an mmdet detector with ``backbone``, optional
            ``neck`` and ``bbox_head``.

    Returns:
        nn.Module: the bfloat16 copy (eval mode).
    """
    model = copy.deepcopy(model).eval()
    parts = [model.backbone, model.bbox_head]
    if getattr(model, 'with_neck', False):
        parts.append(model.neck)
    for p in parts:
        p.to(torch.bfloat16)
    model.backbone.register_forward_pre_hook(
        lambda m, args: tuple(a.to(torch.bfloat16) if isinstance(
            a, torch.Tensor) else a for a in args))
    model.bbox_head.register_forward_hook(
        lambda m, args, out: _to_float32(out))
    return model


@torch.no_grad()
def evaluate_model(cfg, model: nn.Module) -> Dict[str, float]:
    """Run ``model`` (any PyTorch form) over the config's test set with its
    test evaluator, in-process, one batch of the test dataloader at a time.

    Args:
        cfg (Config): the config (``test_dataloader``, ``test_evaluator``).
        model (nn.Module): the detector, eval mode.

    Returns:
        dict: the evaluator's metrics (e.g. ``coco/bbox_mAP``).
    """
    from mmengine.evaluator import Evaluator
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    loader = Runner.build_dataloader(copy.deepcopy(cfg.test_dataloader))
    evaluator = Evaluator(copy.deepcopy(cfg.test_evaluator))
    evaluator.dataset_meta = loader.dataset.metainfo
    model.eval()
    for data in loader:
        outputs = model.test_step(data)
        evaluator.process(data_samples=outputs, data_batch=data)
    return evaluator.evaluate(len(loader.dataset))


def predict_fn(model: nn.Module, x: torch.Tensor,
               samples: Sequence) -> Callable[[], object]:
    """Zero-argument call of ``model.predict(x, samples, rescale=False)``
    (what an end-to-end graph computes) under inference mode."""

    def call():
        with torch.inference_mode():
            return model.predict(x, samples, rescale=False)
    return call


def onnx_fn(path: str, feed: Mapping[str, np.ndarray],
            threads: Optional[int] = None) -> Callable[[], object]:
    """Zero-argument run of an exported graph on ``feed`` (inputs the graph
    does not take are dropped)."""
    from mmrepvgg.export.runtime import input_names, make_session
    sess = make_session(path, threads)
    feed = {k: feed[k] for k in input_names(sess)}
    return lambda: sess.run(None, feed)


def format_summary(rows: Sequence[dict], title: str = '') -> str:
    """The demo's one table: form | toy-val mAP | latency | speed-up.

    Args:
        rows (Sequence[dict]): ``form``, ``map`` (float or ``None``),
            ``latency_ms`` and ``speedup`` (vs the first row), in order.
        title (str): a line above the table (e.g. the input shape).

    Returns:
        str: a Markdown table (readable as plain text).
    """
    lines = [title] if title else []
    lines += ['| form | toy-val mAP | latency ms | speed-up |',
              '|---|---:|---:|---:|']
    for r in rows:
        m = 'n/a' if r.get('map') is None else f'{r["map"]:.3f}'
        lines.append(f'| {r["form"]} | {m} | {r["latency_ms"]:.2f} | '
                     f'{r["speedup"]:.2f}x |')
    return '\n'.join(lines)


def demo_summary(cfg,
                 config_path: str,
                 checkpoint: str,
                 onnx_files: Mapping[str, str],
                 maps: Mapping[str, Optional[float]],
                 bf16: Optional[bool] = None,
                 batch: int = 1,
                 repeats: int = 20,
                 warmup: int = 3,
                 threads: Optional[int] = None,
                 unsafe_load: bool = False,
                 network_batch: int = 0) -> dict:
    """Time the forms of a toy detector side by side and build the summary.

    Forms, in table order: ``PyTorch training``, ``PyTorch deploy``,
    ``PyTorch deploy bf16`` (when ``bf16``; default: when the CPU has
    native bfloat16; its mAP is measured here with :func:`evaluate_model`
    unless ``maps`` has it), then one row per ``onnx_files`` entry (e.g.
    ``{'ONNX FP32': fp32.onnx, 'ONNX INT8': int8.onnx}``). The input is the
    first ``batch`` images of the test set through the test pipeline.

    Args:
        cfg (Config): the training config.
        config_path (str): its file.
        checkpoint (str): the training-form checkpoint.
        onnx_files (Mapping[str, str]): form name -> end-to-end graph.
        maps (Mapping[str, float]): form name -> test-set mAP measured
            elsewhere (``tools/test.py``); missing forms show ``n/a``.
        bf16 (bool, optional): include the bfloat16 form.
        batch (int): images per timed call.
        repeats (int): timed rounds.
        warmup (int): untimed rounds.
        threads (int, optional): onnxruntime threads (PyTorch's are set by
            the caller).
        unsafe_load (bool): unpickle the checkpoint freely.
        network_batch (int): also time the training and deploy networks
            alone (tensor forward, no post-processing) on a random batch of
            this size (0: not).

    Returns:
        dict: ``rows`` (for :func:`format_summary`), ``table`` (text),
        ``timing`` (:class:`~mmrepvgg.utils.timing.Timing`), ``shape``;
        ``network`` (``timing`` of the forms ``training`` and ``deploy``,
        ``shape``, ``threads``) with ``network_batch``.
    """
    from mmengine.dataset import pseudo_collate

    from mmrepvgg.apis.convert import (build_model, load_weights,
                                       make_inputs, read_state_dict,
                                       test_input_shape)
    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.export.quantize import build_split
    from .options import cpu_has_bf16
    training = build_model(cfg)
    sd, _ = read_state_dict(checkpoint, unsafe_load)
    load_weights(training, sd, checkpoint, config_path)
    training.eval()
    deploy = switch_to_deploy(training, inplace=False, verbose=False)
    ds = build_split(cfg, 'test')
    data = training.data_preprocessor(
        pseudo_collate([ds[i] for i in range(min(batch, len(ds)))]), False)
    x, samples = data['inputs'], data['data_samples']
    shapes = np.asarray([s.metainfo['img_shape'][:2] for s in samples],
                        np.int64)
    feed = dict(input=x.numpy(), img_shape=shapes)
    fns = {'PyTorch training': predict_fn(training, x, samples),
           'PyTorch deploy': predict_fn(deploy, x, samples)}
    maps = dict(maps)
    if bf16 is None:
        bf16 = cpu_has_bf16()
    if bf16:
        model16 = to_bf16_detector(deploy)
        fns['PyTorch deploy bf16'] = predict_fn(model16, x, samples)
        if maps.get('PyTorch deploy bf16') is None:
            metrics = evaluate_model(cfg, model16)
            maps['PyTorch deploy bf16'] = metrics.get('coco/bbox_mAP')
    for name, path in onnx_files.items():
        fns[name] = onnx_fn(path, feed, threads)
    timing = measure(fns, repeats, warmup,
                     threads=threads or torch.get_num_threads())
    first = next(iter(fns))
    rows = [dict(form=k, map=maps.get(k), latency_ms=1e3 * timing.median(k),
                 speedup=timing.ratio(first, k)['median']) for k in fns]
    shape = tuple(x.shape)
    title = (f'input {"x".join(map(str, shape))}, '
             f'{torch.get_num_threads()} PyTorch threads; '
             f'{timing.describe()}')
    out = dict(rows=rows, table=format_summary(rows, title), timing=timing,
               shape=shape)
    if network_batch:
        xb, sb = make_inputs(test_input_shape(cfg), batch=network_batch)
        with torch.inference_mode():
            net = measure({'training': lambda: training._forward(xb, sb),
                           'deploy': lambda: deploy._forward(xb, sb)},
                          repeats, warmup, threads=torch.get_num_threads())
        out['network'] = dict(timing=net, shape=tuple(xb.shape),
                              threads=torch.get_num_threads())
    return out


def side_by_side(results: Mapping[str, str],
                 out_file: str,
                 classes: Sequence[str],
                 num_images: int = 4,
                 score_thr: float = 0.3,
                 scale: Optional[int] = None) -> str:
    """One PNG of the first ``num_images`` test images, one row per image
    and one column per form, each drawn with its detections by mmdet's
    ``DetLocalVisualizer`` (e.g. the deploy model next to the INT8 graph).

    Args:
        results (Mapping[str, str]): column title -> detection pickle of
            ``tools/test.py --out`` (same test set, same order).
        out_file (str): the PNG, written atomically.
        classes (Sequence[str]): class names (the dataset's metainfo).
        num_images (int): rows.
        score_thr (float): detections drawn above this score.
        scale (int, optional): images (and boxes) enlarged this many times
            before drawing; default: to about 384 pixels.

    Returns:
        str: ``out_file``.
    """
    import mmcv
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData

    from mmrepvgg.export.verify import dumped_detections
    if not results:
        raise ValueError('no detection results to draw')
    loaded = {title: dumped_detections(path)
              for title, path in results.items()}
    n = min(num_images, *(len(v) for v in loaded.values()))
    vis = DetLocalVisualizer(name=f'side_by_side_{id(loaded)}',
                             line_width=2)
    vis.dataset_meta = dict(classes=tuple(classes))
    rows = []
    for i in range(n):
        first = next(iter(loaded.values()))[i]
        image = mmcv.imread(first['img_path'], channel_order='rgb')
        k = scale or max(1, round(384 / max(image.shape[:2])))
        image = mmcv.imrescale(image, float(k), interpolation='nearest')
        cells = []
        for title, res in loaded.items():
            r = res[i]
            if r['img_path'] != first['img_path']:
                raise ValueError(f'{title}: image {i} is {r["img_path"]}, '
                                 f'not {first["img_path"]}')
            sample = DetDataSample()
            inst = InstanceData()
            for key in ('bboxes', 'scores', 'labels'):
                inst[key] = torch.as_tensor(r[key])
            inst.bboxes = inst.bboxes.float() * k
            sample.pred_instances = inst
            vis.add_datasample(title, image, sample, draw_gt=False,
                               pred_score_thr=score_thr)
            cell = vis.get_image()
            cells.append(_titled(cell, title))
        rows.append(np.concatenate(cells, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)),
                   constant_values=255) for r in rows]
    _write_png(np.concatenate(rows, axis=0), out_file)
    return out_file


def _titled(image: np.ndarray, title: str, height: int = 24) -> np.ndarray:
    """``image`` (RGB) with a white band and ``title`` above it."""
    import cv2
    band = np.full((height, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, title[:max(1, image.shape[1] // 10)], (4, height - 7),
                cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image.astype(np.uint8)], axis=0)


def _write_png(rgb: np.ndarray, path: str) -> None:
    import cv2

    from mmrepvgg.utils.fileio import atomic_write_bytes
    ok, data = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise ValueError(f'{path}: PNG encoding failed')
    atomic_write_bytes(path, data.tobytes())
