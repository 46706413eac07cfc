"""The conv region of :func:`.static.quantizable_nodes` quantized by NNCF
into a QDQ ONNX file, optionally under accuracy control by the bbox mAP of
the config's own evaluation (:class:`~mmrepvgg.export.evaluate.SplitScorer`).
"""
import contextlib
import io
import logging
import os.path as osp
from typing import Optional, Sequence

from .calibration import QuantizeError, as_feeds
from .static import (graph_inputs, load, quantizable_nodes, record,
                     region_info)

#: Accuracy-control iterations (each reverts a group of quantizers).
DEFAULT_MAX_ITERATIONS = 8
DESCRIPTION = ('NNCF post-training quantization, preset MIXED (symmetric '
               'per-channel INT8 weights, asymmetric INT8 activations), '
               'fast bias correction')


def import_nncf():
    try:
        import nncf
        return nncf
    except ImportError as e:
        raise QuantizeError(f'--backend nncf needs nncf ({e}); pip install '
                            '-e ".[openvino]"') from None


class DetectionValidator:
    """NNCF's ``validation_fn``: the bbox mAP of a candidate graph (saved
    in ``work_dir``) on ``num`` images of ``split`` (all when None) or the
    ``loaded`` ones."""

    def __init__(self, cfg, split: str, num: Optional[int], work_dir: str,
                 threads: Optional[int] = None,
                 loaded: Optional[tuple] = None) -> None:
        from ..evaluate import EvaluateError, SplitScorer
        try:
            self.scorer = SplitScorer(cfg, split, num, threads, loaded)
        except EvaluateError as e:
            raise QuantizeError(f'--max-drop: {e}') from None
        self.items, self.info = self.scorer.items, self.scorer.info
        self.path = osp.join(work_dir, 'candidate.onnx')
        self.calls = 0

    def __call__(self, model, indices):
        import onnx
        onnx.save(model, self.path)
        self.calls += 1
        return self.scorer.graph(self.path, indices=list(indices)), None

    def score(self, model) -> float:
        return self(model, range(len(self.items)))[0]


def quantize_nncf(fp32_path: str,
                  out_path: str,
                  calibration: Sequence,
                  max_drop: Optional[float] = None,
                  validator: Optional[DetectionValidator] = None,
                  max_iterations: int = DEFAULT_MAX_ITERATIONS) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` with NNCF; with
    ``max_drop`` (absolute mAP) under NNCF's accuracy control scored by
    ``validator``, the result scored again and refused beyond. Returns
    :func:`.static.region_info`, plus ``accuracy`` with ``max_drop``."""
    nncf = import_nncf()
    from nncf.quantization.advanced_parameters import \
        AdvancedAccuracyRestorerParameters
    if not calibration:
        raise QuantizeError('no calibration inputs')
    if max_drop is not None and validator is None:
        raise QuantizeError('--max-drop needs a validation function')
    model = load(fp32_path)
    region, excluded = quantizable_nodes(model)
    feeds = as_feeds(calibration, graph_inputs(model))
    kwargs = dict(preset=nncf.QuantizationPreset.MIXED,
                  target_device=nncf.TargetDevice.CPU,
                  subset_size=len(feeds),
                  ignored_scope=nncf.IgnoredScope(names=excluded,
                                                  validate=False))
    logger = logging.getLogger('nncf')
    level = logger.level
    logger.setLevel(logging.ERROR)
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
    finally:
        logger.setLevel(level)
    info = region_info(model, region, excluded, len(feeds), DESCRIPTION)
    if max_drop is not None:
        evaluations = validator.calls
        fp32_map = validator.score(model)
        int8_map = validator.score(quantized)
        drop = fp32_map - int8_map
        info['accuracy'] = dict(fp32_map=fp32_map, int8_map=int8_map,
                                drop=drop, max_drop=max_drop,
                                evaluations=evaluations, **validator.info)
        if drop > max_drop:
            raise QuantizeError(
                f'NNCF accuracy control: INT8 mAP {int8_map:.4f} is '
                f'{drop:.4f} below FP32 {fp32_map:.4f}, more than --max-drop'
                f' {max_drop:g} after at most {max_iterations} iterations')
        info['config'] += (f'; accuracy control: max mAP drop {max_drop:g} '
                           f'on {validator.info["images"]} '
                           f'{validator.info["split"]} images, drop '
                           f'{drop:.4f}')
    import onnx
    record(quantized, info['config'], len(feeds))
    onnx.save(quantized, out_path)
    return info
