#!/usr/bin/env python
"""Benchmark the forms of RepVGG backbones on the CPU: PyTorch training /
deploy / plain reference / torch.compile (and bfloat16), onnxruntime and
OpenVINO FP32 and INT8, OpenVINO bfloat16.

    python tools/analysis_tools/benchmark.py  # A0 B1g2 B3, 224 640, 1 8
    python tools/analysis_tools/benchmark.py --archs A0 --sizes 224 \\
        --batch-sizes 1 8 --bf16 --repeats 40 --threads 2

Every form is first checked against the training form in float64, then all
are timed in the same rounds (``docs/benchmark.md``: the method and the
targets). Writes OUT_DIR/benchmark.md and benchmark.json and prints PASS/MISS
per target. Exits 1 with one line ``error: ...`` on a bad option or a failed
check, writing nothing (2 on a command line that does not parse).
"""
import importlib.util
import os.path as osp
import runpy
import shlex
import sys


def parse_args(argv=None):
    from mmrepvgg.benchmark.options import (ALL_FORMS, MAX_BATCH, int_in,
                                            size)
    from mmrepvgg.models.backbones.repvgg import ARCH_SETTINGS
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    from mmrepvgg.utils.timing import ORDERS
    p = ToolArgumentParser(
        description='Time the forms of RepVGG backbones side by side, each '
        'checked against the training form first.')
    p.add_argument('--archs', nargs='+', default=['A0', 'B1g2', 'B3'],
                   choices=list(ARCH_SETTINGS), metavar='ARCH',
                   help='published archs (A0 ... D2se); default A0 B1g2 B3')
    p.add_argument('--sizes', nargs='+', type=size,
                   default=[(224, 224), (640, 640)],
                   help='input sizes, N (square) or HxW; default 224 640')
    p.add_argument('--batch-sizes', nargs='+', type=int_in(1, MAX_BATCH),
                   default=[1, 8], help='default 1 8')
    p.add_argument('--forms', nargs='+', choices=ALL_FORMS, metavar='FORM',
                   help=f'forms to time, of {" ".join(ALL_FORMS)} (ov-*: '
                   'pip install -e .[openvino]); default training deploy '
                   'reference, and ort-fp32 ort-int8 with onnxruntime')
    p.add_argument('--bf16', action='store_true', help='add deploy-bf16')
    p.add_argument('--repeats', type=int_in(1), default=24,
                   help='timed rounds per row; default 24')
    p.add_argument('--warmup', type=int_in(0), default=3,
                   help='untimed rounds per row first; default 3')
    p.add_argument('--settle', type=int_in(0), default=1,
                   help='untimed calls of a form before each timed call; '
                   'default 1')
    p.add_argument('--order', choices=ORDERS, default='balanced',
                   help='order of the forms in the rounds; default balanced')
    p.add_argument('--threads', type=int_in(1),
                   help="threads of every runtime (default: torch's)")
    p.add_argument('--detector', nargs=2, metavar=('CONFIG', 'CHECKPOINT'),
                   help='also the detector end to end, every form with its '
                   'bbox mAP on the val split')
    p.add_argument('--detector-images', type=int_in(1), metavar='N',
                   help='val images the detector forms are scored on '
                   '(default: all)')
    p.add_argument('--out-dir', default='work_dirs/benchmark',
                   help='where benchmark.md and benchmark.json go; default '
                   'work_dirs/benchmark')
    add_cli_args(p, unsafe_load=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv  # for the report's command line
    return args


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def run(args) -> int:
    import torch

    import mmrepvgg  # noqa: F401  (registers the modules)
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.benchmark import options, report
    from mmrepvgg.benchmark import run as bench
    from mmrepvgg.utils.fileio import scratch_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [(a, a) for a in dict.fromkeys(args.archs)]
    forms = args.forms or list(options.DEFAULT_FORMS)
    if not args.forms and importlib.util.find_spec('onnxruntime'):
        forms += ['ort-fp32', 'ort-int8']
    elif not args.forms:
        print('note: onnxruntime is not installed: timing the PyTorch forms '
              'only (pip install -e .[onnx] adds ort-fp32 and ort-int8)')
    forms += ['deploy-bf16'] if args.bf16 else []
    report.report_paths(args.out_dir)  # refused now, not after the timing
    det_cfg = None
    if args.detector_images and not args.detector:
        raise options.BenchmarkError('--detector-images needs --detector')
    if args.detector:
        if not osp.isfile(args.detector[1]):
            raise options.BenchmarkError(
                f'--detector: checkpoint {args.detector[1]} does not exist')
        det_cfg = load_config(args.detector[0])
    # the ONNX graphs: in a folder the next run removes after a SIGKILL
    with scratch_dir('mmrepvgg-benchmark'):
        rows = bench.run_benchmark(
            archs, args.sizes, args.batch_sizes, forms, args.repeats,
            args.warmup, args.settle, args.order)
        detector = ''
        if det_cfg is not None:
            from mmrepvgg.benchmark.detector import detector_forms
            detector = detector_forms(
                det_cfg, *args.detector, args.detector_images, args.repeats,
                args.warmup)['markdown']

    command = 'python tools/analysis_tools/benchmark.py ' + ' '.join(
        shlex.quote(a) for a in args.argv)
    settings = {'forms': ' '.join(rows[0]['forms']),
                'repeats (timed rounds)': str(args.repeats),
                'warmup rounds': str(args.warmup),
                'settle calls': str(args.settle), 'order': args.order}
    targets = report.check_targets(rows)
    paths = report.write_report(rows, args.out_dir, report.format_markdown(
        rows, command, settings, report.environment(), targets) + detector)
    print('\n'.join(['', report.format_table(rows), '',
                     report.format_accuracy(rows), ''] + targets))
    print(f'{detector}wrote {paths["md"]}, {paths["json"]}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
