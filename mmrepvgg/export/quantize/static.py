"""Post-training static INT8 quantization of an ONNX graph with
:mod:`onnxruntime.quantization`, and the region of the graph that gets
quantized.

What is quantized (:func:`quantizable_nodes`): every ``Conv`` and every node
that feeds a ``Conv`` (the backbone, the neck's resize/add, the head's
towers), plus an activation right after a ``Conv`` (folded into the
quantization range). What only consumes the last convs' outputs (score
activations, box decoding, TopK and NMS of an end-to-end detector) stays
float. onnxruntime's optimizer then fuses every ``DequantizeLinear -> Conv ->
QuantizeLinear`` into one ``QLinearConv`` (:func:`optimized_op_types` shows
what the CPU provider runs). Why the defaults of :class:`QuantConfig` are
what they are, measured, is in ``docs/int8.md``.
"""
import contextlib
import io
import json
import os
import os.path as osp
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .calibration import ListReader, QuantizeError, as_feeds

#: Activations folded into the quantization range of the conv before them.
FOLDED_ACTIVATIONS = ('Relu', 'Clip')
#: Op types of the conv region that get quantized (QDQ pairs around them).
REGION_OP_TYPES = ('Conv', 'Relu', 'Clip', 'Add', 'Resize', 'MaxPool',
                   'AveragePool', 'GlobalAveragePool', 'Concat', 'Mul',
                   'Sigmoid', 'Upsample')
CALIBRATION_METHODS = ('MinMax', 'Entropy', 'Percentile')
QUANT_FORMATS = ('QDQ', 'QOperator')
QUANT_TYPES = ('int8', 'uint8')
#: Histogram bins of the Entropy calibration (TensorRT's calibrator uses
#: 2048 bins for 128 quantized bins).
ENTROPY_BINS = 2048
#: ``metadata_props`` key of the INT8 graph describing its quantization.
QUANT_METADATA_KEY = 'mmrepvgg.quantization'


@dataclass
class QuantConfig:
    """How a graph is quantized (defaults: ``docs/int8.md``).

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
    """
    quant_format: str = 'QDQ'
    activation_type: str = 'uint8'
    weight_type: str = 'int8'
    per_channel: bool = True
    reduce_range: bool = False
    calibrate_method: str = 'MinMax'
    percentile: float = 99.999
    symmetric_activations: bool = False

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


# ---------------------------------------------------------------- graphs
def load(path_or_model):
    """An ONNX ``ModelProto`` from a path (a model is returned as is)."""
    import onnx
    if isinstance(path_or_model, (str, os.PathLike)):
        return onnx.load(str(path_or_model))
    return path_or_model


def consumers(graph) -> Dict[str, list]:
    """Tensor name -> the nodes that read it."""
    out: Dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            if t:
                out.setdefault(t, []).append(node)
    return out


def producers(graph) -> Dict[str, object]:
    """Tensor name -> the node that writes it."""
    return {t: node for node in graph.node for t in node.output if t}


def graph_inputs(model) -> List[str]:
    """The graph's inputs that are not initializers."""
    graph = load(model).graph
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


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


# ---------------------------------------------------------------- region
def quantizable_nodes(model) -> Tuple[List[str], List[str]]:
    """Split the nodes of a graph into the conv region (see the module
    docstring) and the rest, ``(region, excluded)`` node names in graph
    order; nodes without a name get one (the model changes in place)."""
    graph = load(model).graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f'{node.op_type}_{i}'
    made_by = producers(graph)
    feeds_conv = set()
    stack = [n for n in graph.node if n.op_type == 'Conv']
    while stack:
        node = stack.pop()
        if node.name in feeds_conv:
            continue
        feeds_conv.add(node.name)
        stack += [made_by[t] for t in node.input if t in made_by]
    region = set(feeds_conv)
    for node in graph.node:
        if node.op_type in FOLDED_ACTIVATIONS and node.input and getattr(
                made_by.get(node.input[0]), 'op_type', '') == 'Conv':
            region.add(node.name)
    order = [n.name for n in graph.node]
    return ([n for n in order if n in region],
            [n for n in order if n not in region])


