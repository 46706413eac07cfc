"""The export workflow behind ``tools/deployment/export_onnx.py``: modes
``backbone`` (outputs ``feat0 ...``), ``raw`` (a single-stage detector's
head outputs) and ``end2end`` (mmdet's post-processing in the graph, outputs
``dets`` and ``labels``), dynamic batch, height and width; named steps, and
OUTPUT written atomically only after every check passed.
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

from mmrepvgg.apis.convert import MAX_SIDE, check_options, test_input_shape
from mmrepvgg.deploy.verify import NOISE_FACTOR, describe, judge_fp32
from mmrepvgg.utils.fileio import (atomic_write, check_output_paths,
                                   scratch_dir)
from . import runtime
from .graph import (DEFAULT_OPSET, TensorForward, check_onnx, export_to,
                    fusion_leftovers, keep_outputs, max_torchscript_opset,
                    op_histogram, parts)
from .loading import ExportError, load_deploy_model
from .postprocess import (METADATA_KEY, End2EndDetector, PostProcessError,
                          check_test_cfg, describe_settings)
from .verify import (SCORE_TOL, TruthAndReference, box_tolerance,
                     compare_detections, dataset_batch, describe_comparison,
                     make_samples, mmdet_postprocess, mmdet_predict,
                     raw_groups, split_dets)

MODES = ('backbone', 'raw', 'end2end')
#: The one batch of ``--verify-images``, at most.
MAX_BATCH = 64
#: end2end: largest fraction of detections that may differ from mmdet's
#: float32 ``predict`` (float32 noise moves scores across ``score_thr``).
MAX_DIFFERING = 0.05
#: Free bytes below which a failed write counts as a full file system.
FULL_DISK_BYTES = 2**20


@dataclass
class ExportOptions:
    """How :func:`export_onnx` exports, verifies and times (the options of
    ``tools/deployment/export_onnx.py``)."""
    mode: str = 'raw'
    img_shape_input: bool = False
    shape: Optional[Tuple[int, int]] = None
    opset: int = DEFAULT_OPSET
    noise_factor: float = NOISE_FACTOR
    verify_images: int = 4
    unsafe_load: bool = False
    bench: int = 0
    threads: Optional[int] = None
    runtime: str = 'onnxruntime'


@dataclass
class ExportReport:
    """What :func:`export_onnx` did and measured; the end2end fields stay
    empty in the other modes."""
    output: str
    opset: int
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
    dataset_note: str = ''
    postprocess_check: Optional[dict] = None
    predict_check: Optional[dict] = None
    bench: Optional[dict] = None


def check_request(cfg: Config, config_path: str, checkpoint: str,
                  output: str, opts: ExportOptions) -> Tuple[int, int]:
    """Refuse bad options, files and models before any weights load (one
    line naming the option or file); returns the (H, W) to trace."""
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
    if not 0 <= opts.verify_images <= MAX_BATCH:
        raise ExportError(f'--verify-images must be in [0, {MAX_BATCH}] (one '
                          f'batch), got {opts.verify_images}')
    if opts.bench < 0:
        raise ExportError(f'--bench must be >= 0, got {opts.bench}')
    # the same bounds as convert_deploy: an infinite --noise-factor would
    # switch the float32-noise check off
    check_options(opts.shape, opts.noise_factor)
    shape = opts.shape
    if not shape:
        shape = test_input_shape(cfg)
        if not all(1 <= v <= MAX_SIDE for v in shape):
            raise ExportError(f'{config_path}: test resize {shape[0]}x'
                              f'{shape[1]} is beyond [1, {MAX_SIDE}]: give '
                              '--shape')
    if opts.mode == 'backbone':
        return tuple(shape)
    from mmdet.models.detectors import SingleStageDetector
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    t = cfg.model.get('type')
    cls = MODELS.get(t) if isinstance(t, str) else t
    is_detector = 'backbone' in cfg.model
    if isinstance(cls, type) and is_detector and not issubclass(
            cls, SingleStageDetector):
        raise ExportError(
            f'{config_path}: {cls.__name__} is not a single-stage detector; '
            'its RoI head needs proposals selected by post-processing (not '
            'exported): use --backbone-only')
    if opts.mode != 'end2end':
        return tuple(shape)
    if not is_detector:
        raise ExportError(f'{config_path}: --postprocess needs a '
                          'single-stage detector config (the model has no '
                          'backbone/head)')
    try:
        check_test_cfg(cfg.model.get('test_cfg'))
    except PostProcessError as e:
        raise ExportError(f'{config_path}: cannot put the '
                          f'post-processing in the graph: {e}') from None
    return tuple(shape)


@dataclass
class _Graph:
    """The exported module, the PyTorch network its raw outputs are judged
    against, the verification batches ``(tag, x, img_shapes)`` and the
    graph file with its session."""
    net: nn.Module
    raw_net: nn.Module
    batches: list
    img_shape_input: bool
    detections: bool
    path: Optional[str] = None
    session: object = None
    raw_names: List[str] = field(default_factory=list)

    def feed(self, x: torch.Tensor, shapes) -> Dict[str, np.ndarray]:
        f = dict(input=x.numpy())
        if self.img_shape_input:
            f['img_shape'] = np.asarray(shapes, np.int64)
        return f


def prepare(model: nn.Module, cfg: Config, config_path: str,
            opts: ExportOptions, shape: Tuple[int, int],
            report: ExportReport) -> _Graph:
    """The module to export and the verification batches of ``opts.mode``
    (the end2end graph also outputs the raw head tensors, for checking):
    batch 1 at ``shape`` and batch 2 at H + 32 (- 32 beyond MAX_SIDE), W -
    32 (at least 32), the dynamic axes exercised."""
    h, w = shape
    sizes = [(1, (h, w)), (2, (h + 32 if h + 32 <= MAX_SIDE else h - 32,
                               max(32, w - 32)))]
    batches = []
    for seed, (b, (h, w)) in enumerate(sizes):
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(
            seed))
        shapes = [(h, w)] * b
        if opts.img_shape_input and b > 1:  # a padded image: clipped to it
            shapes[-1] = (h - h // 4, w - w // 8)
        batches.append(('x'.join(map(str, x.shape)), x, shapes))
    if opts.mode != 'end2end':
        detector = hasattr(model, 'backbone')
        target = model.backbone if detector and opts.mode == 'backbone' \
            else model
        if opts.mode == 'backbone':
            report.exported = f'backbone ({type(target).__name__})'
        elif not detector:
            report.exported = type(model).__name__
        else:  # single-stage: check_request refused the others
            report.exported = (f'{type(model).__name__} ({parts(model)}, raw '
                               'outputs)')
        net = TensorForward(target, 'single_stage' if detector and target
                            is model else 'module').eval()
        return _Graph(net, net, batches, False, False)
    try:
        net = End2EndDetector(model, with_img_shape=opts.img_shape_input,
                              with_raw=True).eval()
    except PostProcessError as e:
        raise ExportError(f'{config_path}: cannot put the post-processing '
                          f'in the graph: {e}') from None
    report.settings = net.postprocess.settings
    report.postprocess = describe_settings(report.settings)
    report.exported = (f'{type(model).__name__} ({parts(model)} + '
                       'post-processing, end to end)')
    report.inputs = ['input'] + (['img_shape'] if opts.img_shape_input
                                 else [])
    batches = [(f'random {t}', x, s) for t, x, s in batches]
    x, samples, report.dataset_note = dataset_batch(cfg, model,
                                                    opts.verify_images)
    if x is not None:
        tag = f'{report.dataset_note} {"x".join(map(str, x.shape))}'
        batches.append((tag, x, [tuple(s.img_shape) for s in samples]))
    return _Graph(net, TensorForward(model, 'single_stage').eval(), batches,
                  opts.img_shape_input, True)


def build_graph(graph: _Graph, path: str, opts: ExportOptions) -> None:
    """Trace ``graph.net`` on the first batch into ``path``, check it with
    ``onnx.checker`` and open it with the runtime."""
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


def verify_graph(graph: _Graph, model: nn.Module, opts: ExportOptions,
                 checkpoint: str, output: str,
                 report: ExportReport) -> None:
    """The runtime against PyTorch on every batch: raw tensors by the
    float32-noise criterion; end2end also the detections, against mmdet's
    ``predict_by_feat`` on the graph's own head outputs (must match) and
    against mmdet's ``predict`` (at most :data:`MAX_DIFFERING` differ)."""
    truth_and_ref = TruthAndReference(graph.raw_net)
    groups, ours, post, pred, tols = ({}, {}, {}), [], [], [], []
    levels = len(model.bbox_head.prior_generator.strides) \
        if graph.detections else 0
    for tag, x, shapes in graph.batches:
        out = runtime.run(graph.session, graph.feed(x, shapes))
        raw = out[2:] if graph.detections else out
        for acc, part in zip(groups, raw_groups(
                *truth_and_ref.named(x), raw, graph.raw_names,
                tag.split()[-1])):
            acc.update(part)
        if graph.detections:
            hw = tuple(x.shape[2:])
            tols += [box_tolerance(hw)] * x.shape[0]
            # mmdet clips to img_shape: the input size unless the graph has
            # the img_shape input
            metas = make_samples(shapes if graph.img_shape_input else
                                 [hw] * x.shape[0], hw)
            ours += split_dets(out[0], out[1])
            post += mmdet_postprocess(model.bbox_head, raw, levels, metas)
            pred += mmdet_predict(model, x, metas)
    report.batches = [b[0] for b in graph.batches]
    report.verdict = judge_fp32(*groups, factor=opts.noise_factor)
    report.raw_tensors = len(graph.raw_names)
    if not report.verdict['passed']:
        text = describe(report.verdict, candidate=opts.runtime,
                        reference='PyTorch')
        raise ExportError(f'{checkpoint}: {opts.runtime} outputs differ from '
                          f'PyTorch: {text}; {output} not written')
    if not graph.detections:
        return
    report.box_tol = max(tols)
    post = compare_detections(ours, post, tols, SCORE_TOL)
    pred = compare_detections(ours, pred, tols, SCORE_TOL)
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
    if pred['unmatched'] / total > MAX_DIFFERING:
        raise ExportError(
            f'{checkpoint}: {opts.runtime} detections differ from mmdet\'s '
            'predict beyond float32 noise: ' +
            describe_comparison(pred, 'vs predict') +
            f' (more than {MAX_DIFFERING:.0%} of detections); '
            f'{output} not written')


