#!/usr/bin/env python
"""Export a deployed (fused) RepVGG model to ONNX and verify it.

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT OUTPUT.onnx \\
        [--postprocess | --backbone-only]

CHECKPOINT is a training-form or deploy checkpoint. --postprocess puts
mmdet's post-processing in the graph (outputs dets and labels); without it a
single-stage detector exports its raw head outputs. OUTPUT appears only after
the graph was verified against PyTorch; an error is one line and no file.
"""
import importlib.util
import os.path as osp
import runpy

DEFAULT_OPSET = 17


def parse_args(argv=None):
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(
        description='Export a RepVGG model in deploy form to ONNX, verified '
        'with onnxruntime.')
    p.add_argument('config', help='model config (detector or backbone; the '
                   'training config also serves a deploy checkpoint)')
    p.add_argument('checkpoint', help='training-form or deploy checkpoint')
    p.add_argument('output', help='output .onnx file')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--postprocess', action='store_true',
                      help='end-to-end detector: post-processing in the '
                      'graph, outputs dets and labels')
    what.add_argument('--backbone-only', action='store_true',
                      help='export the backbone alone')
    p.add_argument('--img-shape-input', action='store_true',
                   help='--postprocess: second input img_shape (N, 2: valid '
                   'h, w of each image in the padded batch) to clip boxes '
                   'to, as mmdet does (default: clip to the input size)')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help="traced and verified input size (default: the "
                   "config's test resize, 640x640 without one)")
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                   help=f'ONNX opset (default {DEFAULT_OPSET})')
    p.add_argument('--noise-factor', type=float, default=None,
                   help='accept raw outputs whose float32 error against the '
                   'float64 model is at most this many times PyTorch '
                   "float32's own (default 4)")
    p.add_argument('--verify-images', type=int, default=4,
                   help='--postprocess: also verify on this many images of '
                   "the config's test set when it is readable (default 4; "
                   '0: random inputs only)')
    p.add_argument('--bench', type=int, nargs='?', const=20, default=0,
                   metavar='ROUNDS',
                   help='time the runtime vs PyTorch deploy on the same '
                   'input (interleaved, median of ROUNDS, default 20); '
                   "--postprocess: the graph vs PyTorch deploy + mmdet's "
                   'post-processing')
    p.add_argument('--threads', type=int,
                   help='threads of both PyTorch and onnxruntime')
    p.add_argument('--runtime', choices=['onnxruntime', 'openvino'],
                   help='what runs the graph in verification and --bench: '
                   'onnxruntime (default) or OpenVINO (float32, pip install '
                   '-e .[openvino])')
    add_cli_args(p, cfg_options=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def print_report(r) -> None:
    """The :class:`~mmrepvgg.export.onnx_export.ExportReport` as text."""
    from mmrepvgg.export.verify import SCORE_TOL, describe_comparison
    print(f'exported {r.exported} -> {r.output} '
          f'({r.size / 2**20:.2f} MiB, opset {r.opset})')
    print(f'  checkpoint       : {r.checkpoint_form} form, '
          f'{r.blocks} RepVGG block(s)')
    if r.settings:
        k = r.settings['max_per_img']
        print(f'  inputs           : {", ".join(r.inputs)} (dynamic '
              'batch, height, width)')
        print(f'  outputs          : dets (N, {k}, 5), labels (N, {k}); '
              'padding: zero rows, label -1')
        print(f'  test_cfg in graph: {r.postprocess}')
    v = r.verdict
    print(f'  verification     : {r.runtime} vs PyTorch on '
          f'{", ".join(r.batches)}')
    print(f'    raw tensors    : {r.raw_tensors} outputs, error vs '
          f'float64 {v["error"]:.3g}, PyTorch float32 error '
          f'{v["noise"]:.3g} at {v["worst"]} (ratio {v["ratio"]:.2f}; '
          f'criterion: {v["criterion"]})')
    if r.postprocess_check:
        print(f'    detections     : same label, box within '
              f'{r.box_tol:.2g} px, score within {SCORE_TOL:.2g}')
        print('    ' + describe_comparison(
            r.postprocess_check, 'post-processing vs mmdet '
            'predict_by_feat on the same head outputs'))
        print('    ' + describe_comparison(
            r.predict_check, "detections vs mmdet's model.predict "
            '(PyTorch float32)'))
        for img, text in r.predict_check['differing'][1:5]:
            print(f'      image {img}: {text}')
        if not any('test-set' in b for b in r.batches):
            print(f'    (no test-set images: {r.dataset_note})')
    ops = ', '.join(f'{op} {n}' for op, n in r.ops.most_common())
    print(f'  operators        : {ops}')
    if r.leftovers:
        print('  backbone ops     : not only Conv + activation: ' +
              ', '.join(f'{k} {v}' for k, v in r.leftovers.items()))
    elif r.leftovers is not None:
        print('  backbone ops     : Conv + activation only (no '
              'BatchNormalization, no Add)')
    if r.bench:
        t, e2e = r.bench['timing'], bool(r.settings)
        torch_name = ('PyTorch deploy + mmdet post-processing' if e2e
                      else 'PyTorch')
        ort_name = f'{r.runtime} end to end' if e2e else r.runtime
        n = r.threads
        threads = f', {n} thread{"s" if n > 1 else ""}' if n else ''
        print(f'  bench ({r.bench["input"]} '
              f'{"x".join(map(str, r.bench["shape"]))}{threads}, '
              f'{t.describe()}): {torch_name} '
              f'{t.median("pytorch") * 1e3:.2f} ms, {ort_name} '
              f'{t.median(r.runtime) * 1e3:.2f} ms, {r.runtime}/PyTorch '
              f'{t.ratio(r.runtime, "pytorch")["median"]:.2f}')


def run(args) -> int:
    import mmrepvgg  # noqa: F401  (registers modules)
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.export.onnx_export import (ExportError, ExportOptions,
                                             export_onnx)
    from mmrepvgg.export.runtime import set_threads
    if args.img_shape_input and not args.postprocess:
        raise ExportError('--img-shape-input needs --postprocess')
    set_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options)
    given = {k: getattr(args, k) for k in vars(ExportOptions())
             if getattr(args, k, None) is not None}  # None: the default
    opts = ExportOptions(**dict(
        given, shape=tuple(args.shape) if args.shape else None,
        mode='end2end' if args.postprocess else (
            'backbone' if args.backbone_only else 'raw')))
    print_report(export_onnx(cfg, args.config, args.checkpoint, args.output,
                             opts))
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
