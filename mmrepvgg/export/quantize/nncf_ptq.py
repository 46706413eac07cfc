"""Post-training INT8 quantization of an ONNX graph with NNCF, optionally
accuracy-controlled by the project's own detection evaluation.

:func:`quantize_nncf` is the ``--backend nncf`` of
``tools/deployment/quantize.py``: the same FP32 graph, calibration images
and quantized region as :func:`.static.quantize_onnx` (every node outside
the conv region of :func:`.static.quantizable_nodes` is in NNCF's ignored
scope, so post-processing stays float), written as a QDQ ONNX file
(``QuantizeLinear`` / ``DequantizeLinear``) with the FP32 graph's metadata,
so the workflow's verification and ``tools/test.py`` treat it like
onnxruntime's output.

With ``max_drop``, ``nncf.quantize_with_accuracy_control`` reverts the
quantizers that cost most until the candidate's bbox mAP is within
``max_drop`` of the FP32 graph's; the mAP comes from
:class:`DetectionValidator` (the candidate run by
:class:`~mmrepvgg.export.evaluate.OnnxRuntimeDetector` on preprocessed
images, scored by the config's own evaluator, as ``tools/test.py`` scores an
ONNX file). The result is measured again at the end: a drop beyond
``max_drop`` (NNCF gave up after ``max_iterations``) is refused.
"""
import contextlib
import copy
import io
import logging
import os.path as osp
from collections import Counter
from typing import Callable, List, Optional, Sequence, Tuple

from .calibration import (QuantizeError, as_feeds, build_preprocessor,
                          build_split, pick_indices)
from .static import (boundary_tensors, graph_inputs, keep_metadata,
                     quantizable_nodes)

#: Accuracy-control iterations (each reverts one group of quantizers and
#: evaluates the candidate) when not told otherwise.
DEFAULT_MAX_ITERATIONS = 8
#: What the metadata and the report call this quantization.
DESCRIPTION = ('NNCF post-training quantization, preset MIXED (symmetric '
               'per-channel INT8 weights, asymmetric INT8 activations), '
               'fast bias correction')


class DetectionValidator:
    """bbox mAP of a candidate detector graph on images of a split:
    NNCF's ``validation_fn``.

    The images go through the config's test pipeline and data preprocessor
    once; each call writes the candidate (an ``onnx.ModelProto``) to
    ``work_dir``, runs it with
    :class:`~mmrepvgg.export.evaluate.OnnxRuntimeDetector` and scores its
    detections with the config's evaluator of the split (``val_evaluator``
    or ``test_evaluator``).

    Args:
        cfg (Config): the model config.
        split (str): ``val`` or ``test``.
        num (int, optional): images (evenly spread; all when None).
        work_dir (str): where candidates are written.
        threads (int, optional): onnxruntime threads.
    """

    def __init__(self, cfg, split: str, num: Optional[int], work_dir: str,
                 threads: Optional[int] = None) -> None:
        import torch
        from mmengine.dataset import pseudo_collate
        if split not in ('val', 'test'):
            raise QuantizeError(f'--max-drop evaluates on the val or test '
                                f'split (its evaluator), not {split}')
        evaluator = cfg.get(f'{split}_evaluator')
        if not evaluator:
            raise QuantizeError(f'the config has no {split}_evaluator (the '
                                'accuracy control scores with it)')
        self.evaluator_cfg = evaluator
        self.num_classes = (cfg.model.get('bbox_head') or {}).get(
            'num_classes')
        self.preprocessor_cfg = cfg.model.get('data_preprocessor')
        self.path = osp.join(work_dir, 'candidate.onnx')
        self.threads = threads
        preprocessor = build_preprocessor(cfg)
        ds = build_split(cfg, split)
        self.metainfo = ds.metainfo
        self.items: List[Tuple[object, list]] = []
        with torch.no_grad():
            for i in pick_indices(len(ds), num):
                batch = preprocessor(pseudo_collate([ds[i]]), False)
                self.items.append((batch['inputs'].float(),
                                   batch['data_samples']))
        self.info = dict(split=split, images=len(self.items), of=len(ds))
        self.calls = 0

    def __call__(self, model, indices) -> Tuple[float, None]:
        """``(bbox mAP, None)`` of ``model`` on the items ``indices``."""
        import onnx
        from mmengine.evaluator import Evaluator
        from mmengine.logging import MMLogger

        from ..evaluate import OnnxRuntimeDetector
        onnx.save(model, self.path)
        det = OnnxRuntimeDetector(self.path, self.preprocessor_cfg,
                                  self.num_classes, self.threads)
        evaluator = Evaluator(copy.deepcopy(self.evaluator_cfg))
        evaluator.dataset_meta = self.metainfo
        indices = list(indices)
        for i in indices:
            x, samples = self.items[i]
            evaluator.process(det.predict(x, copy.deepcopy(samples)))
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # the COCO tables of every call
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                metrics = evaluator.evaluate(len(indices))
        finally:
            logger.setLevel(level)
        self.calls += 1
        return float(metrics[metric_key(metrics)]), None

    def score(self, model) -> float:
        """bbox mAP of ``model`` on every item."""
        return self(model, range(len(self.items)))[0]


