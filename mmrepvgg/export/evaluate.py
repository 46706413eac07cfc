"""An exported end-to-end ONNX detector in mmdet's own test loop
(``tools/test.py CONFIG MODEL.onnx``: only the model is
:class:`OnnxRuntimeDetector`); a graph's declarations and metadata are
checked before the runner starts, every output before it is scored.
"""
import json
import os.path as osp
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.structures import InstanceData

from mmrepvgg.utils.cli import ToolError
from . import runtime
from .runtime import make_session, output_names
from .postprocess import (MAX_NMS_PRE, MAX_PER_IMG, METADATA_KEY,
                          PostProcessError, check_count, check_fraction,
                          describe_settings)

class EvaluateError(ToolError):
    """The ONNX file cannot be evaluated; the message names it."""


def check_end2end_graph(onnx_file: str,
                        num_classes: Optional[int] = None,
                        threads: Optional[int] = 1,
                        runtime: str = 'onnxruntime') -> dict:
    """``session``, ``with_img_shape``, ``settings`` and ``num_classes``
    of an end-to-end detector graph, every declaration checked before it
    runs (``num_classes``: the config's, which the metadata must equal)."""
    session = make_session(onnx_file, threads, runtime=runtime)
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    names = output_names(session)
    if 'input' not in inputs or names[:2] != ['dets', 'labels']:
        raise EvaluateError(
            f'{onnx_file}: not an end-to-end detector graph (inputs '
            f'{sorted(inputs)}, outputs {names}; expected input and '
            'dets, labels: export it with tools/deployment/export_onnx.py '
            '--postprocess)')
    extra = set(inputs) - {'input', 'img_shape'}
    if extra:
        raise EvaluateError(f'{onnx_file}: unknown graph inputs '
                            f'{sorted(extra)}')
    dims = inputs['input'].shape
    if len(dims) != 4:
        raise EvaluateError(f'{onnx_file}: input has shape {dims}; '
                            'expected (N, 3, H, W)')
    if any(isinstance(d, int) for d in dims[:1] + dims[2:]):
        raise EvaluateError(f'{onnx_file}: the input has the fixed shape '
                            f'{dims}; expected dynamic batch, height and '
                            'width (tools/deployment/export_onnx.py)')
    k = outputs['dets'].shape[1:2]
    if k and isinstance(k[0], int) and k[0] > MAX_PER_IMG:
        raise EvaluateError(f'{onnx_file}: the graph declares {k[0]} '
                            f'detections per image; at most {MAX_PER_IMG} '
                            'are accepted')
    meta = session.get_modelmeta().custom_metadata_map
    settings = {}
    try:
        if METADATA_KEY in meta:
            settings = json.loads(meta[METADATA_KEY])
            if not isinstance(settings, dict):
                raise ValueError('not a JSON object')
            check_fraction(settings['score_thr'], 'score_thr')
            check_fraction(settings['iou_threshold'], 'iou_threshold')
            check_count(settings['nms_pre'], 'nms_pre', MAX_NMS_PRE)
            check_count(settings['max_per_img'], 'max_per_img', MAX_PER_IMG)
            check_count(settings['num_classes'], 'num_classes', 2**31)
            describe_settings(settings)
    except PostProcessError as e:
        raise EvaluateError(f'{onnx_file}: metadata {METADATA_KEY}: '
                            f'{e}') from None
    except KeyError as e:
        raise EvaluateError(f'{onnx_file}: metadata {METADATA_KEY} lacks '
                            f'{e}') from None
    except (TypeError, ValueError, IndexError) as e:
        raise EvaluateError(f'{onnx_file}: metadata {METADATA_KEY} is '
                            f'malformed ({e})') from None
    if num_classes is None:
        num_classes = settings.get('num_classes')
        if num_classes is None:
            raise EvaluateError(f'{onnx_file}: the number of classes is '
                                'unknown (no mmrepvgg metadata in the graph '
                                'and no config given)')
    elif settings and settings['num_classes'] != num_classes:
        raise EvaluateError(f'{onnx_file}: the graph detects '
                            f'{settings["num_classes"]} classes, the config '
                            f'{num_classes}: export it from this config')
    return dict(session=session, with_img_shape='img_shape' in inputs,
                settings=settings, num_classes=num_classes)


