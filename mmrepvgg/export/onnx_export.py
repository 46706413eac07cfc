"""ONNX export of deployed (fused) RepVGG models behind
``tools/export_onnx.py``.

What is exported (the ``what`` argument of :func:`export_onnx`)
    * ``'backbone'``: the backbone alone (``model.backbone``, or the model
      itself when the config's model *is* a backbone, e.g.
      ``model = dict(type='RepVGG', ...)``); outputs ``feat0 ... featN``.
    * ``'raw'``: a single-stage detector's tensor forward
      ``model.bbox_head(model.extract_feat(x))`` (no anchor decoding, no
      NMS), flattened to ``out{i}_{level}`` (``out0_*`` class scores,
      ``out1_*`` box regressions, ``out2_*`` score factors if any).
    * ``'end2end'``: a single-stage detector with mmdet's post-processing
      in the graph (:mod:`.postprocess`): outputs ``dets`` (N, K, 5: x1,
      y1, x2, y2, score) and ``labels`` (N, K), K = ``test_cfg.max_per_img``,
      padded with zero rows and label -1, the layout mmdeploy uses. With
      ``img_shape_input`` a second input ``img_shape`` (N, 2: each image's
      valid h, w in the padded batch) bounds the box clipping as mmdet's
      ``img_shape`` does; without it boxes are clipped to the input size.
    * two-stage and other detectors are refused: their RoI head needs
      proposals selected by post-processing (export the backbone).

    The input ``input`` is the preprocessed batch (normalized and padded as
    mmdet's ``DetDataPreprocessor`` produces it), float32 NCHW; batch, height
    and width are dynamic axes in every mode (priors are computed from the
    feature map sizes in the graph).

How
    ``torch.onnx.export(..., dynamo=False)``: the TorchScript-based exporter
    is still in torch 2.13, traces data-dependent shapes (top-k, NMS
    results) into dynamic ONNX ops and lets a ``torch.autograd.Function``
    emit ``NonMaxSuppression``; the dynamo exporter cannot export the
    data-dependent NMS output without a custom op. The graph is written to
    a temporary file next to OUTPUT, checked with ``onnx.checker``, run with
    onnxruntime on random inputs of two batch sizes and spatial sizes (plus
    test-set images when the config's data is there) and compared with
    PyTorch (:mod:`.verify`); OUTPUT appears only if every check passed.
"""
import json
import os
import os.path as osp
import tempfile
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from mmrepvgg.apis.convert import MAX_SIDE, test_input_shape
from mmrepvgg.deploy import atomic_write
from mmrepvgg.deploy.verify import NOISE_FACTOR, describe
from mmrepvgg.utils.fileio import check_output_paths
from . import runtime
from .evaluate import MAX_BATCH
from .loading import ExportError, load_deploy_model
from .metadata import METADATA_KEY
from .postprocess import (End2EndDetector, PostProcessError, check_head,
                          check_test_cfg, describe_settings)
from .verify import (SCORE_TOL, box_tolerance, compare_detections,
                     dataset_batch,
                     describe_comparison, judge_raw, make_samples,
                     merge_comparisons, merge_verdicts, mmdet_postprocess,
                     mmdet_predict, split_dets, TruthAndReference)

#: Default opset: widely consumed (TensorRT >= 8.6, onnxruntime >= 1.14) and
#: enough for every op these models use (NonMaxSuppression needs >= 10).
DEFAULT_OPSET = 17
#: ONNX ops an activation of mmcv's registry exports to.
ACTIVATION_OPS = frozenset({
    'Relu', 'LeakyRelu', 'PRelu', 'Elu', 'Selu', 'Sigmoid', 'HardSigmoid',
    'HardSwish', 'Clip', 'Tanh', 'Softplus', 'Gelu', 'Mul', 'Mish'})
#: Export modes.
MODES = ('backbone', 'raw', 'end2end')
#: Free bytes below which a failed write counts as a full file system.
FULL_DISK_BYTES = 2**20


def max_torchscript_opset() -> int:
    """Highest opset of the TorchScript-based exporter of this torch."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 17


# ---------------------------------------------------------------- modules
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
    """The exported function: ``x -> flat tuple of output tensors``.

    Args:
        model (nn.Module): a module (``mode='module'``, ``model(x)``) or a
            single-stage detector (``mode='single_stage'``,
            ``bbox_head(extract_feat(x))``).
        mode (str): ``'module'`` or ``'single_stage'``.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode

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


