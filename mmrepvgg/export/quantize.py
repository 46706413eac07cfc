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
import copy
import math
import os
import os.path as osp
import tempfile
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mmrepvgg.utils.cli import ToolError

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
def session_options(threads: Optional[int] = None,
                    spinning: bool = False,
                    level: str = 'all',
                    optimized_path: Optional[str] = None):
    """onnxruntime ``SessionOptions`` for timing and verification.

    Args:
        threads (int, optional): intra-op threads (default: onnxruntime's,
            one per physical core).
        spinning (bool): let idle pool threads busy-wait after a run. Off by
            default: interleaved with PyTorch, spinning threads steal the
            cores PyTorch's threads need.
        level (str): graph optimization level, ``disable``, ``basic``,
            ``extended`` (QDQ fusion into ``QLinearConv``) or ``all`` (plus
            layout transformations such as NCHWc).
        optimized_path (str, optional): write the optimized graph there.
    """
    import onnxruntime as ort
    levels = dict(disable=ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  basic=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  extended=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  all=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if level not in levels:
        raise QuantizeError(f'graph optimization level {level!r}: choose '
                            f'from {", ".join(levels)}')
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[level]
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry('session.intra_op.allow_spinning',
                                  '1' if spinning else '0')
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return opts


def open_session(path: str, threads: Optional[int] = None,
                 spinning: bool = False, level: str = 'all'):
    """An onnxruntime ``InferenceSession`` on the CPU provider (see
    :func:`session_options`)."""
    import onnxruntime as ort
    try:
        return ort.InferenceSession(
            path, sess_options=session_options(threads, spinning, level),
            providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own exception types
        raise QuantizeError(f'{path}: onnxruntime cannot load the graph: '
                            f'{str(e).splitlines()[0]}') from None


def optimized_op_types(path: str, threads: Optional[int] = 1,
                       level: str = 'all') -> Counter:
    """Op types onnxruntime's CPU provider runs after its graph optimizer
    (e.g. ``QLinearConv`` where the QDQ pairs were fused)."""
    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        opt = osp.join(tmp, 'optimized.onnx')
        import onnxruntime as ort
        ort.InferenceSession(
            path, sess_options=session_options(threads, False, level, opt),
            providers=['CPUExecutionProvider'])
        model = onnx.load(opt, load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def op_types(path_or_model) -> Counter:
    """``Counter`` of the op types of an ONNX file or ``ModelProto``."""
    model = _load(path_or_model)
    return Counter(n.op_type for n in model.graph.node)


def _load(path_or_model):
    import onnx
    if isinstance(path_or_model, (str, os.PathLike)):
        return onnx.load(str(path_or_model))
    return path_or_model


def input_names(session) -> List[str]:
    return [i.name for i in session.get_inputs()]


# --------------------------------------------------------------- export
def export_module(module, x, path: str, opset: Optional[int] = None) -> None:
    """Export ``module`` (a tensor -> tensor(s) module, e.g. a deploy-form
    backbone) traced on ``x`` to ``path``, input ``input``, dynamic batch,
    height and width, with the export package's exporter."""
    from mmrepvgg.apis.export import DEFAULT_OPSET, TensorForward, export_to
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


def _as_feeds(inputs, input_name: str) -> List[Dict[str, np.ndarray]]:
    feeds = []
    for x in inputs:
        if isinstance(x, Mapping):
            feeds.append({k: np.ascontiguousarray(v) for k, v in x.items()})
        else:
            feeds.append({input_name: np.ascontiguousarray(
                np.asarray(x, dtype=np.float32))})
    return feeds


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
    model = onnx.load(fp32_path)
    names = [i.name for i in model.graph.input
             if i.name not in {t.name for t in model.graph.initializer}]
    feeds = _as_feeds(calibration, names[0] if names else 'input')
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
        # the calibrator writes its augmented model next to the input
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            q.quantize_static(named, out_path, _ListReader(feeds), **kwargs)
        finally:
            os.chdir(cwd)
    excluded_ops = Counter(n.op_type for n in pre.graph.node
                           if n.name in set(excluded))
    return dict(config=config.describe(), quantized=len(region),
                excluded=len(excluded), excluded_ops=excluded_ops,
                boundary=boundary, ops=op_types(out_path),
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


def _session_from_model(model, threads: Optional[int], level: str = 'all'):
    import onnxruntime as ort
    return ort.InferenceSession(
        model.SerializeToString(),
        sess_options=session_options(threads, False, level),
        providers=['CPUExecutionProvider'])


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
                     threads: Optional[int] = None) -> 'OrderedDict':
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

    Returns:
        OrderedDict: name -> ``sqnr_db``, ``rel_err``, ``samples``; an
        output whose shape differs between the graphs in some sample (a
        detector keeping a different number of boxes) gets
        ``shape_mismatch`` (count) and is measured on the other samples.
    """
    fp32_model, int8_model = _load(fp32_model), _load(int8_model)
    outs = [o.name for o in fp32_model.graph.output]
    extra = [t for t in extra_tensors if t not in outs]
    q_extra = []
    for t in extra:
        name = dequantized_name(int8_model, t)
        if name is None:
            raise QuantizeError(f'tensor {t} is not in the INT8 graph')
        q_extra.append(name)
    fsess = _session_from_model(add_outputs(fp32_model, extra), threads)
    qsess = _session_from_model(add_outputs(int8_model, q_extra), threads)
    fnames = outs + extra
    qnames = outs + q_extra
    feeds = _as_feeds(inputs, input_names(fsess)[0])
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


# ------------------------------------------------------------ per layer
def layer_name(node_name: str) -> str:
    """Readable module path of an exported node: ``/stage_1/stage_1.0/
    conv_reparam/Conv`` -> ``stage_1.0.conv_reparam``."""
    parts = [p for p in node_name.strip('/').split('/') if p]
    if len(parts) > 1:
        parts = parts[:-1]  # the op itself
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
    * ``w_absmax_over_std``: ``max|w| / std(w)`` of the FP32 weights, worst
      output channel (outliers that a per-channel scale must cover).

    Args:
        fp32_model: FP32 ``ModelProto`` or path.
        int8_model: the QDQ INT8 graph of it (``ModelProto`` or path).
        inputs (Sequence): arrays (single input) or feed dicts.
        threads (int, optional): onnxruntime threads.

    Returns:
        list[dict]: one row per conv: ``layer`` (module path), ``node``,
        ``out_channels``, ``sqnr_db``, ``act_sqnr_db``, ``weight_sqnr_db``,
        ``w_absmax_over_std``.
    """
    fp, qm = _load(fp32_model), _load(int8_model)
    fg, qg = fp.graph, qm.graph
    fcons, qcons = _consumers(fg), _consumers(qg)
    qconv = {n.name: n for n in qg.node if n.op_type == 'Conv'}
    rows, ftensors, qtensors, qparams = [], [], [], []
    for conv in fg.node:
        if conv.op_type != 'Conv':
            continue
        out = conv.output[0]
        act = [c for c in fcons.get(out, [])
               if c.op_type in FOLDED_ACTIVATIONS]
        tensor = act[0].output[0] if len(act) == 1 and len(
            fcons.get(out, [])) == 1 else out
        # the INT8 graph quantizes the activation's output, or the conv's
        # output when the quantizer folded the activation into the range
        qname, qnode = None, None
        for cand in (tensor, out):
            for qn in qcons.get(cand, []):
                if qn.op_type == 'QuantizeLinear':
                    dq = [d for d in qcons.get(qn.output[0], [])
                          if d.op_type == 'DequantizeLinear']
                    if dq:
                        qname, qnode = dq[0].output[0], qn
                        break
            if qname:
                break
        if qname is None:
            continue
        w = _initializer(fg, conv.input[1])
        wq = _dequant_weight(qg, qconv[conv.name]) if conv.name in qconv \
            else None
        scale = _initializer(qg, qnode.input[1])
        zero = _initializer(qg, qnode.input[2]) if len(qnode.input) > 2 \
            else np.zeros((), np.uint8)
        row = dict(layer=layer_name(conv.name), node=conv.name,
                   out_channels=int(w.shape[0]) if w is not None else None,
                   weight_sqnr_db=sqnr_db(w, wq) if w is not None and
                   wq is not None else None)
        if w is not None:
            flat = w.reshape(w.shape[0], -1).astype(np.float64)
            std = flat.std(axis=1)
            ratio = np.abs(flat).max(axis=1) / np.where(std > 0, std, 1)
            row['w_absmax_over_std'] = float(ratio.max())
        rows.append(row)
        ftensors.append(tensor)
        qtensors.append(qname)
        qparams.append((scale, zero))
    if not rows:
        raise QuantizeError('no quantized Conv layer found (is the INT8 graph '
                            'a QDQ graph of the FP32 graph?)')
    fsess = _session_from_model(add_outputs(fp, ftensors), threads)
    qsess = _session_from_model(add_outputs(qm, qtensors), threads)
    feeds = _as_feeds(inputs, input_names(fsess)[0])
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
                 f'{lab} max|w|/std']
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
                      f(r.get('w_absmax_over_std'))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
