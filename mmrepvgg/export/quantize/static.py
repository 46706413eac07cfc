"""Static INT8 quantization with :mod:`onnxruntime.quantization` of an ONNX
graph's conv region: every ``Conv``, what feeds one and an activation right
after one; what only reads the last convs' outputs (score activation, box
decoding, TopK, NMS) stays float (``docs/int8.md``)."""
import contextlib
import functools
import io
import json
import os
import os.path as osp
import tempfile
import types
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .calibration import QuantizeError, as_feeds

#: Activations folded into the quantization range of the conv before them.
FOLDED_ACTIVATIONS = ('Relu', 'Clip')
#: Op types of the conv region that get quantized (QDQ pairs around them).
REGION_OP_TYPES = ('Conv', 'Relu', 'Clip', 'Add', 'Resize', 'MaxPool',
                   'AveragePool', 'GlobalAveragePool', 'Concat', 'Mul',
                   'Sigmoid', 'Upsample')
#: Weight types: ``int8`` (the fast ``u8s8`` kernels) or ``uint8``
#: (``u8u8``: no int16 saturation on CPUs without VNNI).
QUANT_TYPES = ('int8', 'uint8')
#: ``metadata_props`` key of the INT8 graph describing its quantization.
QUANT_METADATA_KEY = 'mmrepvgg.quantization'


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
        for t in filter(None, node.input):
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
    (e.g. ``QLinearConv`` where a QDQ pair around a ``Conv`` was fused)."""
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


def quantizable_nodes(model) -> Tuple[List[str], List[str]]:
    """``(region, excluded)`` node names in graph order (see the module
    docstring); nodes without a name get one (the model changes in
    place)."""
    graph = load(model).graph
    for i, node in enumerate(graph.node):
        node.name = node.name or f'{node.op_type}_{i}'
    made_by = producers(graph)
    region = set()
    stack = [n for n in graph.node if n.op_type == 'Conv']
    while stack:
        node = stack.pop()
        if node.name not in region:
            region.add(node.name)
            stack += [made_by[t] for t in node.input if t in made_by]
    for node in graph.node:
        if node.op_type in FOLDED_ACTIVATIONS and node.input and getattr(
                made_by.get(node.input[0]), 'op_type', '') == 'Conv':
            region.add(node.name)
    names = [n.name for n in graph.node]
    return ([n for n in names if n in region],
            [n for n in names if n not in region])


def boundary_tensors(model, region: Iterable[str]) -> List[str]:
    """Float tensors produced inside ``region`` and read outside it (or
    graph outputs): the raw outputs of the quantized part."""
    graph = load(model).graph
    region = set(region)
    read_by = consumers(graph)
    outputs = {o.name for o in graph.output}
    return [t for node in graph.node if node.name in region
            for t in node.output
            if t in outputs or any(c.name not in region
                                   for c in read_by.get(t, []))]


def region_info(model, region: Sequence[str], excluded: Sequence[str],
                calibration: int, description: str) -> dict:
    """What both quantizers report: ``config`` (text), ``quantized`` and
    ``excluded`` node counts, ``excluded_ops``, ``boundary``
    (:func:`boundary_tensors`), ``calibration`` (number of inputs)."""
    excluded = set(excluded)
    return dict(config=description, quantized=len(region),
                excluded=len(excluded),
                excluded_ops=Counter(n.op_type for n in model.graph.node
                                     if n.name in excluded),
                boundary=boundary_tensors(model, region),
                calibration=calibration)


def record(model, description: str, calibration: int) -> None:
    """Record in ``model``'s metadata how it is quantized (both quantizers
    keep the FP32 graph's entries, e.g. the post-processing settings the
    ONNX evaluation reads)."""
    model.metadata_props.add(key=QUANT_METADATA_KEY, value=json.dumps(
        dict(config=description, calibration_inputs=calibration)))


def quantize_onnx(fp32_path: str,
                  out_path: str,
                  calibration: Sequence,
                  weight_type: str = 'int8') -> dict:
    """Statically quantize the graph ``fp32_path`` into ``out_path``
    (written directly: the workflow makes the final file atomic): QDQ,
    asymmetric uint8 activations calibrated by MinMax on arrays for the
    first input or feed dicts, symmetric per-channel weights of
    ``weight_type`` (:data:`QUANT_TYPES`); returns :func:`region_info`."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if weight_type not in QUANT_TYPES:
        raise QuantizeError(f'--weight-type {weight_type!r}: choose from '
                            f'{", ".join(QUANT_TYPES)}')
    sign = 's' if weight_type == 'int8' else 'u'
    config = (f'QDQ, u8 activations, {sign}8 weights per channel, MinMax '
              'calibration')
    if not calibration:
        raise QuantizeError('no calibration inputs')
    feeds = as_feeds(calibration, graph_inputs(fp32_path))
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-quant-') as tmp:
        pre = osp.join(tmp, 'pre.onnx')
        quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
        model = load(pre)
        region, excluded = quantizable_nodes(model)
        record(model, config, len(feeds))
        reader = types.SimpleNamespace(
            get_next=functools.partial(next, iter(feeds), None))
        with contextlib.redirect_stdout(io.StringIO()):  # progress prints
            q.quantize_static(
                model, out_path, reader, quant_format=q.QuantFormat.QDQ,
                per_channel=True, activation_type=q.QuantType.QUInt8,
                weight_type=(q.QuantType.QInt8 if weight_type == 'int8'
                             else q.QuantType.QUInt8),
                calibrate_method=q.CalibrationMethod.MinMax,
                extra_options=dict(WeightSymmetric=True),
                nodes_to_quantize=region, nodes_to_exclude=excluded,
                op_types_to_quantize=sorted(
                    {n.op_type for n in model.graph.node
                     if n.name in region} & set(REGION_OP_TYPES)))
    return region_info(model, region, excluded, len(feeds),
                       config)


def export_module(module, x, path: str, opset: Optional[int] = None) -> None:
    """Export ``module`` (tensor -> tensor(s), e.g. a deploy-form backbone)
    traced on ``x`` to ``path``: input ``input`` with dynamic batch, height
    and width, outputs ``feat0 ...``."""
    from ..graph import DEFAULT_OPSET, TensorForward, export_to
    export_to(TensorForward(module, 'module').eval(), x, path,
              opset or DEFAULT_OPSET)