def _is_single_stage(model_or_cls) -> bool:
    from mmdet.models.detectors import SingleStageDetector
    if isinstance(model_or_cls, type):
        return issubclass(model_or_cls, SingleStageDetector)
    return isinstance(model_or_cls, SingleStageDetector)


def _not_single_stage(config_path: str, name: str) -> ExportError:
    return ExportError(
        f'{config_path}: {name} is not a single-stage detector; its RoI head '
        'needs proposals selected by post-processing (not exported): use '
        '--backbone-only')


def export_target(model: nn.Module, mode: str,
                  config_path: str) -> Tuple[TensorForward, str]:
    """``(TensorForward, description)`` for the ``'backbone'`` and ``'raw'``
    modes."""
    is_detector = hasattr(model, 'backbone')
    if mode == 'backbone':
        target = model.backbone if is_detector else model
        return TensorForward(target, 'module'), \
            f'backbone ({type(target).__name__})'
    if not is_detector:
        return TensorForward(model, 'module'), type(model).__name__
    if _is_single_stage(model):
        return TensorForward(model, 'single_stage'), \
            f'{type(model).__name__} ({" + ".join(_parts(model))}, raw ' \
            'outputs)'
    raise _not_single_stage(config_path, type(model).__name__)


def _parts(model: nn.Module) -> List[str]:
    return ['backbone'] + (['neck'] if model.with_neck else []) + \
        ['bbox_head']


def check_exportable(cfg: Config, mode: str, config_path: str) -> None:
    """Refuse, before loading any weights, a model whose export in ``mode``
    is not supported (see :func:`export_target`)."""
    if mode == 'backbone':
        return
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    t = cfg.model.get('type')
    cls = MODELS.get(t) if isinstance(t, str) else t
    is_detector = 'backbone' in cfg.model
    if isinstance(cls, type) and is_detector and not _is_single_stage(cls):
        raise _not_single_stage(config_path, cls.__name__)
    if mode == 'end2end' and not is_detector:
        raise ExportError(f'{config_path}: --postprocess needs a '
                          'single-stage detector config (the model has no '
                          'backbone/head)')
    if mode == 'end2end':
        try:
            check_test_cfg(cfg.model.get('test_cfg'))
        except PostProcessError as e:
            raise ExportError(f'{config_path}: cannot put the '
                              f'post-processing in the graph: {e}') from None


# ----------------------------------------------------------------- export
def export_to(module: nn.Module,
              x: torch.Tensor,
              path: str,
              opset: int,
              extra_inputs: Sequence[Tuple[str, torch.Tensor]] = (),
              output_names: Optional[Sequence[str]] = None) -> List[str]:
    """Export ``module`` traced on ``x`` (input ``input``, dynamic batch,
    height and width) to ``path``; returns the output names.

    Args:
        module (nn.Module): a :class:`TensorForward` (output names from
            it) or any module returning a tuple of tensors.
        x (Tensor): the traced input.
        path (str): the ``.onnx`` file written.
        opset (int): ONNX opset.
        extra_inputs: further ``(name, tensor)`` inputs (dynamic batch).
        output_names: names of the outputs (default: the module's
            ``output_names(x)``).
    """
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
        # the TorchScript exporter is deprecated in favour of dynamo=True;
        # tracer warnings about Python values are expected here.
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
    model = onnx.load(path_or_model) if isinstance(
        path_or_model, (str, os.PathLike)) else path_or_model
    return Counter(node.op_type for node in model.graph.node)


def check_onnx(path: str) -> None:
    import onnx
    try:
        onnx.checker.check_model(path)
    except Exception as e:  # onnx raises ValidationError and others
        raise ExportError(f'exported graph fails onnx.checker: '
                          f'{str(e).splitlines()[0]}') from None


def keep_outputs(src: str, dst: str, names: Sequence[str],
                 metadata: Optional[Dict[str, str]] = None) -> None:
    """Copy the graph ``src`` to ``dst`` with only the outputs ``names``
    (the verification graph also exposes the raw head tensors) and the
    ``metadata`` entries added to its ``metadata_props``."""
    import onnx
    model = onnx.load(src)
    keep = [o for o in model.graph.output if o.name in names]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    for key, value in (metadata or {}).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, dst)


