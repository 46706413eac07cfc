"""ONNX export of deployed (fused) RepVGG models behind
``tools/deployment/export_onnx.py``.

What is exported (:attr:`ExportOptions.mode`)
    * ``'backbone'``: the backbone alone (``model.backbone``, or the model
      itself when the config's model *is* a backbone); outputs ``feat0 ...``.
    * ``'raw'``: a single-stage detector's tensor forward
      ``bbox_head(extract_feat(x))`` (no decoding, no NMS), flattened to
      ``out{i}_{level}`` (``out0_*`` class scores, ``out1_*`` box
      regressions, ``out2_*`` score factors if any).
    * ``'end2end'``: a single-stage detector with mmdet's post-processing in
      the graph (:mod:`.postprocess`): outputs ``dets`` (N, K, 5: x1, y1,
      x2, y2, score) and ``labels`` (N, K), K = ``test_cfg.max_per_img``,
      padded with zero rows and label -1 (mmdeploy's layout). With
      ``img_shape_input`` a second input ``img_shape`` (N, 2: each image's
      valid h, w in the padded batch) bounds the box clipping as mmdet's
      ``img_shape`` does; without it boxes are clipped to the input size.
    * two-stage detectors are refused: their RoI head needs proposals
      selected by post-processing (export the backbone).

    The input ``input`` is the preprocessed batch (normalized and padded as
    mmdet's ``DetDataPreprocessor`` makes it), float32 NCHW; batch, height
    and width are dynamic in every mode.

How (:func:`export_onnx`, in named steps)
    :func:`check_request` refuses bad options before any weights load;
    :func:`prepare` picks the module to trace and the verification inputs;
    :func:`build_graph` traces it (:mod:`.graph`); :func:`verify_graph`
    runs onnxruntime on random inputs of two batch and spatial sizes (plus
    test-set images when the config's data is there) and compares with
    PyTorch (:mod:`.verify`); :func:`write_graph` writes OUTPUT only if
    every check passed (atomically); :func:`bench_graph` optionally times
    onnxruntime against PyTorch. Intermediate files live in a private
    :func:`~mmrepvgg.utils.fileio.scratch_dir`, never in OUTPUT's folder.
"""
import json
import os
import os.path as osp
import shutil
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from mmrepvgg.apis.convert import MAX_SIDE, test_input_shape
from mmrepvgg.deploy.verify import NOISE_FACTOR, describe
from mmrepvgg.utils.fileio import (atomic_write, check_output_paths,
                                   scratch_dir)
from . import runtime
from .evaluate import MAX_BATCH
from .graph import (DEFAULT_OPSET, TensorForward, check_onnx, export_target,
                    export_to, fusion_leftovers, is_single_stage,
                    keep_outputs, max_torchscript_opset, not_single_stage,
                    op_histogram, parts, verify_shapes)
from .loading import ExportError, load_deploy_model
from .postprocess import (METADATA_KEY, End2EndDetector, PostProcessError,
                          check_head, check_test_cfg, describe_settings)
from .verify import (SCORE_TOL, TruthAndReference, box_tolerance,
                     compare_detections, dataset_batch, describe_comparison,
                     judge_raw, make_samples, merge_comparisons,
                     merge_verdicts, mmdet_postprocess, mmdet_predict,
                     split_dets)

#: Export modes.
MODES = ('backbone', 'raw', 'end2end')
#: Free bytes below which a failed write counts as a full file system.
FULL_DISK_BYTES = 2**20


@dataclass
class ExportOptions:
    """How :func:`export_onnx` exports, verifies and times.

    Args:
        mode (str): ``'backbone'``, ``'raw'`` or ``'end2end'``.
        img_shape_input (bool): end2end: add the ``img_shape`` input.
        shape (tuple, optional): traced and verified (H, W); default the
            config's test resize.
        opset (int): ONNX opset.
        device (str): device of the PyTorch model in verification/timing.
        tolerance (float, optional): fixed relative bound for the raw
            tensors instead of the float32-noise criterion.
        noise_factor (float): the noise criterion's factor.
        box_tol (float, optional): pixels within which two detections'
            coordinates count as equal (default :func:`~.verify.
            box_tolerance` of the input size).
        score_tol (float): likewise for scores.
        max_differing (float): end2end: largest fraction of detections that
            may differ from mmdet's float32 ``predict`` (float32 noise moves
            scores across ``score_thr`` or IoUs across the NMS threshold);
            the post-processing must match mmdet exactly on onnxruntime's
            own head outputs.
        verify_images (int): also verify on this many test-set images when
            the config's dataset is readable (0: random inputs only).
        unsafe_load (bool): unpickle the checkpoint freely.
        bench (bool): time onnxruntime vs PyTorch on the same input.
        repeats (int): timed rounds of ``bench``.
        warmup (int): untimed rounds of ``bench``.
        threads (int, optional): onnxruntime intra-op threads.
        runtime (str): what runs the graph in verification and ``bench``:
            ``onnxruntime`` or ``openvino`` (float32).
    """
    mode: str = 'raw'
    img_shape_input: bool = False
    shape: Optional[Tuple[int, int]] = None
    opset: int = DEFAULT_OPSET
    device: str = 'cpu'
    tolerance: Optional[float] = None
    noise_factor: float = NOISE_FACTOR
    box_tol: Optional[float] = None
    score_tol: float = SCORE_TOL
    max_differing: float = 0.05
    verify_images: int = 4
    unsafe_load: bool = False
    bench: bool = False
    repeats: int = 20
    warmup: int = 3
    threads: Optional[int] = None
    runtime: str = 'onnxruntime'


