"""ONNX export of deployed (fused) RepVGG models behind
``tools/export_onnx.py``.

What is exported
    * ``backbone_only``: the backbone alone (``model.backbone``, or the model
      itself when the config's model *is* a backbone, e.g.
      ``model = dict(type='RepVGG', ...)``); outputs ``feat0 ... featN``.
    * otherwise, for an mmdet single-stage detector: its tensor forward
      ``model.bbox_head(model.extract_feat(x))`` (backbone + neck + head raw
      outputs, no anchor decoding, NMS or other post-processing), flattened
      to ``out{i}_{level}`` (e.g. ``out0_*`` = class scores and ``out1_*`` =
      box deltas of a RetinaNet).
    * two-stage and other detectors are refused: their RoI head needs
      proposals selected by post-processing, which is not part of a raw
      tensor graph; export their backbone with ``backbone_only``.

    The input ``input`` is the preprocessed batch (normalized and padded as
    mmdet's ``DetDataPreprocessor`` produces it), float32 NCHW; batch, height
    and width are dynamic axes, as are those of every 4-D output.

Which checkpoints
    A training-form checkpoint is loaded into the model built from the config
    and converted with :func:`mmrepvgg.deploy.switch_to_deploy`. A deploy
    checkpoint (``conv_reparam`` weights, e.g. from
    ``tools/convert_deploy.py``; detected with
    :func:`~mmrepvgg.apis.convert.is_deploy_state_dict`) is loaded into the
    model built from :func:`mmrepvgg.deploy.make_deploy_config` of the config
    (every RepVGG module with ``deploy=True``). Either way the load is strict
    and safe (``weights_only``) unless ``unsafe_load``.

How
    ``torch.onnx.export(..., dynamo=False)``: the TorchScript-based exporter
    handles every op of these models (convs, activations, SE, nearest
    upsampling), so the dynamo exporter (and its ``onnxscript`` dependency)
    is not needed. The graph is written to a temporary file next to OUTPUT,
    checked with ``onnx.checker``, run with onnxruntime (CPUExecutionProvider)
    on two random inputs of different batch and spatial sizes, compared with
    the PyTorch deploy model, and renamed to OUTPUT only if the largest
    relative error ``max|a - b| / max|a|`` is within the tolerance.
"""
import math
import os.path as osp
import statistics
import time
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from mmrepvgg.deploy import (atomic_write, count_reparam_blocks,
                             make_deploy_config, switch_to_deploy)
from mmrepvgg.testing import relative_error
from .convert import (ConvertError, build_model, is_deploy_state_dict,
                      load_weights, read_state_dict, test_input_shape)

#: Default opset: widely consumed (TensorRT >= 8.6, onnxruntime >= 1.14) and
#: enough for every op these models use.
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


class ExportError(ConvertError):
    """Export refused or failed; the message names the file or argument."""


# ---------------------------------------------------------------- loading
def load_deploy_model(cfg: Config, config_path: str, checkpoint: str,
                      unsafe_load: bool = False) -> Tuple[nn.Module, dict]:
    """Build the model of ``cfg`` with the weights of ``checkpoint`` in
    deploy form (CPU, eval mode); returns ``(model, info)``."""
    sd, _ = read_state_dict(checkpoint, unsafe_load)
    deploy_ckpt = is_deploy_state_dict(sd)
    if deploy_ckpt:
        from mmdet.registry import MODELS
        try:
            cfg = make_deploy_config(cfg, MODELS.get)
        except ValueError as e:
            raise ExportError(f'{config_path}: {e}; cannot load the deploy '
                              f'checkpoint {checkpoint}') from None
    model = build_model(cfg)
    load_weights(model, sd, checkpoint, config_path)
    model.eval()
    blocks = count_reparam_blocks(model)
    if not deploy_ckpt:
        model = switch_to_deploy(model, inplace=True, verbose=False)
    counts = count_reparam_blocks(model)
    if counts['deployed'] != counts['total']:
        left = counts['total'] - counts['deployed']
        raise ExportError(f'{checkpoint}: {left} RepVGG block(s) are not in '
                          'deploy form')
    info = dict(checkpoint_form='deploy' if deploy_ckpt else 'training',
                blocks=blocks['total'])
    return model, info