def random_input(batch: int, shape: Tuple[int, int],
                 seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *shape, generator=g)


def verify_shapes(shape: Tuple[int, int]) -> List[Tuple[int, Tuple[int,
                                                                   int]]]:
    """``[(batch, (H, W)), ...]`` checked: the traced shape with batch 1, and
    a second one with batch 2, H + 32 (H - 32 beyond ``MAX_SIDE``) and
    W - 32 (at least 32), to exercise the dynamic axes."""
    h, w = shape
    return [(1, (h, w)), (2, (h + 32 if h + 32 <= MAX_SIDE else h - 32,
                              max(32, w - 32)))]


def fusion_leftovers(hist: Counter) -> Dict[str, int]:
    """Ops of a backbone graph that are neither Conv nor an activation."""
    return {op: n for op, n in sorted(hist.items())
            if op != 'Conv' and op not in ACTIVATION_OPS}


# ------------------------------------------------------------ checks
def _check_args(output: str, checkpoint: str, config_path: str,
                opset: int, device: str, tolerance: Optional[float],
                factor: float, shape: Optional[Sequence[int]],
                box_tol: float, score_tol: float, mode: str) -> None:
    try:
        import onnx  # noqa: F401  (fail early with the install hint)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f'{e.name} is not installed: pip install -e '
                          '".[onnx]"') from None
    if mode not in MODES:
        raise ExportError(f'unknown export mode {mode!r} ({", ".join(MODES)})')
    if not output.endswith('.onnx'):
        raise ExportError(f'{output}: OUTPUT must end with .onnx')
    check_output_paths([(checkpoint, 'input checkpoint'),
                        (config_path, 'input config')], [output], ExportError)
    max_opset = max_torchscript_opset()
    low = 11 if mode == 'end2end' else 7
    if not low <= opset <= max_opset:
        raise ExportError(f'--opset {opset}: the TorchScript exporter '
                          f'supports opsets {low}..{max_opset} here')
    if tolerance is not None and not tolerance >= 0:
        raise ExportError(f'--tolerance must be >= 0, got {tolerance}')
    if not factor > 0:
        raise ExportError(f'--noise-factor must be > 0, got {factor}')
    if not ((box_tol is None or box_tol >= 0) and score_tol >= 0):
        raise ExportError('--box-tol and --score-tol must be >= 0')
    if device != 'cpu':
        if not device.startswith('cuda') or not torch.cuda.is_available():
            raise ExportError(f'--device {device}: not available (cpu or an '
                              'available cuda device)')
    if shape is not None and not (len(shape) == 2 and all(
            isinstance(v, int) and 1 <= v <= MAX_SIDE for v in shape)):
        raise ExportError(f'--shape must be two integers in [1, {MAX_SIDE}],'
                          f' got {list(shape)}')


def write_output(output: str, write: Callable[[str], None]) -> None:
    """:func:`~mmrepvgg.deploy.atomic_write` of ``output``, a failure of
    the file system one line naming ``output``: an ``OSError`` (full disk,
    quota, file size limit, read-only folder), or any error raised while
    fewer than :data:`FULL_DISK_BYTES` are free there (onnx and onnxruntime
    report a failed write or a truncated file from C++, without an errno).
    """

    def free_bytes(path: str) -> int:
        try:
            st = os.statvfs(osp.dirname(osp.abspath(path)))
        except OSError:
            return FULL_DISK_BYTES
        return st.f_bavail * st.f_frsize

    def failure(e: Exception, path: str) -> Optional[ExportError]:
        if free_bytes(path) < FULL_DISK_BYTES:
            reason = 'its file system is full'
        elif isinstance(e, OSError):
            reason = e.strerror or str(e)
        else:
            return None
        return ExportError(f'{output}: cannot write it ({reason}); nothing '
                           'written')

    def guarded(tmp: str) -> None:
        try:  # before the temporary is removed (freeing its space)
            write(tmp)
        except Exception as e:
            err = failure(e, tmp)
            if err is None:
                raise
            raise err from None

    try:
        atomic_write(output, guarded)
    except OSError as e:  # creating, syncing or renaming the temporary
        raise failure(e, output) from None


def _raw_failure(checkpoint: str, output: str, verdict: dict,
                 candidate: str = 'onnxruntime') -> ExportError:
    return ExportError(
        f'{checkpoint}: onnxruntime outputs differ from PyTorch: '
        f'{describe(verdict, candidate=candidate, reference="PyTorch")}; '
        f'{output} not written')


