"""What is traced (:class:`TensorForward`) and ``torch.onnx.export`` with
dynamic batch, height and width (``dynamo=False``: the TorchScript exporter
traces top-k and NMS into dynamic ops); small checks of a graph file.
"""
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from mmrepvgg.utils.cli import error_message
from .loading import ExportError

#: Widely consumed (TensorRT >= 8.6, onnxruntime >= 1.14).
DEFAULT_OPSET = 17
#: ONNX ops an activation of mmcv's registry exports to.
ACTIVATION_OPS = frozenset({
    'Relu', 'LeakyRelu', 'PRelu', 'Elu', 'Selu', 'Sigmoid', 'HardSigmoid',
    'HardSwish', 'Clip', 'Tanh', 'Softplus', 'Gelu', 'Mul', 'Mish'})


def max_torchscript_opset() -> int:
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 17


def _flatten(obj, prefix: str = '') -> List[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if not isinstance(obj, (list, tuple)):
        raise ExportError(f'cannot export an output of type '
                          f'{type(obj).__name__} (tensors, lists and tuples '
                          'only)')
    return [item for i, v in enumerate(obj)
            for item in _flatten(v, f'{prefix}_{i}' if prefix else f'{i}')]


class TensorForward(nn.Module):
    """``x -> flat tuple of output tensors`` of ``model(x)`` (``mode=
    'module'``) or ``bbox_head(extract_feat(x))`` (``'single_stage'``)."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode

    def raw(self, x: torch.Tensor):
        if self.mode == 'single_stage':
            return self.model.bbox_head(self.model.extract_feat(x))
        return self.model(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(t for _, t in _flatten(self.raw(x)))

    @torch.no_grad()
    def output_names(self, x: torch.Tensor) -> List[str]:
        raw = self.raw(x)
        if isinstance(raw, torch.Tensor):
            return ['out']
        base = 'feat' if self.mode == 'module' else 'out'
        return [f'{base}{name}' for name, _ in _flatten(raw)]


def parts(model: nn.Module) -> str:
    return ' + '.join(['backbone'] + (['neck'] if model.with_neck else []) +
                      ['bbox_head'])


def export_to(module: nn.Module,
              x: torch.Tensor,
              path: str,
              opset: int,
              extra_inputs: Sequence[Tuple[str, torch.Tensor]] = (),
              output_names: Optional[Sequence[str]] = None) -> List[str]:
    """Export ``module`` traced on ``x`` (input ``input``; ``extra_inputs``
    ``(name, tensor)`` with a dynamic batch) to ``path``; returns the output
    names (default: ``module.output_names(x)``)."""
    names = list(output_names) if output_names else module.output_names(x)
    args = (x, ) + tuple(t for _, t in extra_inputs)
    with torch.no_grad():
        sample = module(*args)
    if isinstance(sample, torch.Tensor):
        sample = (sample, )
    dynamic = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    for name, _ in extra_inputs:
        dynamic[name] = {0: 'batch'}
    for name, t in zip(names, sample):
        if t.dim() == 4:
            dynamic[name] = {0: 'batch', 2: f'{name}_height',
                             3: f'{name}_width'}
        elif t.dim() >= 1:
            dynamic[name] = {0: 'batch'}
    with warnings.catch_warnings():
        # the exporter's deprecation and tracer warnings are expected
        warnings.simplefilter('ignore')
        with torch.no_grad():
            torch.onnx.export(
                module, args, path, dynamo=False, opset_version=opset,
                input_names=['input'] + [n for n, _ in extra_inputs],
                output_names=names, dynamic_axes=dynamic,
                do_constant_folding=True, export_params=True)
    return names


def op_histogram(path_or_model) -> Counter:
    """``Counter`` of the op types of the graph's nodes."""
    import onnx
    model = path_or_model if isinstance(
        path_or_model, onnx.ModelProto) else onnx.load(path_or_model)
    return Counter(node.op_type for node in model.graph.node)


def check_onnx(path: str) -> None:
    import onnx
    try:
        onnx.checker.check_model(path)
    except Exception as e:  # onnx raises ValidationError and others
        raise ExportError(f'exported graph fails onnx.checker: '
                          f'{error_message(e)}') from None


def keep_outputs(src: str, dst: str, names: Sequence[str],
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Copy ``src`` to ``dst`` keeping the outputs ``names``, ``metadata``
    added to its ``metadata_props``."""
    import onnx
    model = onnx.load(src)
    keep = [o for o in model.graph.output if o.name in names]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, dst)


def fusion_leftovers(hist: Counter) -> Dict[str, int]:
    """Ops of a backbone graph that are neither Conv nor an activation."""
    return {op: n for op, n in sorted(hist.items())
            if op != 'Conv' and op not in ACTIVATION_OPS}
