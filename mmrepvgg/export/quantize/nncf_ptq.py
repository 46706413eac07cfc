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
ONNX file: :class:`~mmrepvgg.export.evaluate.SplitScorer`). The result is
measured again at the end: a drop beyond ``max_drop`` (NNCF gave up after
``max_iterations``) is refused.
"""
import contextlib
import io
import logging
import os.path as osp
from collections import Counter
from typing import Callable, Optional, Sequence, Tuple

from .calibration import QuantizeError, as_feeds
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
    """NNCF's ``validation_fn``: the bbox mAP of a candidate graph (an
    ``onnx.ModelProto``, written to ``work_dir``) by
    :class:`~mmrepvgg.export.evaluate.SplitScorer` (onnxruntime, the
    config's evaluator of ``split``).

    Args:
        cfg (Config): the model config.
        split (str): ``val`` or ``test``.
        num (int, optional): images (evenly spread; all when None).
        work_dir (str): where candidates are written.
        threads (int, optional): onnxruntime threads.
    """

    def __init__(self, cfg, split: str, num: Optional[int], work_dir: str,
                 threads: Optional[int] = None) -> None:
        from ..evaluate import EvaluateError, SplitScorer
        try:
            self.scorer = SplitScorer(cfg, split, num, threads)
        except EvaluateError as e:
            raise QuantizeError(f'--max-drop: {e}') from None
        self.items, self.info = self.scorer.items, self.scorer.info
        self.path = osp.join(work_dir, 'candidate.onnx')
        self.calls = 0

    def __call__(self, model, indices) -> Tuple[float, None]:
        """``(bbox mAP, None)`` of ``model`` on the items ``indices``."""
        import onnx
        onnx.save(model, self.path)
        self.calls += 1
        return self.scorer.graph(self.path, indices=list(indices)), None

    def score(self, model) -> float:
        """bbox mAP of ``model`` on every item."""
        return self(model, range(len(self.items)))[0]


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