# ----------------------------------------------------------------- workflow
def export_onnx(cfg: Config,
                config_path: str,
                checkpoint: str,
                output: str,
                mode: str = 'raw',
                img_shape_input: bool = False,
                shape: Optional[Tuple[int, int]] = None,
                opset: int = DEFAULT_OPSET,
                device: str = 'cpu',
                tolerance: Optional[float] = None,
                noise_factor: float = NOISE_FACTOR,
                box_tol: Optional[float] = None,
                score_tol: float = SCORE_TOL,
                max_differing: float = 0.05,
                verify_images: int = 4,
                unsafe_load: bool = False,
                bench: bool = False,
                repeats: int = 20,
                warmup: int = 3,
                threads: Optional[int] = None) -> dict:
    """Export, verify and (optionally) benchmark; returns a report dict.

    OUTPUT is written only after verification passed (temporary file in the
    same folder, renamed).

    Args:
        cfg (Config): the model config (training or deploy form).
        config_path (str): its file, for messages.
        checkpoint (str): training-form or deploy checkpoint.
        output (str): the ``.onnx`` file to write.
        mode (str): ``'backbone'``, ``'raw'`` or ``'end2end'`` (see the
            module docstring).
        img_shape_input (bool): end2end: add the ``img_shape`` input.
        shape (tuple[int, int], optional): traced and verified (H, W);
            default the config's test resize.
        opset (int): ONNX opset.
        device (str): device of the PyTorch model in verification/timing.
        tolerance (float, optional): fixed relative bound for the raw
            tensors instead of the float32-noise criterion.
        noise_factor (float): the noise criterion's factor.
        box_tol (float, optional): pixels within which two detections'
            coordinates count as equal (default
            :func:`~.verify.box_tolerance` of the input size).
        score_tol (float): likewise for scores.
        max_differing (float): end2end: largest fraction of detections that
            may differ from mmdet's float32 ``predict`` (float32 noise moves
            scores across ``score_thr`` or IoUs across the NMS threshold);
            the post-processing itself must match mmdet exactly on
            onnxruntime's own head outputs.
        verify_images (int): also verify on this many test-set images when
            the config's dataset is readable (0: random inputs only).
        unsafe_load (bool): unpickle the checkpoint freely.
        bench (bool): time onnxruntime vs PyTorch on the same input.
        repeats (int): timed rounds of ``bench``.
        warmup (int): untimed rounds of ``bench``.
        threads (int, optional): onnxruntime intra-op threads.

    Raises:
        ExportError: one-line message naming the file/argument at fault.
    """
    _check_args(output, checkpoint, config_path, opset, device, tolerance,
                noise_factor, shape, box_tol, score_tol, mode)
    if not 0 <= max_differing <= 1:
        raise ExportError(f'--max-differing must be in [0, 1], got '
                          f'{max_differing}')
    if not 0 <= verify_images <= MAX_BATCH:
        raise ExportError(f'--verify-images must be in [0, {MAX_BATCH}] (one '
                          f'batch), got {verify_images}')
    if not shape:
        shape = test_input_shape(cfg)
        if not all(1 <= v <= MAX_SIDE for v in shape):
            raise ExportError(f'{config_path}: test resize {shape[0]}x'
                              f'{shape[1]} is beyond [1, {MAX_SIDE}]: give '
                              '--shape')
    check_exportable(cfg, mode, config_path)
    model, info = load_deploy_model(cfg, config_path, checkpoint,
                                    unsafe_load)
    shape = tuple(shape)
    checks = verify_shapes(shape)
    inputs = [random_input(b, hw, seed=i) for i, (b, hw) in enumerate(checks)]
    report = dict(info, output=output, opset=opset, shape=shape, mode=mode,
                  checks=[(b, hw) for b, hw in checks], threads=threads)
    judge = dict(factor=noise_factor, tolerance=tolerance)
    if mode == 'end2end':
        return _export_end2end(model, cfg, config_path, checkpoint, output,
                               inputs, report, judge, img_shape_input,
                               opset, device, box_tol, score_tol,
                               max_differing, verify_images, bench, repeats,
                               warmup, threads)

    module, what = export_target(model, mode, config_path)
    module.eval()
    report['exported'] = what

    def write(tmp: str) -> None:
        # traced on CPU: the ONNX graph does not depend on the device
        names = export_to(module, inputs[0], tmp, opset)
        check_onnx(tmp)
        report['ops'] = op_histogram(tmp)
        session = runtime.make_session(tmp, threads)
        module.to(device)
        truth_and_ref = TruthAndReference(module)
        verdicts = []
        for x in inputs:
            xd = x.to(device)
            truth, ref = truth_and_ref(xd)
            got = runtime.run_onnx(session, x.numpy())
            verdicts.append(judge_raw(truth, ref, got, names,
                                      'x'.join(map(str, x.shape)), **judge))
        verdict = merge_verdicts(verdicts)
        report['verdict'], report['raw_tensors'] = verdict, len(names)
        if not verdict['passed']:
            raise _raw_failure(checkpoint, output, verdict)
        if bench:
            xd, xn = inputs[0].to(device), inputs[0].numpy()
            report['bench'] = _bench(
                dict(pytorch=lambda: module(xd),
                     onnxruntime=lambda: runtime.run_onnx(session, xn)),
                repeats, warmup, xd, tuple(xd.shape))

    write_output(output, write)
    report['size'] = osp.getsize(output)
    if mode == 'backbone':
        report['leftovers'] = fusion_leftovers(report['ops'])
    return report