def write_graph(graph: _Graph, tmp: str, output: str, metadata: dict,
                opts: ExportOptions) -> None:
    """Write the verified graph to ``tmp`` (end2end: only ``dets`` and
    ``labels``, ``metadata`` stored, the verified graph's detections)."""
    if graph.detections:
        keep_outputs(graph.path, tmp, ['dets', 'labels'],
                     {METADATA_KEY: json.dumps(metadata)})
    else:
        shutil.copyfile(graph.path, tmp)
    check_onnx(tmp)
    if not graph.detections:
        return
    _, x, shapes = graph.batches[-1]
    feed = graph.feed(x, shapes)
    final = runtime.make_session(tmp, opts.threads, runtime=opts.runtime)
    got, again = runtime.run(final, feed), runtime.run(graph.session, feed)
    if not (np.array_equal(got[0], again[0])
            and np.array_equal(got[1], again[1])):
        raise ExportError(f'{output}: the written graph gives other '
                          'detections than the verified one; not written')
    graph.session = final


def write_output(output: str, write: Callable[[str], None]) -> None:
    """:func:`~mmrepvgg.utils.fileio.atomic_write` of ``output``; a failing
    file system (an ``OSError``, or any error while fewer than
    :data:`FULL_DISK_BYTES` are free: onnx fails from C++, without an errno)
    is one line naming ``output``."""

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


