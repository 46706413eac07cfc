#!/usr/bin/env python
"""Benchmark the forms of RepVGG backbones on the CPU (docs/benchmark.md).

    python tools/analysis_tools/benchmark.py  # A0 B1g2 B3, 224 640, 1 8
    python tools/analysis_tools/benchmark.py --archs A0 --sizes 224 \\
        --batch-sizes 1 8 --repeats 40 --threads 2

Checks every form against the float64 training form, times all in the same
rounds, writes OUT_DIR/benchmark.md (printed, PASS/MISS per target) and
benchmark.json; or one ``error: ...`` line and nothing.
"""
import argparse
import contextlib
import importlib.util
import os.path as osp
import runpy
import shlex
import sys

#: Largest batch size.
MAX_BATCH = 1024


def size(spec: str):
    """``--sizes`` item: ``'224'`` -> (224, 224), ``'480x640'`` -> (480,
    640) (H x W)."""
    from mmrepvgg.apis.convert import MAX_SIDE
    with contextlib.suppress(ValueError):
        hw = [int(p) for p in spec.lower().split('x')]
        if len(hw) in (1, 2) and 1 <= min(hw) <= max(hw) <= MAX_SIDE:
            return hw[0], hw[-1]
    raise argparse.ArgumentTypeError(
        f'{spec!r} is not a size N or HxW with sides in 1..{MAX_SIDE}')


def int_in(low: int, high: int = 1 << 31):
    """argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        with contextlib.suppress(ValueError):
            if low <= int(text) <= high:
                return int(text)
        bound = f'in {low}..{high}' if high < 1 << 31 else f'>= {low}'
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer {bound}')

    return parse


def parse_args(argv=None):
    from mmrepvgg.benchmark.run import ALL_FORMS, DEFAULT_FORMS
    from mmrepvgg.models.backbones.repvgg import ARCH_SETTINGS
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
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
    forms = list(DEFAULT_FORMS)
    if importlib.util.find_spec('onnxruntime'):
        forms += ['ort-fp32', 'ort-int8']
    p.add_argument('--forms', nargs='+', choices=ALL_FORMS, metavar='FORM',
                   default=forms,
                   help=f'forms to time, of {" ".join(ALL_FORMS)} (ort-*: '
                   'pip install -e .[onnx], ov-*: .[openvino]); default '
                   f'{" ".join(forms)}')
    p.add_argument('--repeats', type=int_in(1), default=24,
                   help='timed rounds per row; default 24')
    p.add_argument('--warmup', type=int_in(0), default=3,
                   help='untimed rounds per row first; default 3')
    p.add_argument('--settle', type=int_in(0), default=1,
                   help='untimed calls of a form before each timed call; '
                   'default 1')
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
                   '%(default)s')
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
    from mmrepvgg.benchmark import report
    from mmrepvgg.benchmark import run as bench
    from mmrepvgg.benchmark.detector import detector_forms
    from mmrepvgg.utils.fileio import scratch_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    report.report_paths(args.out_dir)  # refused now, not after the timing
    if args.detector_images and not args.detector:
        raise bench.BenchmarkError('--detector-images needs --detector')
    if args.detector and not osp.isfile(args.detector[1]):
        raise bench.BenchmarkError(
            f'--detector: checkpoint {args.detector[1]} does not exist')
    cfg = load_config(args.detector[0]) if args.detector else None
    # the ONNX graphs: in a folder the next run removes after a SIGKILL
    with scratch_dir('mmrepvgg-benchmark'):
        rows = bench.run_benchmark(
            [(a, a) for a in dict.fromkeys(args.archs)], args.sizes,
            args.batch_sizes, args.forms, args.repeats, args.warmup,
            args.settle)
        detector = '' if cfg is None else detector_forms(
            cfg, *args.detector, args.detector_images, args.repeats,
            args.warmup)['markdown']

    command = 'python tools/analysis_tools/benchmark.py ' + ' '.join(
        shlex.quote(a) for a in args.argv)
    settings = {'repeats (timed rounds)': str(args.repeats),
                'warmup rounds': str(args.warmup),
                'settle calls': str(args.settle)}
    markdown = report.format_markdown(
        rows, command, settings, report.environment(),
        report.check_targets(rows)) + detector
    paths = report.write_report(rows, args.out_dir, markdown)
    print(f'\n{markdown}\nwrote {paths["md"]}, {paths["json"]}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