def boundary_tensors(model, region: Iterable[str]) -> List[str]:
    """Float tensors produced inside ``region`` and consumed outside it (or
    graph outputs): the raw outputs of the quantized part."""
    graph = load(model).graph
    region = set(region)
    read_by = consumers(graph)
    outputs = {o.name for o in graph.output}
    return [t for node in graph.node if node.name in region
            for t in node.output
            if t in outputs or any(c.name not in region
                                   for c in read_by.get(t, []))]


# ------------------------------------------------------------ quantizing
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
    with contextlib.redirect_stdout(io.StringIO()):  # progress prints
        cal.collect_data(reader)
        ranges = cal.compute_data()
    cache = osp.join(tmp, 'entropy_ranges.json')
    save_tensors_data(ranges, cache)
    return cache


def keep_metadata(src: str, dst: str, description: str,
                  calibration: int) -> None:
    """Carry the FP32 graph's ``metadata_props`` (e.g. the export's
    post-processing settings, read by the ONNX evaluation) over to the INT8
    graph, and record how it was quantized."""
    import onnx
    fp32 = onnx.load(src, load_external_data=False)
    model = onnx.load(dst)
    props = {p.key: p.value for p in fp32.metadata_props}
    props.update({p.key: p.value for p in model.metadata_props})
    props[QUANT_METADATA_KEY] = json.dumps(
        dict(config=description, calibration_inputs=calibration))
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, dst)


def quantize_onnx(fp32_path: str,
                  out_path: str,
                  calibration: Sequence,
                  config: Optional[QuantConfig] = None) -> dict:
    """Statically quantize ``fp32_path`` into ``out_path``.

    Args:
        fp32_path (str): the FP32 graph.
        out_path (str): where the INT8 graph goes (written directly; wrap
            in :func:`mmrepvgg.utils.fileio.atomic_write` for an atomic
            file).
        calibration (Sequence): calibration inputs: arrays for the graph's
            first input, or feed dicts ``{input name: array}``.
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
    feeds = as_feeds(calibration, graph_inputs(fp32_path))
    qtype = dict(int8=q.QuantType.QInt8, uint8=q.QuantType.QUInt8)
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-quant-') as tmp:
        from onnxruntime.quantization.shape_inference import \
            quant_pre_process
        src = osp.join(tmp, 'pre.onnx')
        quant_pre_process(fp32_path, src, skip_symbolic_shape=True)
        pre = onnx.load(src)
        region, excluded = quantizable_nodes(pre)
        named = osp.join(tmp, 'named.onnx')
        onnx.save(pre, named)  # with the node names quantizable_nodes set
        extra = dict(ActivationSymmetric=config.symmetric_activations,
                     WeightSymmetric=True,
                     CalibPercentile=config.percentile)
        kwargs = dict(
            quant_format=getattr(q.QuantFormat, config.quant_format),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type],
            calibrate_method=getattr(q.CalibrationMethod,
                                     config.calibrate_method),
            extra_options=extra, nodes_to_quantize=region,
            nodes_to_exclude=excluded,
            op_types_to_quantize=sorted(
                {n.op_type for n in pre.graph.node
                 if n.name in region} & set(REGION_OP_TYPES)))
        reader = ListReader(feeds)
        if config.calibrate_method == 'Entropy':
            kwargs['calibration_cache_path'] = _entropy_ranges(
                named, reader, kwargs['op_types_to_quantize'],
                config.symmetric_activations, tmp)
            reader.rewind()
        with contextlib.redirect_stdout(io.StringIO()):  # progress prints
            q.quantize_static(named, out_path, reader, **kwargs)
    keep_metadata(fp32_path, out_path, config.describe(), len(feeds))
    out_ops = Counter(n.op_type for n in load(out_path).graph.node)
    excluded = set(excluded)
    return dict(config=config.describe(), quantized=len(region),
                excluded=len(excluded),
                excluded_ops=Counter(n.op_type for n in pre.graph.node
                                     if n.name in excluded),
                boundary=boundary_tensors(pre, region), ops=out_ops,
                calibration=len(feeds))


def export_module(module, x, path: str, opset: Optional[int] = None) -> None:
    """Export ``module`` (a tensor -> tensor(s) module, e.g. a deploy-form
    backbone) traced on ``x`` to ``path`` with the export package's
    exporter: input ``input``, dynamic batch, height and width, outputs
    ``feat0 ...``."""
    from ..onnx_export import DEFAULT_OPSET, TensorForward, export_to
    export_to(TensorForward(module, 'module').eval(), x, path,
              opset or DEFAULT_OPSET)