def bench_graph(graph: _Graph, model: nn.Module,
                opts: ExportOptions) -> dict:
    """Time the runtime against PyTorch on one input (end2end: a test-set
    image if there is one, PyTorch with mmdet's post-processing)."""
    from mmrepvgg.utils.timing import measure
    tag, x, shapes = graph.batches[-1] if graph.detections else \
        graph.batches[0]
    x, hw = x[:1], tuple(x.shape[2:])
    feed = graph.feed(x, shapes[:1])
    if graph.detections:
        metas = make_samples(shapes[:1] if graph.img_shape_input else [hw],
                             hw)
        fns = dict(pytorch=lambda: model.predict(x, metas, rescale=False))
    else:
        fns = dict(pytorch=lambda: graph.net(x))
    fns[opts.runtime] = lambda: runtime.run(graph.session, feed)
    with torch.inference_mode():
        timing = measure(fns, opts.bench, 3, threads=opts.threads)
    dataset = graph.detections and not tag.startswith('random')
    return dict(timing=timing, shape=tuple(x.shape),
                input='test-set image' if dataset else 'random input')


def export_onnx(cfg: Config,
                config_path: str,
                checkpoint: str,
                output: str,
                options: Optional[ExportOptions] = None,
                **overrides) -> ExportReport:
    """Export, verify, write and (optionally) time; ``overrides`` replace
    fields of ``options``. Raises :class:`ExportError` (one line)."""
    opts = replace(options or ExportOptions(), **overrides)
    runtime.check_runtime(opts.runtime)
    shape = check_request(cfg, config_path, checkpoint, output, opts)
    model, info = load_deploy_model(cfg, config_path, checkpoint,
                                    opts.unsafe_load)
    report = ExportReport(output=output, opset=opts.opset,
                          threads=opts.threads, runtime=opts.runtime, **info)
    graph = prepare(model, cfg, config_path, opts, shape, report)
    metadata = dict(report.settings or {},
                    img_shape_input=opts.img_shape_input,
                    config=osp.basename(config_path),
                    checkpoint=osp.basename(checkpoint))

    def write(tmp: str) -> None:
        with scratch_dir('mmrepvgg-export') as work:
            build_graph(graph, osp.join(work, 'verify.onnx'), opts)
            verify_graph(graph, model, opts, checkpoint, output, report)
            write_graph(graph, tmp, output, metadata, opts)
            report.ops = op_histogram(tmp)
            if opts.bench:
                report.bench = bench_graph(graph, model, opts)

    write_output(output, write)
    report.size = osp.getsize(output)
    if opts.mode == 'backbone':
        report.leftovers = fusion_leftovers(report.ops)
    return report
