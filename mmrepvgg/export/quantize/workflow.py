"""From a config and a checkpoint to a verified INT8 graph (behind
``tools/deployment/quantize.py``): export the fused model, calibrate on real
images, quantize (onnxruntime's quantizer, or NNCF with optional accuracy
control: :mod:`.nncf_ptq`), compare with FP32 on other real images,
write."""
import json
import os.path as osp
import shutil
from pathlib import Path
from typing import Optional, Sequence, Tuple

from mmrepvgg.utils.fileio import (atomic_write_all, check_output_paths,
                                   scratch_dir)
from .analysis import compare_sessions, detection_agreement, layer_errors
from .calibration import (QuantizeError, as_feeds, build_preprocessor,
                          preprocessed_images, split_dataset_cfg)
from .static import (QuantConfig, graph_inputs, load, optimized_op_types,
                     quantize_onnx)

#: Calibration images when ``--calib-images`` is not given (all the split's
#: images when it has fewer).
DEFAULT_CALIB_IMAGES = 64
#: Real images the INT8 graph is verified on.
DEFAULT_VERIFY_IMAGES = 8
#: A quantized tensor below this SQNR against FP32 fails the verification.
DEFAULT_MIN_SQNR = 10.0
#: The quantizers of ``--backend``.
BACKENDS = ('onnxruntime', 'nncf')


def _check_args(cfg, config_path: str, checkpoint: str,
                outputs: Sequence[Tuple[str, Optional[str], str]],
                splits: Sequence[str], calib_images: Optional[int],
                verify_images: int, min_sqnr: float, bench: int) -> None:
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
    if min_sqnr != min_sqnr:  # NaN
        raise QuantizeError('--min-sqnr must be a number')
    if bench < 0:
        raise QuantizeError(f'--bench must be >= 0, got {bench}')
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise QuantizeError(f'needs onnx and onnxruntime ({e}); pip install '
                            '-e .[onnx]') from None


def _check_backend(backend: str, config: Optional[QuantConfig],
                   max_drop: Optional[float], ac_images: Optional[int],
                   max_iterations: Optional[int],
                   backbone_only: bool) -> None:
    """Refuse options that do not apply to ``backend``, before any work."""
    if backend not in BACKENDS:
        raise QuantizeError(f'--backend {backend!r}: choose from '
                            f'{", ".join(BACKENDS)}')
    nncf_only = [flag for flag, value in (
        ('--max-drop', max_drop), ('--ac-images', ac_images),
        ('--max-iterations', max_iterations)) if value is not None]
    if backend != 'nncf' and nncf_only:
        raise QuantizeError(f'{" ".join(nncf_only)}: needs --backend nncf')
    if backend == 'nncf' and config is not None and config != QuantConfig():
        raise QuantizeError('--format, --activation-type, --weight-type, '
                            '--per-tensor, --reduce-range, '
                            '--symmetric-activations and --calibration '
                            'apply to --backend onnxruntime')
    if max_drop is None and (ac_images is not None
                             or max_iterations is not None):
        raise QuantizeError('--ac-images and --max-iterations need '
                            '--max-drop')
    if max_drop is not None and backbone_only:
        raise QuantizeError('--max-drop measures the detector\'s mAP: not '
                            'with --backbone-only')
    if max_drop is not None and not max_drop >= 0:
        raise QuantizeError(f'--max-drop must be >= 0 (an absolute mAP '
                            f'drop), got {max_drop}')
    for flag, value in (('--ac-images', ac_images),
                        ('--max-iterations', max_iterations)):
        if value is not None and value < 1:
            raise QuantizeError(f'{flag} must be >= 1, got {value}')
    if backend == 'nncf':
        try:
            import nncf  # noqa: F401
        except ImportError as e:
            raise QuantizeError(f'--backend nncf needs nncf ({e}); pip '
                                'install -e ".[openvino]"') from None