def metric_key(metrics: dict) -> str:
    """The bbox mAP among an evaluator's metrics (``coco/bbox_mAP``, else
    the first ``.../mAP``)."""
    for suffix in ('bbox_mAP', '/mAP'):
        keys = [k for k in metrics if k.endswith(suffix)]
        if keys:
            return keys[0]
    raise QuantizeError(f'the evaluator reports no mAP ({sorted(metrics)})')


def quantize_nncf(fp32_path: str,
                  out_path: str,
                  calibration: Sequence,
                  max_drop: Optional[float] = None,
                  validator: Optional[Callable] = None,
                  max_iterations: int = DEFAULT_MAX_ITERATIONS) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` (a QDQ ONNX file) with NNCF.

    Args:
        fp32_path (str): the FP32 graph.
        out_path (str): the INT8 graph (written directly; the workflow
            writes the final file atomically).
        calibration (Sequence): arrays (first input) or feed dicts.
        max_drop (float, optional): largest absolute mAP drop; None: plain
            ``nncf.quantize``.
        validator (DetectionValidator): the mAP of a candidate (needed with
            ``max_drop``).
        max_iterations (int): accuracy-control iterations at most.

    Returns:
        dict: as :func:`.static.quantize_onnx` (``config``, ``quantized``,
        ``excluded``, ``excluded_ops``, ``boundary``, ``ops``,
        ``calibration``) plus, with ``max_drop``, ``accuracy``
        (``fp32_map``, ``int8_map``, ``drop``, ``max_drop``,
        ``evaluations``).

    Raises:
        QuantizeError: NNCF is not installed, fails, or the drop is beyond
            ``max_drop``.
    """
    try:
        import nncf
        import onnx
        from nncf.quantization.advanced_parameters import \
            AdvancedAccuracyRestorerParameters
    except ImportError as e:
        raise QuantizeError(f'--backend nncf needs nncf ({e}); pip install '
                            '-e ".[openvino]"') from None
    if not calibration:
        raise QuantizeError('no calibration inputs')
    if max_drop is not None and not max_drop >= 0:
        raise QuantizeError(f'--max-drop must be >= 0 (an absolute mAP '
                            f'drop), got {max_drop}')
    if max_drop is not None and validator is None:
        raise QuantizeError('--max-drop needs a validation function')
    if max_iterations < 1:
        raise QuantizeError(f'--max-iterations must be >= 1, got '
                            f'{max_iterations}')
    model = onnx.load(fp32_path)
    region, excluded = quantizable_nodes(model)
    feeds = as_feeds(calibration, graph_inputs(model))
    kwargs = dict(preset=nncf.QuantizationPreset.MIXED,
                  target_device=nncf.TargetDevice.CPU,
                  subset_size=len(feeds),
                  ignored_scope=nncf.IgnoredScope(names=excluded,
                                                  validate=False))
    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # progress bars
            if max_drop is None:
                quantized = nncf.quantize(model, nncf.Dataset(feeds),
                                          **kwargs)
            else:
                quantized = nncf.quantize_with_accuracy_control(
                    model, nncf.Dataset(feeds),
                    nncf.Dataset(list(range(len(validator.items)))),
                    validator, max_drop=max_drop,
                    drop_type=nncf.DropType.ABSOLUTE,
                    advanced_accuracy_restorer_parameters=(
                        AdvancedAccuracyRestorerParameters(
                            max_num_iterations=max_iterations)),
                    **kwargs)
    except QuantizeError:
        raise
    except Exception as e:  # NNCF's own exception types
        text = str(e).strip().splitlines()
        raise QuantizeError(f'NNCF quantization failed: {type(e).__name__}'
                            f': {text[0] if text else ""}') from None
    onnx.save(quantized, out_path)
    info = dict(config=DESCRIPTION, quantized=len(region),
                excluded=len(excluded),
                excluded_ops=Counter(n.op_type for n in model.graph.node
                                     if n.name in set(excluded)),
                boundary=boundary_tensors(model, region),
                calibration=len(feeds))
    if max_drop is not None:
        evaluations = validator.calls
        fp32_map, int8_map = validator.score(model), validator.score(
            quantized)
        drop = fp32_map - int8_map
        info['accuracy'] = dict(fp32_map=fp32_map, int8_map=int8_map,
                                drop=drop, max_drop=max_drop,
                                evaluations=evaluations,
                                **validator.info)
        if drop > max_drop:
            raise QuantizeError(
                f'NNCF accuracy control: INT8 mAP {int8_map:.4f} is '
                f'{drop:.4f} below FP32 {fp32_map:.4f}, more than --max-drop'
                f' {max_drop:g} after at most {max_iterations} iterations '
                '(raise --max-iterations or --max-drop)')
        description = (f'{DESCRIPTION}; accuracy control: max mAP drop '
                       f'{max_drop:g} on {validator.info["images"]} '
                       f'{validator.info["split"]} images, drop '
                       f'{drop:.4f}')
        info['config'] = description
    keep_metadata(fp32_path, out_path, info['config'], len(feeds))
    info['ops'] = Counter(n.op_type for n in onnx.load(
        out_path, load_external_data=False).graph.node)
    return info
