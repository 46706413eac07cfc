"""An exported end-to-end ONNX detector in mmdet's own test loop.

``tools/test.py CONFIG MODEL.onnx`` runs ``Runner.test()`` unchanged (the
config's test set, pipeline, preprocessor and evaluator); only the model is
:class:`OnnxRuntimeDetector`, whose ``predict`` runs the graph (onnxruntime
or OpenVINO) and rescales boxes as mmdet's heads do (``rescale=True``), so
the metrics compare with the PyTorch model's. A fixed-size graph gets the
batch padded (and filled up) to its size; a graph without ``img_shape``
input gets its boxes clipped again to each ``img_shape``. Nothing is scored
that could be wrong: declared sizes and metadata are checked before the
runner starts, every output during the run (one line naming the file).
"""
import json
import os.path as osp
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.structures import InstanceData

from mmrepvgg.apis.convert import MAX_SIDE
from mmrepvgg.utils.cli import ToolError
from . import runtime
from .runtime import make_session, output_names
from .postprocess import (MAX_NMS_PRE, MAX_PER_IMG, METADATA_KEY,
                          PostProcessError, check_count, check_fraction,
                          describe_settings)

#: Largest batch a graph may declare (bounds what an untrusted file makes
#: the evaluation allocate) and the one batch of ``--verify-images``.
MAX_BATCH = 64
#: Largest fixed input a graph may declare, in pixels over the batch.
MAX_INPUT_PIXELS = MAX_BATCH * 1024 * 1024


class EvaluateError(ToolError):
    """The ONNX file cannot be evaluated; the message names it."""


def _settings(onnx_file: str, session) -> dict:
    """The graph's post-processing metadata, checked; {} when absent."""
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        return {}
    try:
        s = json.loads(meta[METADATA_KEY])
        if not isinstance(s, dict):
            raise ValueError('not a JSON object')
        check_fraction(s['score_thr'], 'score_thr')
        check_fraction(s['iou_threshold'], 'iou_threshold')
        check_count(s['nms_pre'], 'nms_pre', MAX_NMS_PRE)
        check_count(s['max_per_img'], 'max_per_img', MAX_PER_IMG)
        check_count(s['num_classes'], 'num_classes', 2**31)
        describe_settings(s)
    except PostProcessError as e:
        raise EvaluateError(f'{onnx_file}: metadata {METADATA_KEY}: '
                            f'{e}') from None
    except KeyError as e:
        raise EvaluateError(f'{onnx_file}: metadata {METADATA_KEY} lacks '
                            f'{e}') from None
    except (TypeError, ValueError, IndexError) as e:
        raise EvaluateError(f'{onnx_file}: metadata {METADATA_KEY} is '
                            f'malformed ({e})') from None
    return s


def check_end2end_graph(onnx_file: str,
                        num_classes: Optional[int] = None,
                        threads: Optional[int] = 1,
                        runtime: str = 'onnxruntime') -> dict:
    """``session``, ``with_img_shape``, ``fixed_batch``, ``fixed_hw``,
    ``settings`` and ``num_classes`` of an end-to-end detector graph, every
    size and setting it declares checked before anything is allocated
    (``num_classes``: the config's, which the metadata must equal)."""
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
    fixed = [d if isinstance(d, int) else None for d in dims]
    batch, hw = fixed[0], fixed[2:]
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise EvaluateError(f'{onnx_file}: the graph declares a batch of '
                            f'{batch}; at most {MAX_BATCH} is accepted')
    if any(d is not None and not 1 <= d <= MAX_SIDE for d in hw):
        raise EvaluateError(f'{onnx_file}: the graph declares an input of '
                            f'{dims[2]}x{dims[3]}; sides up to {MAX_SIDE} '
                            'are accepted')
    if None not in fixed[2:] and (batch or 1) * hw[0] * hw[1] > \
            MAX_INPUT_PIXELS:
        raise EvaluateError(f'{onnx_file}: the graph declares a fixed input '
                            f'of {batch}x3x{hw[0]}x{hw[1]}; at most '
                            f'{MAX_INPUT_PIXELS} pixels per batch are '
                            'accepted')
    k = outputs['dets'].shape[1:2]
    if k and isinstance(k[0], int) and k[0] > MAX_PER_IMG:
        raise EvaluateError(f'{onnx_file}: the graph declares {k[0]} '
                            f'detections per image; at most {MAX_PER_IMG} '
                            'are accepted')
    settings = _settings(onnx_file, session)
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
                fixed_batch=batch,
                fixed_hw=None if None in hw else tuple(hw),
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

    def loss(self, batch_inputs, batch_data_samples):
        raise EvaluateError('an ONNX detector cannot be trained')

    def _forward(self, batch_inputs, batch_data_samples=None):
        raise EvaluateError('an ONNX detector has no tensor mode; use '
                            'predict')

    def extract_feat(self, batch_inputs):
        raise EvaluateError('an ONNX detector has no features')

    def _check_outputs(self, d: np.ndarray, lab: np.ndarray,
                       n: int) -> None:
        """Refuse outputs that would be scored wrongly: shapes for the
        batch, at most :data:`MAX_PER_IMG` rows, finite values, integer
        labels in the config's classes or -1."""
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

    def _run(self, x: np.ndarray, shapes: np.ndarray):
        n, _, h, w = x.shape
        if self.fixed_hw is not None:
            fh, fw = self.fixed_hw
            if h > fh or w > fw:
                raise EvaluateError(
                    f'{self.onnx_file}: the graph takes {fh}x{fw} inputs, '
                    f'the pipeline gives {h}x{w}: export it for the '
                    "config's test size or with dynamic sizes")
            x = np.pad(x, ((0, 0), (0, 0), (0, fh - h), (0, fw - w)))
        step = self.fixed_batch or n
        dets, labels = [], []
        for start in range(0, n, step):
            xb, sb = x[start:start + step], shapes[start:start + step]
            fill = step - xb.shape[0]
            if fill:
                xb = np.concatenate([xb, np.zeros((fill, ) + xb.shape[1:],
                                                  xb.dtype)])
                sb = np.concatenate([sb, np.repeat(sb[-1:], fill, 0)])
            feeds = dict(input=xb)
            if self.with_img_shape:
                feeds['img_shape'] = sb
            try:
                d, lab = runtime.run(self.session, feeds, ['dets', 'labels'])
            except runtime.OnnxRuntimeError as e:
                raise EvaluateError(f'{self.onnx_file}: {e}') from None
            self._check_outputs(d, lab, step)
            dets.append(d[:step - fill])
            labels.append(lab[:step - fill])
        return np.concatenate(dets), np.concatenate(labels)

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples: list,
                rescale: bool = True) -> list:
        """Detections of a preprocessed batch, as mmdet's detectors return
        them."""
        from mmdet.structures.bbox import scale_boxes
        x = batch_inputs.detach().float().cpu().numpy()
        shapes = np.asarray([s.metainfo.get('img_shape', x.shape[2:])[:2]
                             for s in batch_data_samples], np.int64)
        dets, labels = self._run(np.ascontiguousarray(x), shapes)
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
    """bbox mAP of detectors on ``num`` images (all: None) of a split,
    scored by the config's evaluator of that split without a runner (NNCF's
    accuracy control, the benchmark's detector forms). The images are
    preprocessed once, one per batch."""

    def __init__(self, cfg, split: str = 'val', num: Optional[int] = None,
                 threads: Optional[int] = None) -> None:
        from mmengine.dataset import pseudo_collate

        from .quantize.calibration import (build_preprocessor, build_split,
                                           pick_indices)
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
        preprocessor = build_preprocessor(cfg)
        ds = build_split(cfg, split)
        self.metainfo = ds.metainfo
        self.items = []
        with torch.no_grad():
            for i in pick_indices(len(ds), num):
                batch = preprocessor(pseudo_collate([ds[i]]), False)
                self.items.append((batch['inputs'].float(),
                                   batch['data_samples']))
        self.info = dict(split=split, images=len(self.items), of=len(ds))

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