@dataclass
class ExportReport:
    """What :func:`export_onnx` did and measured (printed by
    ``tools/deployment/export_onnx.py``).

    ``batches`` names the verified inputs; ``verdict`` is the raw tensors'
    :func:`~.verify.merge_verdicts`; the end2end fields (``settings`` ...
    ``predict_check``) stay empty in the other modes; ``bench`` holds
    ``timing`` (:class:`~mmrepvgg.utils.timing.Timing` of the forms
    ``pytorch`` and the runtime's name), ``shape`` and ``input``.
    """
    output: str
    mode: str
    opset: int
    shape: Tuple[int, int]
    checkpoint_form: str
    blocks: int
    threads: Optional[int] = None
    runtime: str = 'onnxruntime'
    exported: str = ''
    batches: List[str] = field(default_factory=list)
    verdict: dict = field(default_factory=dict)
    raw_tensors: int = 0
    ops: Counter = field(default_factory=Counter)
    size: int = 0
    leftovers: Optional[Dict[str, int]] = None
    inputs: List[str] = field(default_factory=lambda: ['input'])
    settings: Optional[dict] = None
    postprocess: str = ''
    box_tol: float = 0.0
    score_tol: float = SCORE_TOL
    dataset_note: str = ''
    postprocess_check: Optional[dict] = None
    predict_check: Optional[dict] = None
    bench: Optional[dict] = None


# ------------------------------------------------------------ step: check
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
    if isinstance(cls, type) and is_detector and not is_single_stage(cls):
        raise not_single_stage(config_path, cls.__name__)
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


def check_request(cfg: Config, config_path: str, checkpoint: str,
                  output: str, opts: ExportOptions) -> Tuple[int, int]:
    """Refuse bad options and files before any work (one line naming the
    option or file); returns the (H, W) to trace."""
    try:
        import onnx  # noqa: F401  (fail early with the install hint)
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f'{e.name} is not installed: pip install -e '
                          '".[onnx]"') from None
    if opts.mode not in MODES:
        raise ExportError(f'unknown export mode {opts.mode!r} '
                          f'({", ".join(MODES)})')
    if not output.endswith('.onnx'):
        raise ExportError(f'{output}: OUTPUT must end with .onnx')
    check_output_paths([(checkpoint, 'input checkpoint'),
                        (config_path, 'input config')], [output], ExportError)
    max_opset = max_torchscript_opset()
    low = 11 if opts.mode == 'end2end' else 7
    if not low <= opts.opset <= max_opset:
        raise ExportError(f'--opset {opts.opset}: the TorchScript exporter '
                          f'supports opsets {low}..{max_opset} here')
    if opts.tolerance is not None and not opts.tolerance >= 0:
        raise ExportError(f'--tolerance must be >= 0, got {opts.tolerance}')
    if not opts.noise_factor > 0:
        raise ExportError(f'--noise-factor must be > 0, got '
                          f'{opts.noise_factor}')
    if not ((opts.box_tol is None or opts.box_tol >= 0)
            and opts.score_tol >= 0):
        raise ExportError('--box-tol and --score-tol must be >= 0')
    if opts.device != 'cpu' and not (opts.device.startswith('cuda')
                                     and torch.cuda.is_available()):
        raise ExportError(f'--device {opts.device}: not available (cpu or an '
                          'available cuda device)')
    if not 0 <= opts.max_differing <= 1:
        raise ExportError(f'--max-differing must be in [0, 1], got '
                          f'{opts.max_differing}')
    if not 0 <= opts.verify_images <= MAX_BATCH:
        raise ExportError(f'--verify-images must be in [0, {MAX_BATCH}] (one '
                          f'batch), got {opts.verify_images}')
    if opts.repeats < 1 or opts.warmup < 0:
        raise ExportError('--repeats must be >= 1 and --warmup >= 0')
    shape = opts.shape
    if shape is not None and not (len(shape) == 2 and all(
            isinstance(v, int) and 1 <= v <= MAX_SIDE for v in shape)):
        raise ExportError(f'--shape must be two integers in [1, {MAX_SIDE}],'
                          f' got {list(shape)}')
    if not shape:
        shape = test_input_shape(cfg)
        if not all(1 <= v <= MAX_SIDE for v in shape):
            raise ExportError(f'{config_path}: test resize {shape[0]}x'
                              f'{shape[1]} is beyond [1, {MAX_SIDE}]: give '
                              '--shape')
    check_exportable(cfg, opts.mode, config_path)
    return tuple(shape)


