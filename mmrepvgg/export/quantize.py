"""Post-training static INT8 quantization of exported RepVGG graphs.

The fused RepVGG network is a plain stack of 3x3 convs and activations, the
shape INT8 kernels run best. This module quantizes an FP32 ONNX graph
(:mod:`onnxruntime.quantization`, calibrated on real images) and measures
what it cost in accuracy.

Defaults (:class:`QuantConfig`), chosen by measurement (README, "INT8"):
QDQ format, unsigned 8-bit asymmetric activations (after a ReLU the zero
point sits at 0 and all 256 levels cover ``[0, max]``), signed INT8
symmetric per-channel weights, MinMax calibration, no ``reduce_range`` (the
CPU has VNNI). Signed INT8 activations are as accurate but onnxruntime's x86
optimizer leaves every conv whose output is also a graph output (each stage
output of a backbone) unfused in float: 16 of 22 A0 convs fused, 0.71x of
FP32 instead of 0.35x.
onnxruntime's graph optimizer fuses every ``DequantizeLinear -> Conv ->
QuantizeLinear`` of a QDQ graph into one ``QLinearConv`` (VNNI kernels on a
CPU that has them): :func:`optimized_op_types` shows the ops the CPU
provider actually runs.

What is quantized (:func:`quantizable_nodes`): every ``Conv`` and every node
that feeds a ``Conv`` (the backbone, the neck's resize/add, the head's
towers), plus the activation right after a ``Conv`` (folded into the
quantization range). Whatever only consumes the last convs' outputs, such as
score activations, box decoding, TopK and NMS of an end-to-end detector
graph, stays float (``nodes_to_exclude``).

Error measurement:

* :func:`compare_sessions`: per output, SQNR (dB) and relative error of the
  INT8 graph against the FP32 graph on the same inputs; for an end-to-end
  graph also on the *boundary* tensors (the float outputs of the quantized
  region, i.e. the head's raw outputs, :func:`boundary_tensors`), which keep
  their shape when post-processing keeps a different number of boxes.
* :func:`layer_errors`: per conv layer of a quantized graph, the SQNR of its
  activation against the FP32 graph (accumulated error), of its activation
  quantized alone (the layer's own activation error) and of its weights
  (per-channel INT8 weight error): a RepVGG and a QARepVGG backbone compared
  layer by layer.

Nothing here imports mmdet at module level; the functions that read a
config's dataset (:func:`calibration_inputs`) import it when called.
"""
import contextlib
import copy
import io
import json
import math
import os
import os.path as osp
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmrepvgg.utils.cli import ToolError
from mmrepvgg.utils.fileio import (atomic_write_all, check_output_paths,
                                   scratch_dir)
from .onnx_export import op_histogram

#: Calibration images used when ``--calib-images`` is not given (all the
#: split's images when it has fewer).
DEFAULT_CALIB_IMAGES = 64
#: Activations folded into the quantization range of the conv before them.
FOLDED_ACTIVATIONS = ('Relu', 'Clip')
#: Op types of a conv region that get quantized (QDQ pairs around them).
REGION_OP_TYPES = ('Conv', 'Relu', 'Clip', 'Add', 'Resize', 'MaxPool',
                   'AveragePool', 'GlobalAveragePool', 'Concat', 'Mul',
                   'Sigmoid', 'Upsample')
CALIBRATION_METHODS = ('MinMax', 'Entropy', 'Percentile')
QUANT_FORMATS = ('QDQ', 'QOperator')
QUANT_TYPES = ('int8', 'uint8')


class QuantizeError(ToolError):
    """Refused input or failed quantization; the message names the file or
    argument at fault."""


@dataclass
class QuantConfig:
    """How a graph is quantized.

    Args:
        quant_format (str): ``QDQ`` (QuantizeLinear/DequantizeLinear pairs,
            fused by onnxruntime's optimizer) or ``QOperator``
            (``QLinearConv`` and friends written into the file).
        activation_type (str): ``int8`` or ``uint8``.
        weight_type (str): ``int8`` or ``uint8``.
        per_channel (bool): one weight scale per output channel.
        reduce_range (bool): 7-bit weights (for CPUs without VNNI, whose
            ``u8s8`` multiply-add can saturate).
        calibrate_method (str): ``MinMax``, ``Entropy`` or ``Percentile``.
        percentile (float): the ``Percentile`` method's percentile.
        symmetric_activations (bool): zero point 0 for activations.
        region_only (bool): quantize only :func:`quantizable_nodes` (the
            convs and what feeds them); ``False`` lets the quantizer take
            every supported op.
        preprocess (bool): run onnxruntime's ``quant_pre_process`` (shape
            inference and graph optimization) first.
    """
    quant_format: str = 'QDQ'
    activation_type: str = 'uint8'
    weight_type: str = 'int8'
    per_channel: bool = True
    reduce_range: bool = False
    calibrate_method: str = 'MinMax'
    percentile: float = 99.999
    symmetric_activations: bool = False
    region_only: bool = True
    preprocess: bool = True
    extra: Dict[str, object] = field(default_factory=dict)

    def validate(self) -> 'QuantConfig':
        """Raise :class:`QuantizeError` naming the bad setting."""
        if self.quant_format not in QUANT_FORMATS:
            raise QuantizeError(f'--format {self.quant_format!r}: choose '
                                f'from {", ".join(QUANT_FORMATS)}')
        for name in ('activation_type', 'weight_type'):
            v = getattr(self, name)
            if v not in QUANT_TYPES:
                raise QuantizeError(f'{name} {v!r}: choose from '
                                    f'{", ".join(QUANT_TYPES)}')
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise QuantizeError(
                f'--calibration {self.calibrate_method!r}: choose from '
                f'{", ".join(CALIBRATION_METHODS)}')
        if not 50 < self.percentile <= 100:
            raise QuantizeError(f'--percentile must be in (50, 100], got '
                                f'{self.percentile}')
        return self

    def describe(self) -> str:
        """One line: format, types, granularity, calibration."""
        parts = [self.quant_format,
                 f'{"s" if self.activation_type == "int8" else "u"}8 '
                 'activations' +
                 (' (symmetric)' if self.symmetric_activations else ''),
                 f'{"s" if self.weight_type == "int8" else "u"}8 weights '
                 f'{"per channel" if self.per_channel else "per tensor"}',
                 f'{self.calibrate_method} calibration' +
                 (f' ({self.percentile:g}%)'
                  if self.calibrate_method == 'Percentile' else '')]
        if self.reduce_range:
            parts.append('reduce_range')
        return ', '.join(parts)