def onnx_test_config(args):
    """The runner config of ``tools/test.py CONFIG MODEL.onnx``: the model
    replaced by :class:`OnnxRuntimeDetector`."""
    from mmrepvgg.apis.runner import load_runner_config
    from mmrepvgg.utils.fileio import check_output_paths
    for flag, on in (('--tta', getattr(args, 'tta', False)),
                     ('--deploy', getattr(args, 'deploy', False)),
                     ('--non-strict', getattr(args, 'non_strict', False))):
        if on:
            raise EvaluateError(f'{flag} does not apply to an ONNX file '
                                f'({args.checkpoint})')
    if getattr(args, 'launcher', 'none') != 'none':
        raise EvaluateError(f'{args.checkpoint}: ONNX evaluation runs in one '
                            'process (--launcher none)')
    out = getattr(args, 'out', None)
    if out is not None and not out.endswith(('.pkl', '.pickle')):
        raise EvaluateError(f'--out {out}: must be a .pkl or .pickle file')
    runtime.check_model_file(args.checkpoint)
    engine = runtime.check_runtime(getattr(args, 'runtime', 'onnxruntime'))
    cfg = load_runner_config(args)
    if out is not None:
        check_output_paths([(args.config, 'config'),
                            (args.checkpoint, 'ONNX file')], [out],
                           EvaluateError)
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
    cfg.model = dict(type='OnnxRuntimeDetector',
                     onnx_file=osp.abspath(args.checkpoint),
                     data_preprocessor=pre, num_classes=num_classes,
                     runtime=engine)
    cfg.load_from = None
    cfg.resume = False
    hooks = [h for h in cfg.get('custom_hooks', []) or []
             if h.get('type') != 'SwitchToDeployHook']
    cfg.custom_hooks = hooks
    if getattr(args, 'show', False) or getattr(args, 'show_dir', None):
        vis = cfg.default_hooks.get('visualization')
        if vis is None:
            raise EvaluateError('--show/--show-dir need a "visualization" '
                                'hook in default_hooks')
        vis.draw = True
        if args.show:
            vis.show = True
            vis.wait_time = args.wait_time
        if args.show_dir:
            vis.test_out_dir = args.show_dir
    if out is not None:
        dump = dict(type='DumpDetResults', out_file_path=out)
        ev = cfg.test_evaluator
        cfg.test_evaluator = list(ev) + [dump] if isinstance(
            ev, (list, tuple)) else [ev, dump]
    return cfg


def test_onnx(args) -> int:
    """``tools/test.py`` for a ``.onnx`` checkpoint."""
    from mmrepvgg.apis.runner import run_runner, run_tool

    def body():
        import mmrepvgg  # noqa: F401  (registers modules)
        cfg = onnx_test_config(args)
        # refused before the runner creates its work dir and log
        info = check_end2end_graph(cfg.model['onnx_file'],
                                   cfg.model['num_classes'],
                                   runtime=cfg.model['runtime'])
        print(f'ONNX {args.checkpoint}: run by {cfg.model["runtime"]}' + (
            f', precision {info["session"].precision}'
            if cfg.model['runtime'] == 'openvino' else ''), flush=True)
        if info['settings']:
            print(f'ONNX {args.checkpoint}: post-processing in the graph: '
                  f'{describe_settings(info["settings"])}', flush=True)
        run_runner(cfg, args, 'test')

    return run_tool(body, args, interrupted='interrupted')


test_onnx.__test__ = False  # not a pytest test