@MODELS.register_module()
class OnnxRuntimeDetector(BaseDetector):
    """A detector whose ``predict`` runs an end-to-end ONNX graph; every
    output is checked before it is scored (:meth:`_check_outputs`)."""

    def __init__(self,
                 onnx_file: str,
                 data_preprocessor: Optional[dict] = None,
                 num_classes: Optional[int] = None,
                 threads: Optional[int] = None,
                 runtime: str = 'onnxruntime',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        self.onnx_file = onnx_file
        info = check_end2end_graph(onnx_file, num_classes, threads,
                                   runtime)
        for key, value in info.items():  # session, settings, num_classes...
            setattr(self, key, value)
        self.clip_border = bool(self.settings.get('clip_border', True))

    def _predict_only(self, *args, **kwargs):
        raise EvaluateError('an ONNX detector only predicts')

    loss = _forward = extract_feat = _predict_only

    def _check_outputs(self, d: np.ndarray, lab: np.ndarray,
                       n: int) -> None:
        """Refuse outputs that would be scored wrongly (shapes, row count,
        non-finite values, labels outside the config's classes and -1)."""
        where = f'{self.onnx_file}: the graph returned'
        if not (d.ndim == 3 and d.shape[2] == 5 and lab.ndim == 2
                and d.shape[:2] == lab.shape and d.shape[0] == n):
            raise EvaluateError(
                f'{where} dets {d.shape} and labels {lab.shape} for a batch '
                f'of {n}; expected ({n}, K, 5) and ({n}, K)')
        if d.shape[1] > MAX_PER_IMG:
            raise EvaluateError(f'{where} {d.shape[1]} detections per '
                                f'image; at most {MAX_PER_IMG} are accepted')
        if not np.isfinite(d).all():
            raise EvaluateError(f'{where} non-finite boxes or scores')
        if not np.issubdtype(lab.dtype, np.integer):
            raise EvaluateError(f'{where} labels of type {lab.dtype}; '
                                'expected integers')
        bad = (lab != -1) & ((lab < 0) | (lab >= self.num_classes))
        if bad.any():
            raise EvaluateError(
                f'{where} label {int(lab[bad][0])}: labels must be in [0, '
                f'{self.num_classes}) (the config\'s classes), or -1 for '
                'padding')

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: list,
                rescale: bool = True) -> list:
        """Detections of a preprocessed batch, as mmdet's detectors return
        them."""
        from mmdet.structures.bbox import scale_boxes
        x = batch_inputs.detach().float().cpu().numpy()
        shapes = np.asarray([s.metainfo.get('img_shape', x.shape[2:])[:2]
                             for s in batch_data_samples], np.int64)
        feeds = dict(input=x)
        if self.with_img_shape:
            feeds['img_shape'] = shapes
        try:
            dets, labels = runtime.run(self.session, feeds, ['dets', 'labels'])
        except runtime.OnnxRuntimeError as e:
            raise EvaluateError(f'{self.onnx_file}: {e}') from None
        self._check_outputs(dets, labels, x.shape[0])
        results: List[InstanceData] = []
        for sample, d, lab, (h, w) in zip(batch_data_samples, dets, labels,
                                          shapes):
            keep = lab >= 0
            bboxes = torch.from_numpy(np.ascontiguousarray(d[keep, :4]))
            if self.clip_border and not self.with_img_shape and (
                    h < x.shape[2] or w < x.shape[3]):
                bboxes[:, 0::2].clamp_(min=0, max=float(w))
                bboxes[:, 1::2].clamp_(min=0, max=float(h))
            if rescale:
                scale_factor = [1 / s for s in sample.metainfo['scale_factor']]
                bboxes = scale_boxes(bboxes, scale_factor)
            results.append(InstanceData(
                bboxes=bboxes,
                scores=torch.from_numpy(np.ascontiguousarray(d[keep, 4])),
                labels=torch.from_numpy(lab[keep].astype(np.int64))))
        return self.add_pred_to_datasample(batch_data_samples, results)