# ------------------------------------------------------------------ errors
def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum
    (ref - test)^2)`` in dB (float64 sums).

    ``inf`` when ``test`` equals ``reference``; ``-inf`` for a zero signal
    with non-zero noise; ``nan`` if either holds a NaN or infinity.

    Args:
        reference (np.ndarray): the float reference.
        test (np.ndarray): the approximation, same shape.
    """
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    if ref.shape != tst.shape:
        raise ValueError(f'shapes differ: {ref.shape} vs {tst.shape}')
    if not (np.isfinite(ref).all() and np.isfinite(tst).all()):
        return float('nan')
    noise = float(np.sum((ref - tst)**2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return float('inf')
    if signal == 0:
        return float('-inf')
    return 10.0 * math.log10(signal / noise)


def relative_error(reference: np.ndarray, test: np.ndarray) -> float:
    """``max|a - b| / max|a|`` (``max|a - b|`` when ``a`` is all zero)."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = float(np.abs(ref - np.asarray(test, dtype=np.float64)).max()) \
        if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


class _ErrorAccumulator:
    """SQNR and relative error of one tensor over several inputs."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.max_diff = self.max_ref = 0.0
        self.finite = True
        self.samples = 0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        test = np.asarray(test, dtype=np.float64)
        self.samples += 1
        if not (np.isfinite(ref).all() and np.isfinite(test).all()):
            self.finite = False
            return
        self.signal += float(np.sum(ref**2))
        self.noise += float(np.sum((ref - test)**2))
        if ref.size:
            self.max_diff = max(self.max_diff,
                                float(np.abs(ref - test).max()))
            self.max_ref = max(self.max_ref, float(np.abs(ref).max()))

    def result(self) -> dict:
        if not self.finite:
            return dict(sqnr_db=float('nan'), rel_err=float('inf'),
                        samples=self.samples)
        if self.noise == 0:
            sqnr = float('inf')
        elif self.signal == 0:
            sqnr = float('-inf')
        else:
            sqnr = 10.0 * math.log10(self.signal / self.noise)
        rel = self.max_diff / self.max_ref if self.max_ref > 0 \
            else self.max_diff
        return dict(sqnr_db=sqnr, rel_err=rel, samples=self.samples)


# ---------------------------------------------------------- onnxruntime
def optimized_op_types(path: str, threads: Optional[int] = 1) -> Counter:
    """Op types onnxruntime's CPU provider runs after its graph optimizer
    (``ORT_ENABLE_ALL``; e.g. ``QLinearConv`` where a QDQ pair around a
    ``Conv`` was fused)."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = \
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or 0
        opts.log_severity_level = 3
        opts.optimized_model_filepath = osp.join(tmp, 'optimized.onnx')
        ort.InferenceSession(str(path), sess_options=opts,
                             providers=['CPUExecutionProvider'])
        model = onnx.load(opts.optimized_model_filepath,
                          load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def _load(path_or_model):
    import onnx
    if isinstance(path_or_model, (str, os.PathLike)):
        return onnx.load(str(path_or_model))
    return path_or_model


# --------------------------------------------------------------- export
def export_module(module, x, path: str, opset: Optional[int] = None) -> None:
    """Export ``module`` (a tensor -> tensor(s) module, e.g. a deploy-form
    backbone) traced on ``x`` to ``path`` with the export package's
    exporter: input ``input``, dynamic batch, height and width, outputs
    ``feat0 ...``."""
    from .onnx_export import DEFAULT_OPSET, TensorForward, export_to
    export_to(TensorForward(module, 'module').eval(), x, path,
              opset or DEFAULT_OPSET)


# ------------------------------------------------------------ the region
def _consumers(graph) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            if t:
                out.setdefault(t, []).append(node)
    return out


def _producers(graph) -> Dict[str, object]:
    return {t: node for node in graph.node for t in node.output if t}


def quantizable_nodes(model) -> Tuple[List[str], List[str]]:
    """Split the nodes of a graph into the conv region and the rest.

    The region is every ``Conv``, every node from which a ``Conv`` can be
    reached (what computes the convs' inputs: backbone, neck, head towers),
    and every activation of :data:`FOLDED_ACTIVATIONS` consuming a ``Conv``
    output directly. The rest (post-processing after the last convs) stays
    float.

    Args:
        model: an ONNX ``ModelProto`` or a path.

    Returns:
        tuple: ``(region, excluded)`` node names (graph order); nodes
        without a name get one (the model is changed in place).
    """
    graph = _load(model).graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f'{node.op_type}_{i}'
    producers = _producers(graph)
    feeds_conv = set()
    stack = [n for n in graph.node if n.op_type == 'Conv']
    while stack:
        node = stack.pop()
        if node.name in feeds_conv:
            continue
        feeds_conv.add(node.name)
        for t in node.input:
            p = producers.get(t)
            if p is not None and p.name not in feeds_conv:
                stack.append(p)
    region = set(feeds_conv)
    for node in graph.node:
        if node.op_type in FOLDED_ACTIVATIONS and node.input and \
                getattr(producers.get(node.input[0]), 'op_type', '') == \
                'Conv':
            region.add(node.name)
    order = [n.name for n in graph.node]
    return ([n for n in order if n in region],
            [n for n in order if n not in region])


def boundary_tensors(model, region: Iterable[str]) -> List[str]:
    """Float tensors produced inside ``region`` and consumed outside it (or
    graph outputs): the raw outputs of the quantized part."""
    graph = _load(model).graph
    region = set(region)
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    out = []
    for node in graph.node:
        if node.name not in region:
            continue
        for t in node.output:
            if t in outputs or any(c.name not in region
                                   for c in consumers.get(t, [])):
                out.append(t)
    return out


# ----------------------------------------------------------- quantizing
class _ListReader:
    """``CalibrationDataReader`` over a list of input feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return dict(self.feeds[self.pos - 1])

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _as_feeds(inputs, names: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """Feed dicts for a graph with inputs ``names``: an array feeds the
    first input; a dict keeps the graph's inputs (e.g. drops ``img_shape``
    for a graph without it)."""
    feeds = []
    for x in inputs:
        if isinstance(x, Mapping):
            missing = [n for n in names if n not in x]
            if missing:
                raise QuantizeError(f'inputs lack {missing} of the graph')
            feeds.append({k: np.ascontiguousarray(x[k]) for k in names})
        else:
            feeds.append({names[0]: np.ascontiguousarray(
                np.asarray(x, dtype=np.float32))})
    return feeds


def _graph_inputs(model) -> List[str]:
    graph = _load(model).graph
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


#: Histogram bins of the Entropy calibration (TensorRT's calibrator uses
#: 2048 bins for 128 quantized bins).
ENTROPY_BINS = 2048


def _entropy_ranges(model_path: str, reader, op_types, symmetric: bool,
                    tmp: str) -> str:
    """Entropy (KL) calibration with :data:`ENTROPY_BINS` histogram bins,
    saved as onnxruntime's calibration cache; returns the cache path.

    ``quantize_static`` passes no bin count to its Entropy calibrator, whose
    default (128 bins for 128 quantized bins) leaves one candidate
    threshold, the full range: its "Entropy" equals MinMax.
    """
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod, save_tensors_data
    from onnxruntime.quantization.calibrate import create_calibrator
    cal = create_calibrator(
        Path(model_path), op_types,
        augmented_model_path=osp.join(tmp, 'entropy_augmented.onnx'),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options=dict(num_bins=ENTROPY_BINS, num_quantized_bins=128,
                           symmetric=symmetric))
    with contextlib.redirect_stdout(io.StringIO()):
        cal.collect_data(reader)
        ranges = cal.compute_data()
    cache = osp.join(tmp, 'entropy_ranges.json')
    save_tensors_data(ranges, cache)
    return cache


#: ``metadata_props`` key of the INT8 graph describing its quantization.
QUANT_METADATA_KEY = 'mmrepvgg.quantization'


def _keep_metadata(src: str, dst: str, config: QuantConfig,
                   calibration: int) -> None:
    """Carry the FP32 graph's ``metadata_props`` (e.g. the export's
    post-processing settings, read by the ONNX evaluation) over to the INT8
    graph, and record how it was quantized."""
    import onnx
    fp32 = onnx.load(src, load_external_data=False)
    model = onnx.load(dst)
    have = {p.key for p in model.metadata_props}
    for prop in fp32.metadata_props:
        if prop.key not in have:
            model.metadata_props.add(key=prop.key, value=prop.value)
    info = dict(config=config.describe(), calibration_inputs=calibration)
    for prop in model.metadata_props:
        if prop.key == QUANT_METADATA_KEY:
            prop.value = json.dumps(info)
            break
    else:
        model.metadata_props.add(key=QUANT_METADATA_KEY,
                                 value=json.dumps(info))
    onnx.save(model, dst)


def quantize_onnx(fp32_path: str,
                  out_path: str,
                  calibration: Sequence,
                  config: Optional[QuantConfig] = None) -> dict:
    """Statically quantize ``fp32_path`` into ``out_path``.

    Args:
        fp32_path (str): the FP32 graph.
        out_path (str): where the INT8 graph goes (written directly; wrap
            in :func:`mmrepvgg.deploy.atomic_write` for an atomic file).
        calibration (Sequence): calibration inputs: arrays for the graph's
            single input, or feed dicts ``{input name: array}``.
        config (QuantConfig, optional): defaults to :class:`QuantConfig`.

    Returns:
        dict: ``config`` (text), ``quantized`` and ``excluded`` node counts,
        ``excluded_ops`` (op histogram of the float part), ``boundary``
        (the region's float output tensors), ``ops`` (op histogram of the
        written graph) and ``calibration`` (number of inputs).
    """
    import onnx
    from onnxruntime import quantization as q
    config = (config or QuantConfig()).validate()
    if not calibration:
        raise QuantizeError('no calibration inputs')
    feeds = _as_feeds(calibration, _graph_inputs(fp32_path))
    qtype = dict(int8=q.QuantType.QInt8, uint8=q.QuantType.QUInt8)
    methods = dict(MinMax=q.CalibrationMethod.MinMax,
                   Entropy=q.CalibrationMethod.Entropy,
                   Percentile=q.CalibrationMethod.Percentile)
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-quant-') as tmp:
        src = fp32_path
        if config.preprocess:
            src = osp.join(tmp, 'pre.onnx')
            from onnxruntime.quantization.shape_inference import \
                quant_pre_process
            quant_pre_process(fp32_path, src, skip_symbolic_shape=True)
        pre = onnx.load(src)
        region, excluded = quantizable_nodes(pre)
        boundary = boundary_tensors(pre, region)
        named = osp.join(tmp, 'named.onnx')
        onnx.save(pre, named)  # with the node names quantizable_nodes set
        extra = dict(ActivationSymmetric=config.symmetric_activations,
                     WeightSymmetric=True,
                     CalibPercentile=config.percentile)
        extra.update(config.extra)
        kwargs = dict(
            quant_format=(q.QuantFormat.QDQ if config.quant_format == 'QDQ'
                          else q.QuantFormat.QOperator),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type],
            calibrate_method=methods[config.calibrate_method],
            extra_options=extra)
        if config.region_only:
            kwargs['nodes_to_quantize'] = region
            kwargs['nodes_to_exclude'] = excluded
            kwargs['op_types_to_quantize'] = sorted(
                {n.op_type for n in pre.graph.node if n.name in region} &
                set(REGION_OP_TYPES))
        reader = _ListReader(feeds)
        if config.calibrate_method == 'Entropy':
            kwargs['calibration_cache_path'] = _entropy_ranges(
                named, reader, kwargs.get('op_types_to_quantize'),
                config.symmetric_activations, tmp)
            reader.rewind()
        # the calibrator writes its augmented model next to the input;
        # onnxruntime's histogram calibrators print progress to stdout
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            with contextlib.redirect_stdout(io.StringIO()):
                q.quantize_static(named, out_path, reader, **kwargs)
        finally:
            os.chdir(cwd)
    _keep_metadata(fp32_path, out_path, config, len(feeds))
    excluded_ops = Counter(n.op_type for n in pre.graph.node
                           if n.name in set(excluded))
    return dict(config=config.describe(), quantized=len(region),
                excluded=len(excluded), excluded_ops=excluded_ops,
                boundary=boundary, ops=op_histogram(out_path),
                calibration=len(feeds))


# -------------------------------------------------------------- compare
def add_outputs(model, tensors: Sequence[str]):
    """Copy of ``model`` whose graph also outputs ``tensors`` (as float,
    shape unknown)."""
    import onnx
    model = copy.deepcopy(_load(model))
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(
                onnx.helper.make_empty_tensor_value_info(t))
            have.add(t)
    return model


def _session_from_model(model, threads: Optional[int]):
    from .runtime import make_session
    return make_session(model.SerializeToString(), threads)


def dequantized_name(int8_model, tensor: str) -> Optional[str]:
    """Name of the dequantized copy of float ``tensor`` in a QDQ graph
    (``DequantizeLinear(QuantizeLinear(tensor))``), or of the tensor itself
    where it stays float; ``None`` if the graph has neither."""
    graph = _load(int8_model).graph
    consumers = _consumers(graph)
    for qn in consumers.get(tensor, []):
        if qn.op_type != 'QuantizeLinear':
            continue
        for dq in consumers.get(qn.output[0], []):
            if dq.op_type == 'DequantizeLinear':
                return dq.output[0]
    produced = {t for n in graph.node for t in n.output}
    return tensor if tensor in produced else None


def compare_sessions(fp32_model,
                     int8_model,
                     inputs: Sequence,
                     extra_tensors: Sequence[str] = (),
                     threads: Optional[int] = None,
                     outputs: bool = True) -> 'OrderedDict':
    """Per-output SQNR and relative error of an INT8 graph against its FP32
    graph on the same inputs.

    Args:
        fp32_model: FP32 ``ModelProto`` or path.
        int8_model: INT8 ``ModelProto`` or path.
        inputs (Sequence): arrays (single input) or feed dicts.
        extra_tensors (Sequence[str]): float tensors of the FP32 graph to
            compare too (e.g. :func:`boundary_tensors`); in the INT8 graph
            their dequantized copy (:func:`dequantized_name`) is read.
        threads (int, optional): onnxruntime threads.
        outputs (bool): compare the graph outputs too (``False``: only
            ``extra_tensors``, e.g. for detections, see
            :func:`detection_agreement`).

    Returns:
        OrderedDict: name -> ``sqnr_db``, ``rel_err``, ``samples``; an
        output whose shape differs between the graphs in some sample (a
        detector keeping a different number of boxes) gets
        ``shape_mismatch`` (count) and is measured on the other samples.
    """
    fp32_model, int8_model = _load(fp32_model), _load(int8_model)
    outs = [o.name for o in fp32_model.graph.output] if outputs else []
    extra = [t for t in extra_tensors if t not in outs]
    q_extra = []
    for t in extra:
        name = dequantized_name(int8_model, t)
        if name is None:
            raise QuantizeError(f'tensor {t} is not in the INT8 graph')
        q_extra.append(name)
    from .runtime import input_names
    if not outs + extra:
        raise QuantizeError('nothing to compare')
    fsess = _session_from_model(add_outputs(fp32_model, extra), threads)
    qsess = _session_from_model(add_outputs(int8_model, q_extra), threads)
    fnames = outs + extra
    qnames = outs + q_extra
    feeds = _as_feeds(inputs, input_names(fsess))
    acc = OrderedDict((n, _ErrorAccumulator()) for n in fnames)
    mismatch = Counter()
    for feed in feeds:
        a = fsess.run(fnames, feed)
        b = qsess.run(qnames, feed)
        for name, x, y in zip(fnames, a, b):
            if np.shape(x) != np.shape(y):
                mismatch[name] += 1
                continue
            acc[name].add(x, y)
    result = OrderedDict()
    for name in fnames:
        r = acc[name].result()
        if mismatch[name]:
            r['shape_mismatch'] = mismatch[name]
        r['kind'] = 'output' if name in outs else 'boundary'
        result[name] = r
    return result


#: Detections of the INT8 graph match FP32 ones within this fraction of the
#: input's larger side (box coordinates) ...
DET_BOX_TOL_REL = 0.01
#: ... and this score difference.
DET_SCORE_TOL = 0.05


def detection_agreement(fp32_path: str, int8_path: str, inputs: Sequence,
                        threads: Optional[int] = None) -> dict:
    """How many detections of an end-to-end INT8 graph (``dets``,
    ``labels`` outputs) match the FP32 graph's on the same inputs: same
    label, boxes within :data:`DET_BOX_TOL_REL` of the input size, scores
    within :data:`DET_SCORE_TOL` (the export package's matching).

    Returns:
        dict: :func:`.verify.compare_detections` summed over the inputs
        (``matched``, ``detections``, ``reference_detections``,
        ``unmatched``, ``max_box``, ``max_score``, ...), plus ``box_tol``
        and ``score_tol``.
    """
    from .runtime import input_names, make_session
    from .verify import compare_detections, merge_comparisons, split_dets
    fsess, qsess = make_session(fp32_path, threads), make_session(
        int8_path, threads)
    results, first = [], 0
    box_tol = 0.0
    for feed in _as_feeds(inputs, input_names(fsess)):
        a = fsess.run(['dets', 'labels'], feed)
        b = qsess.run(['dets', 'labels'], feed)
        x = next(iter(feed.values()))
        tol = DET_BOX_TOL_REL * max(x.shape[-2:])
        box_tol = max(box_tol, tol)
        results.append(compare_detections(split_dets(*b), split_dets(*a),
                                          tol, DET_SCORE_TOL, first))
        first += x.shape[0]
    out = merge_comparisons(results)
    out.update(box_tol=box_tol, score_tol=DET_SCORE_TOL)
    return out


# ------------------------------------------------------------ per layer
def layer_name(node_name: str) -> str:
    """Readable module path of an exported node: ``/model/stage_1/
    stage_1.0/conv_reparam/Conv`` -> ``stage_1.0.conv_reparam`` (the
    export wrappers' ``model`` / ``detector`` scopes dropped)."""
    parts = [p for p in node_name.strip('/').split('/') if p]
    if len(parts) > 1:
        parts = parts[:-1]  # the op itself
    while len(parts) > 1 and parts[0] in ('model', 'detector'):
        parts = parts[1:]  # the export wrappers' scopes
    name = ''
    for p in parts:
        if name and p.startswith(name.rsplit('.', 1)[-1] + '.'):
            # torch scopes repeat the parent: stage_1/stage_1.0
            name = name.rsplit('.', 1)[0] + '.' + p if '.' in name else p
        elif name and (p.startswith(name + '.') or p == name):
            name = p
        else:
            name = f'{name}.{p}' if name else p
    return name or node_name


def _initializer(graph, name: str) -> Optional[np.ndarray]:
    from onnx import numpy_helper
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def _fake_quant(x: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                qmin: int, qmax: int, axis: int = 1) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    zero = np.asarray(zero, dtype=np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    q = np.clip(np.rint(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def _qrange(zero: np.ndarray) -> Tuple[int, int]:
    return (-128, 127) if np.asarray(zero).dtype == np.int8 else (0, 255)


def _dequant_weight(graph, conv) -> Optional[np.ndarray]:
    producers = _producers(graph)
    dq = producers.get(conv.input[1])
    if dq is None or dq.op_type != 'DequantizeLinear':
        return None
    w = _initializer(graph, dq.input[0])
    scale = _initializer(graph, dq.input[1])
    zero = _initializer(graph, dq.input[2]) if len(dq.input) > 2 else \
        np.zeros_like(scale, dtype=np.int8)
    if w is None or scale is None:
        return None
    axis = 1
    for a in dq.attribute:
        if a.name == 'axis':
            axis = a.i
    scale = np.asarray(scale, dtype=np.float64)
    zero = np.asarray(zero, dtype=np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * w.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (w.astype(np.float64) - zero) * scale


def _quantized_output(graph, consumers, conv):
    """``(QuantizeLinear, dequantized tensor name)`` of a QDQ graph's conv
    output, after its activation when the quantizer kept one; ``(None,
    None)`` when the output is not quantized. Follows the graph from the
    conv node, so the quantizer's renaming of graph outputs does not
    matter."""
    tensor = conv.output[0]
    nxt = consumers.get(tensor, [])
    if len(nxt) == 1 and nxt[0].op_type in FOLDED_ACTIVATIONS:
        tensor = nxt[0].output[0]
    for qn in consumers.get(tensor, []):
        if qn.op_type != 'QuantizeLinear':
            continue
        for dq in consumers.get(qn.output[0], []):
            if dq.op_type == 'DequantizeLinear':
                return qn, dq.output[0]
    return None, None


def layer_errors(fp32_model,
                 int8_model,
                 inputs: Sequence,
                 threads: Optional[int] = None) -> List[dict]:
    """Per conv layer, how much INT8 costs (QDQ graphs).

    For every ``Conv`` of the FP32 graph (graph order) the layer's float
    activation is its output, or the output of the activation right after
    it (:data:`FOLDED_ACTIVATIONS`). Measured over ``inputs``:

    * ``sqnr_db``: the INT8 graph's dequantized activation vs the FP32
      graph's: the error accumulated up to this layer;
    * ``act_sqnr_db``: the FP32 activation quantized alone with the INT8
      graph's scale and zero point: this layer's own rounding and clipping;
    * ``weight_sqnr_db``: the dequantized INT8 weights vs the FP32 weights;
    * ``w_peak_over_mean``: ``max|w| / mean|w|`` of the FP32 weights, worst
      output channel: outliers a per-channel scale must cover (the rest of
      the channel then gets few quantization levels).

    Args:
        fp32_model: FP32 ``ModelProto`` or path.
        int8_model: the QDQ INT8 graph of it (``ModelProto`` or path).
        inputs (Sequence): arrays (single input) or feed dicts.
        threads (int, optional): onnxruntime threads.

    Returns:
        list[dict]: one row per conv: ``layer`` (module path), ``node``,
        ``out_channels``, ``sqnr_db``, ``act_sqnr_db``, ``weight_sqnr_db``,
        ``w_peak_over_mean``.
    """
    fp, qm = _load(fp32_model), _load(int8_model)
    fg, qg = fp.graph, qm.graph
    fcons, qcons = _consumers(fg), _consumers(qg)
    qconv = {n.name: n for n in qg.node if n.op_type == 'Conv'}
    rows, ftensors, qtensors, qparams = [], [], [], []
    for conv in fg.node:
        if conv.op_type != 'Conv' or conv.name not in qconv:
            continue
        out = conv.output[0]
        act = [c for c in fcons.get(out, [])
               if c.op_type in FOLDED_ACTIVATIONS]
        tensor = act[0].output[0] if len(act) == 1 and len(
            fcons.get(out, [])) == 1 else out
        qnode, qname = _quantized_output(qg, qcons, qconv[conv.name])
        if qnode is None:
            continue
        w = _initializer(fg, conv.input[1])
        wq = _dequant_weight(qg, qconv[conv.name])
        scale = _initializer(qg, qnode.input[1])
        zero = _initializer(qg, qnode.input[2]) if len(qnode.input) > 2 \
            else np.zeros((), np.uint8)
        row = dict(layer=layer_name(conv.name), node=conv.name,
                   out_channels=int(w.shape[0]) if w is not None else None,
                   weight_sqnr_db=sqnr_db(w, wq) if w is not None and
                   wq is not None else None)
        if w is not None:
            flat = np.abs(w.reshape(w.shape[0], -1).astype(np.float64))
            mean = flat.mean(axis=1)
            ratio = flat.max(axis=1) / np.where(mean > 0, mean, 1)
            row['w_peak_over_mean'] = float(ratio.max())
        rows.append(row)
        ftensors.append(tensor)
        qtensors.append(qname)
        qparams.append((scale, zero))
    if not rows:
        raise QuantizeError('no quantized Conv layer found (is the INT8 graph '
                            'a QDQ graph of the FP32 graph?)')
    from .runtime import input_names
    fsess = _session_from_model(add_outputs(fp, ftensors), threads)
    qsess = _session_from_model(add_outputs(qm, qtensors), threads)
    feeds = _as_feeds(inputs, input_names(fsess))
    acc = [_ErrorAccumulator() for _ in rows]
    own = [_ErrorAccumulator() for _ in rows]
    for feed in feeds:
        a = fsess.run(ftensors, feed)
        b = qsess.run(qtensors, feed)
        for i, (x, y) in enumerate(zip(a, b)):
            acc[i].add(x, y)
            scale, zero = qparams[i]
            lo, hi = _qrange(zero)
            own[i].add(x, _fake_quant(x, scale, zero, lo, hi))
    for row, a, o in zip(rows, acc, own):
        row['sqnr_db'] = a.result()['sqnr_db']
        row['act_sqnr_db'] = o.result()['sqnr_db']
    return rows


def format_layer_table(reports: Mapping[str, Sequence[dict]]) -> str:
    """Markdown table comparing :func:`layer_errors` of several graphs
    (e.g. ``{'RepVGG': rows, 'QARepVGG': rows}``), layer by layer.

    Layers are matched by position (same architecture, same conv order).
    """
    labels = list(reports)
    if not labels:
        return ''
    n = max(len(r) for r in reports.values())
    head = ['layer']
    for lab in labels:
        head += [f'{lab} SQNR dB', f'{lab} act dB', f'{lab} weight dB',
                 f'{lab} max/mean |w|']
    lines = ['| ' + ' | '.join(head) + ' |',
             '|---|' + '---:|' * (len(head) - 1)]

    def f(v, fmt='{:.1f}'):
        return 'n/a' if v is None else fmt.format(v)

    for i in range(n):
        first = next(r[i] for r in reports.values() if i < len(r))
        cells = [first['layer']]
        for lab in labels:
            r = reports[lab][i] if i < len(reports[lab]) else {}
            cells += [f(r.get('sqnr_db')), f(r.get('act_sqnr_db')),
                      f(r.get('weight_sqnr_db')),
                      f(r.get('w_peak_over_mean'))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# ---------------------------------------------------------- real images
SPLITS = dict(train='train_dataloader', val='val_dataloader',
              test='test_dataloader')


def _inner_dataset(ds_cfg):
    while 'dataset' in ds_cfg and isinstance(ds_cfg['dataset'], dict):
        ds_cfg = ds_cfg['dataset']  # RepeatDataset, ClassBalanced... wrappers
    return ds_cfg


def split_dataset_cfg(cfg, split: str):
    """The dataset config of ``split`` (``train``/``val``/``test``) with the
    config's *test* pipeline and ``test_mode=True`` (no filtering, no
    augmentation).

    Raises:
        QuantizeError: the config has no such split or no test pipeline.
    """
    if split not in SPLITS:
        raise QuantizeError(f'split {split!r}: choose from '
                            f'{", ".join(SPLITS)}')
    loader = cfg.get(SPLITS[split])
    if not loader or 'dataset' not in loader:
        raise QuantizeError(f'the config has no {SPLITS[split]}.dataset')
    test_loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    if not test_loader or 'dataset' not in test_loader:
        raise QuantizeError('the config has no test_dataloader.dataset '
                            '(its pipeline preprocesses the images)')
    ds_cfg = copy.deepcopy(_inner_dataset(loader['dataset']))
    pipeline = _inner_dataset(test_loader['dataset']).get('pipeline')
    if not pipeline:
        raise QuantizeError('the config\'s test dataset has no pipeline')
    ds_cfg['pipeline'] = copy.deepcopy(pipeline)
    ds_cfg['test_mode'] = True
    return ds_cfg


def build_split(cfg, split: str):
    """The dataset of ``split`` (:func:`split_dataset_cfg`), built.

    Raises:
        QuantizeError: naming the annotation file or folder that is missing
            or unreadable.
    """
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    ds_cfg = split_dataset_cfg(cfg, split)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' chat
            ds = DATASETS.build(ds_cfg)
    except Exception as e:  # mmengine wraps errors of the dataset class
        root = ds_cfg.get('data_root', '')
        ann = osp.join(root, ds_cfg.get('ann_file', '')) if root else \
            ds_cfg.get('ann_file', '')
        first = str(e).strip().splitlines()[0] if str(e).strip() else \
            type(e).__name__
        raise QuantizeError(f'cannot read the {split} images of the config '
                            f'(annotations {ann!r}): {first}') from None
    if len(ds) == 0:
        raise QuantizeError(f'the {split} dataset of the config is empty')
    return ds


def pick_indices(total: int, num: Optional[int]) -> List[int]:
    """``num`` indices spread evenly over ``range(total)`` (all of them
    when ``num`` is ``None`` or at least ``total``)."""
    if num is None or num >= total:
        return list(range(total))
    if num < 1:
        raise QuantizeError(f'number of images must be >= 1, got {num}')
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, num)})


def build_preprocessor(cfg):
    """The detector's data preprocessor (normalization, BGR->RGB, padding)
    built from ``cfg.model.data_preprocessor``: it holds no weights."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    dp = cfg.model.get('data_preprocessor')
    if not dp:
        raise QuantizeError('the config\'s model has no data_preprocessor '
                            '(needed to feed real images to the graph)')
    return MODELS.build(copy.deepcopy(dp)).eval()


def preprocessed_images(cfg,
                        split: str,
                        num: Optional[int],
                        preprocessor=None) -> Tuple[List[dict], dict]:
    """Real images of the config's ``split`` through the test pipeline and
    the data preprocessor, one image each: what an exported graph takes.

    Args:
        cfg (Config): the model config.
        split (str): ``train``, ``val`` or ``test``.
        num (int, optional): how many (evenly spread over the split); all
            when ``None`` or more than the split holds.
        preprocessor (nn.Module, optional): default
            :func:`build_preprocessor` of ``cfg``.

    Returns:
        tuple: feeds ``{'input': 1x3xHxW float32, 'img_shape': 1x2 int64
        (valid h, w inside the padded input)}``, and ``dict(split, images,
        of, shapes)``.
    """
    import torch
    from mmengine.dataset import pseudo_collate
    preprocessor = preprocessor or build_preprocessor(cfg)
    ds = build_split(cfg, split)
    idx = pick_indices(len(ds), num)
    feeds, shapes = [], Counter()
    with torch.no_grad():
        for i in idx:
            batch = preprocessor(pseudo_collate([ds[i]]), False)
            x = batch['inputs'].float().cpu().contiguous().numpy()
            h, w = batch['data_samples'][0].metainfo['img_shape'][:2]
            feeds.append(dict(input=x, img_shape=np.asarray(
                [[h, w]], dtype=np.int64)))
            shapes[tuple(x.shape)] += 1
    return feeds, dict(split=split, images=len(feeds), of=len(ds),
                       shapes=dict(shapes))


# ------------------------------------------------------------- workflow
#: Default number of real images the INT8 graph is verified on.
DEFAULT_VERIFY_IMAGES = 8
#: A quantized tensor below this SQNR against FP32 fails the verification.
DEFAULT_MIN_SQNR = 10.0


def _check_workflow_args(cfg, config_path: str, checkpoint: str,
                         outputs: Sequence[Tuple[str, Optional[str], str]],
                         splits: Sequence[str], calib_images: Optional[int],
                         verify_images: int, min_sqnr: float,
                         bench: int) -> None:
    """Refuse, before any work, every argument that could fail later:
    ``outputs`` are ``(option, path or None, extension)``; none may be an
    input (config, checkpoint, annotation files of ``splits``), another
    output or a folder."""
    for what, path, ext in outputs:
        if path is not None and not str(path).endswith(ext):
            raise QuantizeError(f'{what} {path}: must be a {ext} file')
    inputs = [(config_path, 'CONFIG'), (checkpoint, 'CHECKPOINT')]
    for split in dict.fromkeys(splits):
        ds_cfg = split_dataset_cfg(cfg, split)
        if ds_cfg.get('ann_file'):
            inputs.append((osp.join(ds_cfg.get('data_root') or '',
                                    ds_cfg['ann_file']),
                           f'{split} annotation file'))
    check_output_paths(inputs, [p for _, p, _ in outputs if p is not None],
                       QuantizeError)
    if calib_images is not None and calib_images < 1:
        raise QuantizeError(f'--calib-images must be >= 1, got '
                            f'{calib_images}')
    if verify_images < 1:
        raise QuantizeError(f'--verify-images must be >= 1, got '
                            f'{verify_images}')
    if not min_sqnr == min_sqnr:  # NaN
        raise QuantizeError('--min-sqnr must be a number')
    if bench < 0:
        raise QuantizeError(f'--bench must be >= 0, got {bench}')
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise QuantizeError(f'needs onnx and onnxruntime ({e}); pip install '
                            '-e .[onnx]') from None


def time_sessions(paths: Mapping[str, str],
                  feed,
                  repeats: int,
                  warmup: int = 2,
                  threads: Optional[int] = None) -> dict:
    """Median latency of onnxruntime graphs on one input, interleaved (the
    benchmark's method: balanced order, one settle call, disturbed rounds
    dropped), and the median per-round ratio of each to the first.

    Args:
        paths (Mapping[str, str]): name -> ``.onnx`` file.
        feed (np.ndarray | dict): the input (array or feed dict).
        repeats (int): timed rounds.
        warmup (int): untimed rounds.
        threads (int, optional): onnxruntime intra-op threads.

    Returns:
        dict: ``latency_ms`` (name -> ms), ``ratio`` (name -> median of
        per-round ratios to the first graph), ``rounds``, ``dropped``,
        ``busy`` and ``shape``.
    """
    from mmrepvgg.utils.timing import measure
    from .runtime import input_names, make_session
    fns = {}
    shape = None
    for name, path in paths.items():
        sess = make_session(path, threads)
        (f, ) = _as_feeds([feed], input_names(sess))
        shape = tuple(next(iter(f.values())).shape)
        fns[name] = (lambda s=sess, f=f: s.run(None, f))
    t = measure(fns, repeats, warmup, threads=threads)
    first = next(iter(paths))
    return dict(latency_ms={k: 1e3 * t.median(k) for k in t.times},
                ratio={k: t.ratio(k, first)['median'] for k in t.times},
                rounds=len(t.reasons), dropped=t.disturbed, busy=t.busy,
                shape=shape)


def quantize_checkpoint(cfg,
                        config_path: str,
                        checkpoint: str,
                        output: str,
                        backbone_only: bool = False,
                        img_shape_input: bool = False,
                        calib_images: Optional[int] = DEFAULT_CALIB_IMAGES,
                        calib_split: str = 'train',
                        verify_images: int = DEFAULT_VERIFY_IMAGES,
                        verify_split: str = 'val',
                        config: Optional[QuantConfig] = None,
                        min_sqnr: float = DEFAULT_MIN_SQNR,
                        threads: Optional[int] = None,
                        unsafe_load: bool = False,
                        layers: bool = False,
                        bench: int = 0,
                        fp32_output: Optional[str] = None,
                        layers_json: Optional[str] = None) -> dict:
    """Export the fused model of a config + checkpoint, quantize it to INT8
    on real images, verify it against the FP32 graph and write it.

    The FP32 graph comes from :func:`.onnx_export.export_onnx` (mode
    ``backbone`` or ``end2end``, verified against PyTorch there); the INT8
    graph has the same inputs and outputs, so whatever evaluates the FP32
    file evaluates the INT8 one.

    Args:
        cfg (Config): the model config (training or deploy twin).
        config_path (str): its path, for messages.
        checkpoint (str): training-form or deploy checkpoint.
        output (str): the INT8 ``.onnx`` file, written atomically after the
            verification passed.
        backbone_only (bool): the backbone alone; otherwise the end-to-end
            detector graph (preprocessed image in, ``dets``/``labels`` out),
            its post-processing left in float.
        img_shape_input (bool): end-to-end graph with the ``img_shape``
            input (see :mod:`.onnx_export`).
        calib_images (int, optional): calibration images of
            ``calib_split`` (evenly spread; all when ``None`` or more than
            the split holds).
        calib_split (str): ``train`` (default: not the images the model is
            evaluated on), ``val`` or ``test``.
        verify_images (int): images of ``verify_split`` the INT8 graph is
            compared with the FP32 graph on.
        verify_split (str): ``val`` by default.
        config (QuantConfig, optional): quantization settings.
        min_sqnr (float): every quantized output (backbone features, or the
            head's raw outputs of a detector graph) must reach this SQNR
            (dB) against FP32, or nothing is written.
        threads (int, optional): onnxruntime threads.
        unsafe_load (bool): unpickle the checkpoint freely (trusted files
            only).
        layers (bool): also measure :func:`layer_errors`.
        bench (int): time FP32 vs INT8 onnxruntime with this many rounds
            (0: no timing).
        fp32_output (str, optional): also write the FP32 graph there.
        layers_json (str, optional): also write the :func:`layer_errors`
            rows there as JSON (implies ``layers``).

    Every output is checked against every input and the other outputs
    first (:func:`mmrepvgg.utils.fileio.check_output_paths`) and written
    only at the very end, all or none (``output`` renamed last); the
    intermediate graphs live in a private
    :func:`mmrepvgg.utils.fileio.scratch_dir`.

    Returns:
        dict: what was done and measured (printed by ``tools/quantize.py``).

    Raises:
        QuantizeError / ExportError: bad arguments, unreadable data, a
            failed verification; nothing is written then.
    """
    import shutil

    from .onnx_export import export_onnx
    config = (config or QuantConfig()).validate()
    _check_workflow_args(
        cfg, config_path, checkpoint,
        [('OUTPUT', output, '.onnx'), ('--save-fp32', fp32_output, '.onnx'),
         ('--layers-json', layers_json, '.json')],
        [calib_split, verify_split], calib_images, verify_images, min_sqnr,
        bench)
    layers = layers or layers_json is not None
    preprocessor = build_preprocessor(cfg)
    calib, calib_info = preprocessed_images(cfg, calib_split, calib_images,
                                            preprocessor)
    verify, verify_info = preprocessed_images(cfg, verify_split,
                                              verify_images, preprocessor)
    with scratch_dir('mmrepvgg-quantize') as tmp:
        fp32 = osp.join(tmp, 'fp32.onnx')
        int8 = osp.join(tmp, 'int8.onnx')
        shape = tuple(int(v) for v in calib[0]['input'].shape[2:])
        exp = export_onnx(cfg, config_path, checkpoint, fp32,
                          mode='backbone' if backbone_only else 'end2end',
                          img_shape_input=img_shape_input, shape=shape,
                          threads=threads, unsafe_load=unsafe_load)
        report = dict(checkpoint_form=exp['checkpoint_form'],
                      blocks=exp['blocks'], exported=exp['exported'],
                      output=output, config=config.describe(),
                      calibration=calib_info, verification=verify_info,
                      inputs=_graph_inputs(fp32))
        if 'postprocess' in exp:
            report['postprocess'] = exp['postprocess']
        qinfo = quantize_onnx(fp32, int8, calib, config)
        report.update(quantized=qinfo['quantized'],
                      excluded=qinfo['excluded'],
                      excluded_ops=dict(qinfo['excluded_ops']),
                      boundary=qinfo['boundary'])
        detector = {'dets', 'labels'} <= {
            o.name for o in _load(fp32).graph.output}
        errors = compare_sessions(fp32, int8, verify,
                                  extra_tensors=qinfo['boundary'],
                                  threads=threads, outputs=not detector)
        report['errors'] = errors
        if detector:
            report['detections'] = detection_agreement(fp32, int8, verify,
                                                       threads)
        for name in qinfo['boundary']:
            e = errors[name]
            if not e['sqnr_db'] >= min_sqnr:  # NaN fails too
                raise QuantizeError(
                    f'{checkpoint}: INT8 tensor {name} is too far from FP32 '
                    f'(SQNR {e["sqnr_db"]:.1f} dB < --min-sqnr '
                    f'{min_sqnr:g}, relative error {e["rel_err"]:.3g}); '
                    f'{output} not written')
        report['ops_fp32'] = dict(op_histogram(fp32))
        report['ops_int8'] = dict(op_histogram(int8))
        report['runtime_ops'] = dict(optimized_op_types(int8, threads))
        report['size_fp32'] = osp.getsize(fp32)
        if layers:
            report['layers'] = layer_errors(fp32, int8, verify, threads)
        if bench:
            report['bench'] = time_sessions(dict(fp32=fp32, int8=int8),
                                            verify[0], bench,
                                            threads=threads)
        writes = [(output, lambda t: shutil.copyfile(int8, t))]
        if layers_json is not None:
            rows = json.dumps(report['layers'], indent=1)
            writes.insert(0, (layers_json, lambda t: _write_text(t, rows)))
        if fp32_output is not None:
            writes.insert(0, (fp32_output, lambda t: shutil.copyfile(fp32,
                                                                     t)))
        report['size'] = osp.getsize(int8)
        atomic_write_all(writes)
    return report


def _write_text(path: str, text: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)