def _bench(fns: dict, repeats: int, warmup: int, x: torch.Tensor,
           shape: tuple) -> dict:
    from mmrepvgg.utils.timing import measure
    sync = torch.cuda.synchronize if x.is_cuda else None
    with torch.inference_mode():
        t = measure(fns, repeats, warmup, sync=sync)
    return dict(median={k: t.median(k) for k in fns}, names=list(fns),
                repeats=repeats, shape=shape,
                ratio=t.ratio('onnxruntime', 'pytorch')['median'])


def _export_end2end(model, cfg, config_path, checkpoint, output, inputs,
                    report, judge, img_shape_input, opset, device, box_tol,
                    score_tol, max_differing, verify_images, bench, repeats,
                    warmup, threads) -> dict:
    if not _is_single_stage(model):
        raise _not_single_stage(config_path, type(model).__name__)
    try:
        check_head(model.bbox_head)
    except PostProcessError as e:
        raise ExportError(f'{config_path}: cannot put the post-processing '
                          f'in the graph: {e}') from None
    e2e = End2EndDetector(model, with_img_shape=img_shape_input,
                          with_raw=True).eval()
    settings = e2e.postprocess.settings
    report['exported'] = (f'{type(model).__name__} '
                          f'({" + ".join(_parts(model))} + post-processing, '
                          'end to end)')
    report['settings'] = settings
    report['postprocess'] = describe_settings(settings)
    report['inputs'] = ['input'] + (['img_shape'] if img_shape_input else [])
    report['score_tol'] = score_tol
    raw_net = TensorForward(model, 'single_stage').eval()
    raw_names = e2e.raw_names(inputs[0])
    levels = len(model.bbox_head.prior_generator.strides)

    # verification batches: random inputs (two sizes) + test-set images
    batches = []
    for x in inputs:
        h, w = x.shape[2:]
        shapes = [(h, w)] * x.shape[0]
        if img_shape_input and x.shape[0] > 1:
            # a padded image: boxes must be clipped to its own shape
            shapes[-1] = (h - h // 4, w - w // 8)
        batches.append(('random ' + 'x'.join(map(str, x.shape)), x, shapes))
    x_data, samples_data, note = dataset_batch(cfg, model, verify_images)
    report['dataset_note'] = note
    if x_data is not None:
        shapes = [tuple(s.img_shape) for s in samples_data]
        batches.append((note + ' ' + 'x'.join(map(str, x_data.shape)),
                        x_data, shapes))
    report['batches'] = [b[0] for b in batches]

    def img_shape_of(x, shapes):
        if img_shape_input:
            return np.asarray(shapes, np.int64)
        return None

    def feeds(x, shapes):
        f = dict(input=x.numpy())
        if img_shape_input:
            f['img_shape'] = img_shape_of(x, shapes)
        return f

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(dir=osp.dirname(
                osp.abspath(output))) as work:
            full = osp.join(work, 'verify.onnx')
            x0, shapes0 = batches[0][1], batches[0][2]
            extra = [('img_shape', torch.as_tensor(
                np.asarray(shapes0, np.int64)))] if img_shape_input else []
            export_to(e2e, x0, full, opset, extra_inputs=extra,
                      output_names=['dets', 'labels'] + raw_names)
            check_onnx(full)
            session = runtime.make_session(full, threads)
            model.to(device)
            raw_net.to(device)
            truth_and_ref = TruthAndReference(raw_net)
            verdicts, post, pred = [], [], []
            first = 0
            for tag, x, shapes in batches:
                out = runtime.run(session, feeds(x, shapes))
                dets, labels, raw = out[0], out[1], out[2:]
                xd = x.to(device)
                truth, ref = truth_and_ref(xd)
                verdicts.append(judge_raw(truth, ref, raw, raw_names,
                                          tag.split()[-1], **judge))
                hw = tuple(x.shape[2:])
                tol = box_tolerance(hw, box_tol)
                report['box_tol'] = max(report.get('box_tol', 0.0), tol)
                # mmdet clips to img_shape: the input size unless the graph
                # has the img_shape input
                metas = make_samples(shapes if img_shape_input else
                                     [hw] * x.shape[0], hw)
                ours = split_dets(dets, labels)
                post.append(compare_detections(
                    ours, mmdet_postprocess(model.bbox_head, raw, levels,
                                            metas), tol, score_tol, first))
                pred.append(compare_detections(
                    ours, mmdet_predict(model, xd, [
                        m.to(device) for m in metas]), tol, score_tol, first))
                first += x.shape[0]
            verdict = merge_verdicts(verdicts)
            report['verdict'], report['raw_tensors'] = verdict, len(raw_names)
            post_r, pred_r = merge_comparisons(post), merge_comparisons(pred)
            report['postprocess_check'], report['predict_check'] = \
                post_r, pred_r
            if not verdict['passed']:
                raise _raw_failure(checkpoint, output, verdict)
            if not (post_r['finite'] and pred_r['finite']):
                raise ExportError(f'{checkpoint}: onnxruntime detections are '
                                  f'not finite; {output} not written')
            if post_r['differing']:
                raise ExportError(
                    f'{checkpoint}: the in-graph post-processing differs '
                    'from mmdet\'s predict_by_feat on the same head outputs: '
                    + describe_comparison(post_r, 'post-processing') +
                    f'; {output} not written')
            total = max(1, pred_r['detections'] +
                        pred_r['reference_detections'])
            if pred_r['unmatched'] / total > max_differing:
                raise ExportError(
                    f'{checkpoint}: onnxruntime detections differ from '
                    'mmdet\'s predict beyond float32 noise: ' +
                    describe_comparison(pred_r, 'vs predict') +
                    f' (more than {max_differing:.0%} of detections); '
                    f'{output} not written')
            meta = dict(settings, img_shape_input=img_shape_input,
                        config=osp.basename(config_path),
                        checkpoint=osp.basename(checkpoint))
            keep_outputs(full, tmp, ['dets', 'labels'],
                         {METADATA_KEY: json.dumps(meta)})
        check_onnx(tmp)
        report['ops'] = op_histogram(tmp)
        final = runtime.make_session(tmp, threads)
        tag, x, shapes = batches[-1]
        got = runtime.run(final, feeds(x, shapes))
        again = runtime.run(session, feeds(x, shapes))
        if not (np.array_equal(got[0], again[0])
                and np.array_equal(got[1], again[1])):
            raise ExportError(f'{output}: the written graph gives other '
                              'detections than the verified one; not '
                              'written')
        if bench:  # a test-set image, else the traced shape
            tag, x, shapes = batches[-1] if x_data is not None else \
                batches[0]
            xb = x[:1]
            xd, hw = xb.to(device), tuple(xb.shape[2:])
            metas = [m.to(device) for m in make_samples(
                (shapes[:1] if img_shape_input else [hw]), hw)]
            f = feeds(xb, shapes[:1])
            report['bench'] = _bench(
                dict(pytorch=lambda: model.predict(xd, metas, rescale=False),
                     onnxruntime=lambda: runtime.run(final, f)),
                repeats, warmup, xd, tuple(xb.shape))
            report['bench']['input'] = ('random input' if tag.startswith(
                'random') else 'test-set image')

    write_output(output, write)
    report['size'] = osp.getsize(output)
    return report