class SplitScorer:
    """bbox mAP of detectors on ``num`` images (all: None) of a split, by
    the config's evaluator of that split without a runner; the images are
    preprocessed once (or ``loaded`` already), one per batch."""

    def __init__(self, cfg, split: str = 'val', num: Optional[int] = None,
                 threads: Optional[int] = None,
                 loaded: Optional[tuple] = None) -> None:
        from .quantize.calibration import preprocessed
        if split not in ('val', 'test'):
            raise EvaluateError(f'scoring needs the val or test split (its '
                                f'evaluator), not {split}')
        self.evaluator_cfg = cfg.get(f'{split}_evaluator')
        if not self.evaluator_cfg:
            raise EvaluateError(f'the config has no {split}_evaluator')
        self.num_classes = (cfg.model.get('bbox_head') or {}).get(
            'num_classes')
        self.preprocessor_cfg = cfg.model.get('data_preprocessor')
        self.threads = threads
        self.items, info = loaded or preprocessed(cfg, split, num)
        self.info = dict(info)
        self.metainfo = self.info.pop('metainfo')

    def score(self, predict, indices: Optional[Sequence[int]] = None
              ) -> float:
        """bbox mAP of a detector's ``predict`` on the items ``indices``
        (all: None)."""
        import contextlib
        import copy
        import io
        import logging

        from mmengine.evaluator import Evaluator
        from mmengine.logging import MMLogger
        evaluator = Evaluator(copy.deepcopy(self.evaluator_cfg))
        evaluator.dataset_meta = self.metainfo
        indices = list(range(len(self.items)) if indices is None
                       else indices)
        with torch.no_grad():
            for i in indices:
                x, samples = self.items[i]
                evaluator.process(predict(x, copy.deepcopy(samples)))
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # the COCO tables of every call
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                metrics = evaluator.evaluate(len(indices))
        finally:
            logger.setLevel(level)
        for suffix in ('bbox_mAP', '/mAP'):
            keys = [k for k in metrics if k.endswith(suffix)]
            if keys:
                return float(metrics[keys[0]])
        raise EvaluateError(f'the evaluator reports no mAP '
                            f'({sorted(metrics)})')

    def graph(self, onnx_file: str, runtime: str = 'onnxruntime',
              indices: Optional[Sequence[int]] = None) -> float:
        """bbox mAP of an end-to-end graph run by ``runtime`` (float32)."""
        det = OnnxRuntimeDetector(onnx_file, self.preprocessor_cfg,
                                  self.num_classes, self.threads,
                                  runtime=runtime)
        return self.score(det.predict, indices)


def onnx_test_config(cfg, args) -> None:
    """``tools/test.py CONFIG MODEL.onnx``: ``cfg``'s model replaced by
    :class:`OnnxRuntimeDetector`, the graph checked and described before
    the runner starts (and creates its work dir)."""
    for flag in ('tta', 'deploy', 'non_strict'):
        if getattr(args, flag, False):
            raise EvaluateError(f'--{flag.replace("_", "-")} does not apply '
                                f'to an ONNX file ({args.checkpoint})')
    if getattr(args, 'launcher', 'none') != 'none':
        raise EvaluateError(f'{args.checkpoint}: ONNX evaluation runs in one '
                            'process (--launcher none)')
    pre = cfg.model.get('data_preprocessor')
    if pre is None:
        raise EvaluateError(f'{args.config}: model.data_preprocessor is '
                            'missing (the ONNX graph takes the preprocessed '
                            'batch)')
    num_classes = (cfg.model.get('bbox_head') or {}).get('num_classes')
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) \
            or num_classes < 1:
        raise EvaluateError(f'{args.config}: model.bbox_head.num_classes='
                            f'{num_classes!r}: a positive int is needed to '
                            'check the ONNX labels')
    engine = args.runtime or 'onnxruntime'
    info = check_end2end_graph(args.checkpoint, num_classes, runtime=engine)
    print(f'ONNX {args.checkpoint}: run by {engine}' + (
        f', precision {info["session"].precision}'
        if engine == 'openvino' else ''), flush=True)
    if info['settings']:
        print(f'ONNX {args.checkpoint}: post-processing in the graph: '
              f'{describe_settings(info["settings"])}', flush=True)
    cfg.model = dict(type='OnnxRuntimeDetector',
                     onnx_file=osp.abspath(args.checkpoint),
                     data_preprocessor=pre, num_classes=num_classes,
                     runtime=engine)
    cfg.load_from = None
    cfg.resume = False
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', []) or []
                        if h.get('type') != 'SwitchToDeployHook']