# ---------------------------------------------------------------- module
def _flatten(obj, prefix: str, out: List[Tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((prefix, obj))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f'{prefix}_{i}' if prefix else f'{i}', out)
    else:
        raise ExportError(f'cannot export an output of type '
                          f'{type(obj).__name__} (tensors, lists and tuples '
                          'only)')


class TensorForward(nn.Module):
    """The exported function: ``x -> flat tuple of output tensors``."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode  # 'module' (model(x)) or 'single_stage'

    def raw(self, x: torch.Tensor):
        if self.mode == 'single_stage':
            return self.model.bbox_head(self.model.extract_feat(x))
        return self.model(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out: List[Tuple[str, torch.Tensor]] = []
        _flatten(self.raw(x), '', out)
        return tuple(t for _, t in out)

    @torch.no_grad()
    def output_names(self, x: torch.Tensor) -> List[str]:
        out: List[Tuple[str, torch.Tensor]] = []
        raw = self.raw(x)
        if isinstance(raw, torch.Tensor):
            return ['out']
        _flatten(raw, '', out)
        base = 'feat' if self.mode == 'module' else 'out'
        return [f'{base}{name}' for name, _ in out]


def export_target(model: nn.Module, backbone_only: bool,
                  config_path: str) -> Tuple[TensorForward, str]:
    """``(TensorForward, description)`` of what gets exported."""
    from mmdet.models.detectors import SingleStageDetector
    is_detector = hasattr(model, 'backbone')
    if backbone_only:
        target = model.backbone if is_detector else model
        return TensorForward(target, 'module'), \
            f'backbone ({type(target).__name__})'
    if not is_detector:
        return TensorForward(model, 'module'), type(model).__name__
    if isinstance(model, SingleStageDetector):
        parts = ['backbone'] + (['neck'] if model.with_neck else []) + \
            ['bbox_head']
        return TensorForward(model, 'single_stage'), \
            f'{type(model).__name__} ({" + ".join(parts)}, raw outputs)'
    raise ExportError(
        f'{config_path}: {type(model).__name__} is not a single-stage '
        'detector; its RoI head needs post-processed proposals and is not '
        'exported as a raw tensor graph: use --backbone-only')


def check_exportable(cfg: Config, backbone_only: bool,
                     config_path: str) -> None:
    """Refuse, before loading any weights, a detector type whose whole
    tensor forward is not exported (see :func:`export_target`)."""
    if backbone_only:
        return
    from mmdet.models.detectors import SingleStageDetector
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    t = cfg.model.get('type')
    cls = MODELS.get(t) if isinstance(t, str) else t
    if (isinstance(cls, type) and 'backbone' in cfg.model
            and not issubclass(cls, SingleStageDetector)):
        raise ExportError(
            f'{config_path}: {cls.__name__} is not a single-stage detector; '
            'its RoI head needs post-processed proposals and is not '
            'exported as a raw tensor graph: use --backbone-only')


# ----------------------------------------------------------------- export
def export_to(module: TensorForward, x: torch.Tensor, path: str,
              opset: int) -> List[str]:
    """Export ``module`` traced on ``x`` to ``path``; returns the output
    names."""
    names = module.output_names(x)
    with torch.no_grad():
        sample = module(x)
    dynamic = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    for name, t in zip(names, sample):
        if t.dim() == 4:
            dynamic[name] = {0: 'batch', 2: f'{name}_height',
                             3: f'{name}_width'}
        elif t.dim() >= 1:
            dynamic[name] = {0: 'batch'}
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo=True;
        # tracer warnings about Python values are expected here.
        warnings.simplefilter('ignore')
        with torch.no_grad():
            torch.onnx.export(
                module, (x, ), path, dynamo=False, opset_version=opset,
                input_names=['input'], output_names=names,
                dynamic_axes=dynamic, do_constant_folding=True,
                export_params=True)
    return names


def op_histogram(path: str) -> Counter:
    """``Counter`` of the op types of the graph's nodes."""
    import onnx
    model = onnx.load(path)
    return Counter(node.op_type for node in model.graph.node)


def check_onnx(path: str) -> None:
    import onnx
    try:
        onnx.checker.check_model(path)
    except Exception as e:  # onnx raises ValidationError and others
        raise ExportError(f'exported graph fails onnx.checker: '
                          f'{str(e).splitlines()[0]}') from None


def make_session(path: str, threads: Optional[int] = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    # No busy-waiting of onnxruntime's pool after a run: interleaved with
    # PyTorch (verification, --bench) the spinning threads would steal the
    # cores PyTorch's own threads run on and slow it down many times.
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, sess_options=opts,
                                providers=['CPUExecutionProvider'])


def run_onnx(session, x: np.ndarray) -> List[np.ndarray]:
    return session.run(None, {'input': x})


def random_input(batch: int, shape: Tuple[int, int],
                 seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *shape, generator=g)


def verify_shapes(shape: Tuple[int, int]) -> List[Tuple[int, Tuple[int,
                                                                   int]]]:
    """``[(batch, (H, W)), ...]`` checked: the traced shape with batch 1, and
    a second one with batch 2, H + 32 and W - 32 (at least 32), to exercise
    the dynamic axes."""
    h, w = shape
    return [(1, (h, w)), (2, (h + 32, max(32, w - 32)))]


def compare(module: TensorForward, session, names: Sequence[str],
            inputs: Sequence[torch.Tensor], device: str = 'cpu') -> dict:
    """Max relative error (per output, ``max|a-b|/max|a|``) over inputs."""
    worst = dict(max_rel=-1.0, worst='', outputs=len(names))
    for x in inputs:
        with torch.no_grad():
            ref = module(x.to(device))
        got = run_onnx(session, x.numpy())
        if len(got) != len(ref):
            raise ExportError(f'onnxruntime returned {len(got)} outputs, '
                              f'PyTorch {len(ref)}')
        for name, a, b in zip(names, ref, got):
            if tuple(a.shape) != tuple(b.shape):
                raise ExportError(
                    f'output {name} at input {tuple(x.shape)}: onnxruntime '
                    f'shape {tuple(b.shape)} != PyTorch {tuple(a.shape)} '
                    '(dynamic axes broken)')
            err = relative_error(a.cpu(), torch.from_numpy(b))
            if math.isnan(worst['max_rel']):
                continue
            if not err <= worst['max_rel']:  # NaN counts as the worst
                worst['max_rel'], worst['worst'] = err, \
                    f'{name} at {tuple(x.shape)}'
    return worst


def benchmark(module: TensorForward, session, x: torch.Tensor,
              repeats: int, warmup: int, device: str = 'cpu') -> dict:
    """Median seconds of PyTorch (deploy) and onnxruntime on ``x``,
    interleaved."""
    xt, xn = x.to(device), x.numpy()
    runs = dict(pytorch=lambda: module(xt), onnxruntime=lambda: run_onnx(
        session, xn))
    times: Dict[str, List[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for name, fn in runs.items():
                if xt.is_cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if xt.is_cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(
        a / b for a, b in zip(times['onnxruntime'], times['pytorch']))
    return dict(pytorch=med['pytorch'], onnxruntime=med['onnxruntime'],
                ratio=ratio, repeats=repeats, shape=tuple(x.shape))


def fusion_leftovers(hist: Counter) -> Dict[str, int]:
    """Ops of a backbone graph that are neither Conv nor an activation."""
    return {op: n for op, n in sorted(hist.items())
            if op != 'Conv' and op not in ACTIVATION_OPS}


def export_onnx(cfg: Config,
                config_path: str,
                checkpoint: str,
                output: str,
                backbone_only: bool = False,
                shape: Optional[Tuple[int, int]] = None,
                opset: int = DEFAULT_OPSET,
                device: str = 'cpu',
                tolerance: float = 1e-4,
                unsafe_load: bool = False,
                bench: bool = False,
                repeats: int = 20,
                warmup: int = 3,
                threads: Optional[int] = None) -> dict:
    """Export, verify and (optionally) benchmark; returns a report dict.

    OUTPUT is written only after verification passed (temporary file in the
    same folder, renamed).

    Raises:
        ExportError: one-line message naming the file/argument at fault.
    """
    try:
        import onnx  # noqa: F401  (fail early with the install hint)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f'{e.name} is not installed: pip install -e '
                          '".[onnx]"') from None
    if not output.endswith('.onnx'):
        raise ExportError(f'{output}: OUTPUT must end with .onnx')
    if osp.exists(output) and osp.exists(checkpoint) and \
            osp.samefile(output, checkpoint):
        raise ExportError(f'{output}: refusing to overwrite the input '
                          'checkpoint')
    max_opset = max_torchscript_opset()
    if not 7 <= opset <= max_opset:
        raise ExportError(f'--opset {opset}: the TorchScript exporter '
                          f'supports opsets 7..{max_opset}')
    if not tolerance >= 0:
        raise ExportError(f'--tolerance must be >= 0, got {tolerance}')
    if device != 'cpu':
        if not device.startswith('cuda') or not torch.cuda.is_available():
            raise ExportError(f'--device {device}: not available (cpu or an '
                              'available cuda device)')
    if shape is not None and min(shape) < 1:
        raise ExportError(f'--shape {shape[0]} {shape[1]}: must be positive')

    check_exportable(cfg, backbone_only, config_path)
    model, info = load_deploy_model(cfg, config_path, checkpoint,
                                    unsafe_load)
    module, what = export_target(model, backbone_only, config_path)
    module.eval()
    shape = tuple(shape) if shape else test_input_shape(cfg)
    checks = verify_shapes(shape)
    inputs = [random_input(b, hw, seed=i) for i, (b, hw) in enumerate(checks)]
    report = dict(info, exported=what, output=output, opset=opset,
                  shape=shape, checks=[(b, hw) for b, hw in checks])

    def write(tmp: str) -> None:
        # traced on CPU: the ONNX graph does not depend on the device
        names = export_to(module, inputs[0], tmp, opset)
        check_onnx(tmp)
        report['ops'] = op_histogram(tmp)
        session = make_session(tmp, threads)
        module.to(device)
        errs = compare(module, session, names, inputs, device)
        report.update(errs)
        if not errs['max_rel'] <= tolerance:
            raise ExportError(
                f'{checkpoint}: onnxruntime outputs differ from PyTorch by '
                f'relative error {errs["max_rel"]:.3g} (at {errs["worst"]}) '
                f'> tolerance {tolerance:g}; {output} not written')
        if bench:
            report['bench'] = benchmark(module, session, inputs[0], repeats,
                                        warmup, device)

    atomic_write(output, write)
    report['size'] = osp.getsize(output)
    if backbone_only:
        report['leftovers'] = fusion_leftovers(report['ops'])
    return report