# ------------------------------------------------------------ the graph
class _Graph:
    """What :func:`build_graph` made: the exported module, the PyTorch
    network its raw outputs are judged against, the verification batches
    ``(tag, x, img_shapes)`` and the graph file's output layout."""

    def __init__(self, net: nn.Module, raw_net: nn.Module,
                 batches: list, img_shape_input: bool, detections: bool):
        self.net, self.raw_net, self.batches = net, raw_net, batches
        self.img_shape_input, self.detections = img_shape_input, detections
        self.path = self.session = None
        self.raw_names: List[str] = []

    def feed(self, x: torch.Tensor, shapes) -> Dict[str, np.ndarray]:
        f = dict(input=x.numpy())
        if self.img_shape_input:
            f['img_shape'] = np.asarray(shapes, np.int64)
        return f


def _random_batches(shape: Tuple[int, int], img_shape_input: bool) -> list:
    batches = []
    for seed, (b, (h, w)) in enumerate(verify_shapes(shape)):
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(
            seed))
        shapes = [(h, w)] * b
        if img_shape_input and b > 1:  # a padded image: clipped to its shape
            shapes[-1] = (h - h // 4, w - w // 8)
        batches.append(('x'.join(map(str, x.shape)), x, shapes))
    return batches


def prepare(model: nn.Module, cfg: Config, config_path: str,
            opts: ExportOptions, shape: Tuple[int, int],
            report: ExportReport) -> _Graph:
    """The module to export and the verification batches of ``opts.mode``
    (the end2end graph also outputs the raw head tensors, for checking)."""
    batches = _random_batches(shape, opts.img_shape_input)
    if opts.mode != 'end2end':
        net, report.exported = export_target(model, opts.mode, config_path)
        return _Graph(net.eval(), net, batches, False, False)
    if not is_single_stage(model):
        raise not_single_stage(config_path, type(model).__name__)
    try:
        check_head(model.bbox_head)
    except PostProcessError as e:
        raise ExportError(f'{config_path}: cannot put the post-processing '
                          f'in the graph: {e}') from None
    net = End2EndDetector(model, with_img_shape=opts.img_shape_input,
                          with_raw=True).eval()
    report.settings = net.postprocess.settings
    report.postprocess = describe_settings(report.settings)
    report.exported = (f'{type(model).__name__} ({parts(model)} + '
                       'post-processing, end to end)')
    report.inputs = ['input'] + (['img_shape'] if opts.img_shape_input
                                 else [])
    report.score_tol = opts.score_tol
    batches = [(f'random {t}', x, s) for t, x, s in batches]
    x, samples, report.dataset_note = dataset_batch(cfg, model,
                                                    opts.verify_images)
    if x is not None:
        tag = f'{report.dataset_note} {"x".join(map(str, x.shape))}'
        batches.append((tag, x, [tuple(s.img_shape) for s in samples]))
    return _Graph(net, TensorForward(model, 'single_stage').eval(), batches,
                  opts.img_shape_input, True)


def build_graph(graph: _Graph, path: str, opts: ExportOptions) -> None:
    """Trace ``graph.net`` on the first batch into ``path`` (on CPU: the
    graph does not depend on the device), check it with ``onnx.checker``
    and open it with onnxruntime."""
    _, x, shapes = graph.batches[0]
    if graph.detections:
        graph.raw_names = graph.net.raw_names(x)
        extra = [('img_shape', torch.as_tensor(np.asarray(
            shapes, np.int64)))] if graph.img_shape_input else []
        export_to(graph.net, x, path, opts.opset, extra_inputs=extra,
                  output_names=['dets', 'labels'] + graph.raw_names)
    else:
        graph.raw_names = export_to(graph.net, x, path, opts.opset)
    check_onnx(path)
    graph.path = path
    graph.session = runtime.make_session(path, opts.threads,
                                         runtime=opts.runtime)


# ----------------------------------------------------------- step: verify
def verify_graph(graph: _Graph, model: nn.Module, opts: ExportOptions,
                 checkpoint: str, output: str,
                 report: ExportReport) -> None:
    """onnxruntime against PyTorch on every batch: the raw tensors by the
    float32-noise criterion; end2end also the detections, against mmdet's
    ``predict_by_feat`` on onnxruntime's own head outputs (must match) and
    against mmdet's ``predict`` (at most ``max_differing`` may differ).

    Raises:
        ExportError: naming ``checkpoint``; ``output`` is not written.
    """
    graph.raw_net.to(opts.device)
    model.to(opts.device)
    truth_and_ref = TruthAndReference(graph.raw_net)
    judge = dict(factor=opts.noise_factor, tolerance=opts.tolerance)
    verdicts, post, pred, first = [], [], [], 0
    levels = len(model.bbox_head.prior_generator.strides) \
        if graph.detections else 0
    for tag, x, shapes in graph.batches:
        out = runtime.run(graph.session, graph.feed(x, shapes))
        xd = x.to(opts.device)
        truth, ref = truth_and_ref(xd)
        raw = out[2:] if graph.detections else out
        verdicts.append(judge_raw(truth, ref, raw, graph.raw_names,
                                  tag.split()[-1], **judge))
        if graph.detections:
            hw = tuple(x.shape[2:])
            tol = box_tolerance(hw, opts.box_tol)
            report.box_tol = max(report.box_tol, tol)
            # mmdet clips to img_shape: the input size unless the graph has
            # the img_shape input
            metas = make_samples(shapes if graph.img_shape_input else
                                 [hw] * x.shape[0], hw)
            ours = split_dets(out[0], out[1])
            post.append(compare_detections(
                ours, mmdet_postprocess(model.bbox_head, raw, levels, metas),
                tol, opts.score_tol, first))
            pred.append(compare_detections(
                ours, mmdet_predict(model, xd, [m.to(opts.device)
                                                for m in metas]),
                tol, opts.score_tol, first))
            first += x.shape[0]
    report.batches = [b[0] for b in graph.batches]
    report.verdict = merge_verdicts(verdicts)
    report.raw_tensors = len(graph.raw_names)
    if not report.verdict['passed']:
        text = describe(report.verdict, candidate=opts.runtime,
                        reference='PyTorch')
        raise ExportError(f'{checkpoint}: {opts.runtime} outputs differ from '
                          f'PyTorch: {text}; {output} not written')
    if graph.detections:
        _judge_detections(merge_comparisons(post), merge_comparisons(pred),
                          opts, checkpoint, output, report)


def _judge_detections(post: dict, pred: dict, opts: ExportOptions,
                      checkpoint: str, output: str,
                      report: ExportReport) -> None:
    report.postprocess_check, report.predict_check = post, pred
    if not (post['finite'] and pred['finite']):
        raise ExportError(f'{checkpoint}: {opts.runtime} detections are not '
                          f'finite; {output} not written')
    if post['differing']:
        raise ExportError(
            f'{checkpoint}: the in-graph post-processing differs from '
            'mmdet\'s predict_by_feat on the same head outputs: ' +
            describe_comparison(post, 'post-processing') +
            f'; {output} not written')
    total = max(1, pred['detections'] + pred['reference_detections'])
    if pred['unmatched'] / total > opts.max_differing:
        raise ExportError(
            f'{checkpoint}: {opts.runtime} detections differ from mmdet\'s '
            'predict beyond float32 noise: ' +
            describe_comparison(pred, 'vs predict') +
            f' (more than {opts.max_differing:.0%} of detections); '
            f'{output} not written')


# ------------------------------------------------------------ step: write
def write_graph(graph: _Graph, tmp: str, output: str, metadata: dict,
                threads: Optional[int] = None,
                engine: str = 'onnxruntime') -> None:
    """Write the verified graph to ``tmp`` (renamed to ``output`` by
    :func:`write_output`): end2end keeps only ``dets`` and ``labels`` and
    stores the post-processing ``metadata``, then the written graph must
    give the verified graph's detections (and is the one timed)."""
    if not graph.detections:
        shutil.copyfile(graph.path, tmp)
        check_onnx(tmp)
        return
    keep_outputs(graph.path, tmp, ['dets', 'labels'],
                 {METADATA_KEY: json.dumps(metadata)})
    check_onnx(tmp)
    _, x, shapes = graph.batches[-1]
    feed = graph.feed(x, shapes)
    final = runtime.make_session(tmp, threads, runtime=engine)
    got, again = runtime.run(final, feed), runtime.run(graph.session, feed)
    if not (np.array_equal(got[0], again[0])
            and np.array_equal(got[1], again[1])):
        raise ExportError(f'{output}: the written graph gives other '
                          'detections than the verified one; not written')
    graph.session = final


def write_output(output: str, write: Callable[[str], None]) -> None:
    """:func:`~mmrepvgg.utils.fileio.atomic_write` of ``output``, a failure
    of the file system one line naming ``output``: an ``OSError`` (full
    disk, quota, file size limit, read-only folder), or any error raised
    while fewer than :data:`FULL_DISK_BYTES` are free there (onnx and
    onnxruntime report a failed write or a truncated file from C++, without
    an errno)."""

    def failure(e: Exception, path: str) -> Optional[ExportError]:
        try:
            st = os.statvfs(osp.dirname(osp.abspath(path)))
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = FULL_DISK_BYTES
        if free < FULL_DISK_BYTES:
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


# ------------------------------------------------------------ step: bench
def bench_graph(graph: _Graph, model: nn.Module,
                opts: ExportOptions) -> dict:
    """Time onnxruntime against PyTorch on one input (end2end: a test-set
    image if there is one; PyTorch then includes mmdet's post-processing),
    side by side (:func:`mmrepvgg.utils.timing.measure`)."""
    from mmrepvgg.utils.timing import measure
    tag, x, shapes = graph.batches[-1] if graph.detections else \
        graph.batches[0]
    x = x[:1]
    xd, hw = x.to(opts.device), tuple(x.shape[2:])
    feed = graph.feed(x, shapes[:1])
    if graph.detections:
        metas = [m.to(opts.device) for m in make_samples(
            shapes[:1] if graph.img_shape_input else [hw], hw)]
        fns = dict(pytorch=lambda: model.predict(xd, metas, rescale=False))
    else:
        fns = dict(pytorch=lambda: graph.net(xd))
    fns[opts.runtime] = lambda: runtime.run(graph.session, feed)
    sync = torch.cuda.synchronize if xd.is_cuda else None
    with torch.inference_mode():
        timing = measure(fns, opts.repeats, opts.warmup, sync=sync,
                         threads=opts.threads)
    dataset = graph.detections and not tag.startswith('random')
    return dict(timing=timing, shape=tuple(x.shape),
                input='test-set image' if dataset else 'random input')


# ----------------------------------------------------------------- workflow
def export_onnx(cfg: Config,
                config_path: str,
                checkpoint: str,
                output: str,
                options: Optional[ExportOptions] = None,
                **overrides) -> ExportReport:
    """Export, verify, write and (optionally) time; OUTPUT is written only
    after every check passed (a temporary in its folder, renamed).

    Args:
        cfg (Config): the model config (training or deploy form).
        config_path (str): its file, for messages.
        checkpoint (str): training-form or deploy checkpoint.
        output (str): the ``.onnx`` file to write.
        options (ExportOptions, optional): how; ``overrides`` replace its
            fields (``export_onnx(..., mode='end2end')``).

    Raises:
        ExportError: one-line message naming the file/argument at fault.
    """
    opts = replace(options or ExportOptions(), **overrides)
    runtime.check_runtime(opts.runtime)
    shape = check_request(cfg, config_path, checkpoint, output, opts)
    model, info = load_deploy_model(cfg, config_path, checkpoint,
                                    opts.unsafe_load)
    report = ExportReport(output=output, mode=opts.mode, opset=opts.opset,
                          shape=shape, threads=opts.threads,
                          runtime=opts.runtime, **info)
    graph = prepare(model, cfg, config_path, opts, shape, report)
    metadata = dict(report.settings or {},
                    img_shape_input=opts.img_shape_input,
                    config=osp.basename(config_path),
                    checkpoint=osp.basename(checkpoint))

    def write(tmp: str) -> None:
        with scratch_dir('mmrepvgg-export') as work:
            build_graph(graph, osp.join(work, 'verify.onnx'), opts)
            verify_graph(graph, model, opts, checkpoint, output, report)
            write_graph(graph, tmp, output, metadata, opts.threads,
                        opts.runtime)
            report.ops = op_histogram(tmp)
            if opts.bench:
                report.bench = bench_graph(graph, model, opts)

    write_output(output, write)
    report.size = osp.getsize(output)
    if opts.mode == 'backbone':
        report.leftovers = fusion_leftovers(report.ops)
    return report
