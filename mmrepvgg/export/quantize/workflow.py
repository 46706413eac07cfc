"""Config + checkpoint -> verified INT8 graph, behind
``tools/deployment/quantize.py``."""
import json
import os.path as osp
import shutil
from pathlib import Path
from typing import Optional

from mmrepvgg.utils.fileio import (atomic_write_all, check_output_paths,
                                   scratch_dir)
from .analysis import compare_sessions, detection_agreement, layer_errors
from .calibration import (QuantizeError, as_feeds, build_preprocessor,
                          image_feeds, preprocessed, split_dataset_cfg)
from .static import optimized_op_types, quantize_onnx

DEFAULT_CALIB_IMAGES = 64
DEFAULT_VERIFY_IMAGES = 8
#: A quantized tensor below this SQNR (dB) against FP32 fails verification.
DEFAULT_MIN_SQNR = 10.0
BACKENDS = ('onnxruntime', 'nncf')


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
                        weight_type: Optional[str] = None,
                        min_sqnr: float = DEFAULT_MIN_SQNR,
                        threads: Optional[int] = None,
                        unsafe_load: bool = False,
                        layers: bool = False,
                        bench: int = 0,
                        fp32_output: Optional[str] = None,
                        layers_json: Optional[str] = None,
                        backend: str = 'onnxruntime',
                        max_drop: Optional[float] = None) -> dict:
    """``tools/deployment/quantize.py``: export the fused model, quantize
    it on ``calib_images`` of ``calib_split``, verify it against FP32 on
    ``verify_images`` of ``verify_split`` (a quantized tensor below
    ``min_sqnr`` dB raises :class:`QuantizeError`); the outputs, checked
    against every input first, are written together or none. Returns what
    was done and measured."""
    from ..graph import op_histogram
    from ..onnx_export import export_onnx
    from .nncf_ptq import import_nncf
    if backend not in BACKENDS:
        raise QuantizeError(f'--backend {backend!r}: choose from '
                            f'{", ".join(BACKENDS)}')
    if backend != 'nncf' and max_drop is not None:
        raise QuantizeError('--max-drop: needs --backend nncf')
    if backend == 'nncf' and weight_type not in (None, 'int8'):
        raise QuantizeError('--weight-type applies to --backend onnxruntime')
    if max_drop is not None and not max_drop >= 0:
        raise QuantizeError(f'--max-drop must be >= 0 (an absolute mAP '
                            f'drop), got {max_drop}')
    if max_drop is not None and backbone_only:
        raise QuantizeError('--max-drop measures the detector\'s mAP: not '
                            'with --backbone-only')
    if backend == 'nncf':
        import_nncf()
    outputs = [('OUTPUT', output, '.onnx'),
               ('--save-fp32', fp32_output, '.onnx'),
               ('--layers-json', layers_json, '.json')]
    outputs = [(what, p, ext) for what, p, ext in outputs if p is not None]
    for what, path, ext in outputs:
        if not str(path).endswith(ext):
            raise QuantizeError(f'{what} {path}: must be a {ext} file')
    inputs = [(config_path, 'CONFIG'), (checkpoint, 'CHECKPOINT')]
    for split in dict.fromkeys([calib_split, verify_split]):
        ds_cfg = split_dataset_cfg(cfg, split)
        if ds_cfg.get('ann_file'):
            inputs.append((osp.join(ds_cfg.get('data_root') or '',
                                    ds_cfg['ann_file']),
                           f'{split} annotation file'))
    check_output_paths(inputs, [p for _, p, _ in outputs], QuantizeError)
    for flag, value in (('--calib-images', calib_images),
                        ('--verify-images', verify_images)):
        if value is not None and value < 1:
            raise QuantizeError(f'{flag} must be >= 1, got {value}')
    if min_sqnr != min_sqnr:  # NaN
        raise QuantizeError('--min-sqnr must be a number')
    if bench < 0:
        raise QuantizeError(f'--bench must be >= 0, got {bench}')
    preprocessor = build_preprocessor(cfg)
    calib, calib_info = image_feeds(*preprocessed(
        cfg, calib_split, calib_images, preprocessor))
    loaded = preprocessed(cfg, verify_split, verify_images, preprocessor)
    verify, verify_info = image_feeds(*loaded)  # and --max-drop's scoring
    with scratch_dir('mmrepvgg-quantize') as tmp:
        fp32, int8 = osp.join(tmp, 'fp32.onnx'), osp.join(tmp, 'int8.onnx')
        exp = export_onnx(cfg, config_path, checkpoint, fp32,
                          mode='backbone' if backbone_only else 'end2end',
                          img_shape_input=img_shape_input,
                          shape=tuple(calib[0]['input'].shape[2:]),
                          threads=threads, unsafe_load=unsafe_load)
        if backend == 'nncf':
            from .nncf_ptq import DetectionValidator, quantize_nncf
            validator = None if max_drop is None else DetectionValidator(
                cfg, verify_split, verify_images, tmp, threads, loaded)
            q = quantize_nncf(fp32, int8, calib, max_drop, validator)
        else:
            q = quantize_onnx(fp32, int8, calib, weight_type or 'int8')
        report = dict(q, checkpoint_form=exp.checkpoint_form,
                      blocks=exp.blocks, exported=exp.exported,
                      output=output, backend=backend,
                      calibration=calib_info, verification=verify_info)
        if exp.postprocess:
            report['postprocess'] = exp.postprocess
        errors = report['errors'] = compare_sessions(
            fp32, int8, verify, extra_tensors=q['boundary'], threads=threads,
            outputs=backbone_only)  # not dets, labels: their number varies
        if not backbone_only:
            report['detections'] = detection_agreement(fp32, int8, verify,
                                                       threads)
        for name in q['boundary']:
            e = errors[name]
            if not e['sqnr_db'] >= min_sqnr:  # NaN fails too
                raise QuantizeError(
                    f'{checkpoint}: INT8 tensor {name} is too far from FP32 '
                    f'(SQNR {e["sqnr_db"]:.1f} dB < --min-sqnr '
                    f'{min_sqnr:g}, relative error {e["rel_err"]:.3g}); '
                    f'{output} not written')
        report.update(ops_fp32=op_histogram(fp32),
                      runtime_ops=optimized_op_types(int8, threads),
                      size_fp32=osp.getsize(fp32), size=osp.getsize(int8))
        if layers or layers_json is not None:
            report['layers'] = layer_errors(fp32, int8, verify, threads)
        if bench:
            from mmrepvgg.utils.timing import measure

            from ..runtime import input_names, make_session
            fns = {}
            for name, path in (('fp32', fp32), ('int8', int8)):
                sess = make_session(path, threads)
                (feed, ) = as_feeds(verify[:1], input_names(sess))
                fns[name] = (lambda s=sess, f=feed: s.run(None, f))
            report['bench'] = dict(
                timing=measure(fns, bench, 2, threads=threads),
                shape=verify[0]['input'].shape)
        writes = [(fp32_output, lambda t: shutil.copyfile(fp32, t))]
        if layers_json is not None:
            rows = json.dumps(report['layers'], indent=1)
            writes.append((layers_json, lambda t: Path(t).write_text(
                rows, encoding='utf-8')))
        writes.append((output, lambda t: shutil.copyfile(int8, t)))
        atomic_write_all([w for w in writes if w[0] is not None])
    return report