def time_sessions(paths, feed, repeats: int, warmup: int = 2,
                  threads: Optional[int] = None) -> dict:
    """Latency of onnxruntime graphs (name -> ``.onnx``) on one input
    (array or feed dict), timed side by side by
    :func:`mmrepvgg.utils.timing.measure`.

    Returns:
        dict: ``timing`` (:class:`~mmrepvgg.utils.timing.Timing`) and
        ``shape`` (of the image input).
    """
    from mmrepvgg.utils.timing import measure
    from ..runtime import input_names, make_session
    fns = {}
    for name, path in paths.items():
        sess = make_session(path, threads)
        (f, ) = as_feeds([feed], input_names(sess))
        fns[name] = (lambda s=sess, f=f: s.run(None, f))
    shape = tuple(next(iter(f.values())).shape)
    return dict(timing=measure(fns, repeats, warmup, threads=threads),
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
                        layers_json: Optional[str] = None,
                        backend: str = 'onnxruntime',
                        max_drop: Optional[float] = None,
                        ac_images: Optional[int] = None,
                        max_iterations: Optional[int] = None) -> dict:
    """Export the fused model of a config + checkpoint, quantize it to INT8
    on real images, verify it against the FP32 graph and write it.

    The FP32 graph comes from :func:`..onnx_export.export_onnx` (mode
    ``backbone`` or ``end2end``, verified against PyTorch there); the INT8
    graph has the same inputs and outputs, so whatever evaluates the FP32
    file evaluates the INT8 one.

    Args:
        cfg (Config): the model config (training or deploy twin).
        config_path (str): its path, for messages.
        checkpoint (str): training-form or deploy checkpoint.
        output (str): the INT8 ``.onnx`` file.
        backbone_only (bool): the backbone alone; otherwise the end-to-end
            detector graph, its post-processing left in float.
        img_shape_input (bool): end-to-end graph with the ``img_shape``
            input.
        calib_images (int, optional): calibration images of ``calib_split``
            (evenly spread; all when ``None`` or more than it holds).
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
        unsafe_load (bool): unpickle the checkpoint freely.
        layers (bool): also measure :func:`~.analysis.layer_errors`.
        bench (int): time FP32 vs INT8 with this many rounds (0: none).
        fp32_output (str, optional): also write the FP32 graph there.
        layers_json (str, optional): also write the per-layer rows there as
            JSON (implies ``layers``).
        backend (str): ``onnxruntime`` (:func:`.static.quantize_onnx`,
            ``config``) or ``nncf`` (:func:`.nncf_ptq.quantize_nncf`).
        max_drop (float, optional): nncf: accuracy control, the largest
            bbox mAP drop on ``verify_split`` (detector graphs only).
        ac_images (int, optional): images of ``verify_split`` the accuracy
            control evaluates on (all when None).
        max_iterations (int, optional): accuracy-control iterations at most
            (default :data:`.nncf_ptq.DEFAULT_MAX_ITERATIONS`).

    Every output is checked against every input and the other outputs
    first and written only at the very end, all or none (``output`` last);
    intermediate graphs live in a private scratch folder.

    Returns:
        dict: what was done and measured (printed by
        ``tools/deployment/quantize.py``).

    Raises:
        QuantizeError / ExportError: bad arguments, unreadable data, a
            failed verification; nothing is written then.
    """
    from ..onnx_export import export_onnx, op_histogram
    _check_backend(backend, config, max_drop, ac_images, max_iterations,
                   backbone_only)
    config = (config or QuantConfig()).validate()
    _check_args(
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
        fp32, int8 = osp.join(tmp, 'fp32.onnx'), osp.join(tmp, 'int8.onnx')
        exp = export_onnx(cfg, config_path, checkpoint, fp32,
                          mode='backbone' if backbone_only else 'end2end',
                          img_shape_input=img_shape_input,
                          shape=tuple(calib[0]['input'].shape[2:]),
                          threads=threads, unsafe_load=unsafe_load)
        report = dict(checkpoint_form=exp.checkpoint_form,
                      blocks=exp.blocks, exported=exp.exported,
                      output=output, config=config.describe(),
                      calibration=calib_info, verification=verify_info,
                      inputs=graph_inputs(fp32))
        if exp.postprocess:
            report['postprocess'] = exp.postprocess
        if backend == 'nncf':
            from .nncf_ptq import (DEFAULT_MAX_ITERATIONS,
                                   DetectionValidator, quantize_nncf)
            validator = None if max_drop is None else DetectionValidator(
                cfg, verify_split, ac_images, tmp, threads)
            qinfo = quantize_nncf(fp32, int8, calib, max_drop, validator,
                                  max_iterations or DEFAULT_MAX_ITERATIONS)
            if 'accuracy' in qinfo:
                report['accuracy'] = qinfo['accuracy']
        else:
            qinfo = quantize_onnx(fp32, int8, calib, config)
        report.update(backend=backend, config=qinfo['config'],
                      quantized=qinfo['quantized'],
                      excluded=qinfo['excluded'],
                      excluded_ops=dict(qinfo['excluded_ops']),
                      boundary=qinfo['boundary'])
        detector = {'dets', 'labels'} <= {
            o.name for o in load(fp32).graph.output}
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
        report['size'] = osp.getsize(int8)
        if layers:
            report['layers'] = layer_errors(fp32, int8, verify, threads)
        if bench:
            report['bench'] = time_sessions(dict(fp32=fp32, int8=int8),
                                            verify[0], bench,
                                            threads=threads)
        writes = []
        if fp32_output is not None:
            writes.append((fp32_output, lambda t: shutil.copyfile(fp32, t)))
        if layers_json is not None:
            rows = json.dumps(report['layers'], indent=1)
            writes.append((layers_json, lambda t: Path(t).write_text(
                rows, encoding='utf-8')))
        writes.append((output, lambda t: shutil.copyfile(int8, t)))
        atomic_write_all(writes)
    return report
