#!/usr/bin/env python
"""Benchmark the forms of RepVGG backbones: PyTorch training / deploy /
plain reference / torch.compile (and bfloat16), onnxruntime FP32 and INT8,
OpenVINO FP32, INT8 and bfloat16.

    # A0 B1g2 B3 x 224 640 x batch 1 8:
    python tools/analysis_tools/benchmark.py
    python tools/analysis_tools/benchmark.py --archs A0 --sizes 224 \\
        --batch-sizes 1 8 \\
        --bf16 --repeats 40 --threads 2 --out-dir work_dirs/benchmark
    python tools/analysis_tools/benchmark.py --sizes 64 \\
        --forms training deploy reference \\
        --archs '{"name": "tiny", "num_blocks": [1, 1, 1, 1],
                  "width_factor": [0.25, 0.25, 0.25, 0.25]}'

For every arch, input size and batch size, times every form in the same
rounds (order balanced or random per round, each timed call after an
untimed call of the same form), drops rounds disturbed by other load, and
reports the median latency, throughput, medians of per-round ratios
(deploy/reference, training/deploy, ort-fp32/deploy, ort-int8/ort-fp32,
ov-*/deploy, compile/deploy, deploy-bf16/deploy), the compile time of the
compile form, parameter counts and peak activation memory. Before timing,
deploy, reference, compile, ort-fp32 and ov-fp32 are checked against the
training form in float64 (float32-noise criterion); the error of the lossy
forms (bf16, INT8) is reported, with every form's precision. Writes
OUT_DIR/benchmark.md (tables, command line and machine), benchmark.png
(grouped bars) and benchmark.json (all samples), and prints PASS/MISS for
the targets deploy/reference <= 1.02 (every row), training/deploy >= 1.3,
ort-int8/ort-fp32 <= 0.4, fastest INT8 form/deploy <= 0.15 and fastest
float32 form/deploy <= 0.5 (A0 at 224x224 on CPU).
Run it on a quiet machine. Exits 1 with one line ``error: ...`` on a bad
option or a failed equivalence check, writing nothing (2 on a command line
that does not parse). Sizes are bounded up front: sides <= 4096, batch
sizes <= 1024, JSON archs <= 256 blocks (see mmrepvgg.benchmark.options).
"""
import importlib.util
import os.path as osp
import runpy
import shlex
import sys


def parse_args(argv=None):
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(
        description='Time the forms of RepVGG backbones (PyTorch training, '
        'deploy, plain-conv reference, torch.compile, bfloat16; onnxruntime '
        'and OpenVINO FP32 and INT8, OpenVINO bfloat16) interleaved, with '
        'warm-up, disturbed-round detection and medians.')
    p.add_argument('--archs', nargs='+', default=['A0', 'B1g2', 'B3'],
                   help='arch names (A0 ... D2se) or JSON arch dicts (an '
                   'optional "name" key labels them); default A0 B1g2 B3')
    p.add_argument('--sizes', nargs='+', default=['224', '640'],
                   help='input sizes, N (square) or HxW; default 224 640')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8],
                   help='batch sizes; default 1 8')
    p.add_argument('--forms', nargs='+',
                   help='forms to time, from training deploy reference '
                   'compile deploy-bf16 deploy-fp16 ort-fp32 ort-int8 ov-fp32 '
                   'ov-int8 ov-bf16 (ov-*: pip install -e .[openvino]; '
                   'ov-bf16 is skipped without native bfloat16); default '
                   'training deploy reference, plus ort-fp32 ort-int8 when '
                   'onnxruntime is installed')
    prec = p.add_mutually_exclusive_group()
    prec.add_argument('--bf16', action='store_true',
                      help='add the deploy form in bfloat16 (form '
                      'deploy-bf16; CUDA with bf16, or a CPU with native '
                      'bf16)')
    prec.add_argument('--half', action='store_true',
                      help='add the deploy form in float16 (form '
                      'deploy-fp16; CUDA only)')
    p.add_argument('--repeats', type=int, default=24,
                   help='timed rounds per row (medians reported); a '
                   'multiple of the schedule length balances the order '
                   'exactly (6 for 3 forms, 10 for 5, 6 for 6); default 24')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed rounds per row first; default 3')
    p.add_argument('--settle', type=int, default=1,
                   help='untimed calls of a form right before each of its '
                   'timed calls (absorbs the effect of the previous form); '
                   'default 1')
    p.add_argument('--order', choices=['balanced', 'random'],
                   default='balanced',
                   help='order of the forms in the rounds: a Williams design '
                   '(balanced) or a seeded random order; default balanced')
    p.add_argument('--tolerance', type=float, default=0.15,
                   help='a round whose total exceeds the median round by '
                   'more than this fraction is disturbed; default 0.15')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--ort-spinning', action='store_true',
                   help='let onnxruntime threads busy-wait between runs '
                   '(faster alone, but steals the cores of the PyTorch '
                   'forms timed next)')
    p.add_argument('--threads', type=int,
                   help='threads of PyTorch and onnxruntime (default: '
                   "torch's default)")
    p.add_argument('--detector', nargs=2, metavar=('CONFIG', 'CHECKPOINT'),
                   help='also the detector end to end: PyTorch training and '
                   'deploy, its end-to-end FP32 and INT8 graphs on '
                   'onnxruntime and OpenVINO, timed side by side, each with '
                   'its bbox mAP on the val split (run where the config\'s '
                   'data is)')
    p.add_argument('--detector-images', type=int, metavar='N',
                   help='val images the detector forms are scored on '
                   '(default: all)')
    p.add_argument('--out-dir', default='work_dirs/benchmark',
                   help='where benchmark.md/.png/.json go; default '
                   'work_dirs/benchmark')
    add_cli_args(p, unsafe_load=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv  # for the report's command line
    return args


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def default_forms(log=print):
    from mmrepvgg.benchmark.options import DEFAULT_FORMS, ORT_FORMS
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        log('note: onnxruntime is not installed: timing the PyTorch forms '
            'only (pip install -e .[onnx] adds ort-fp32 and ort-int8)')
        return list(DEFAULT_FORMS)
    return list(DEFAULT_FORMS) + list(ORT_FORMS)


def run(args) -> int:
    import torch

    import mmrepvgg  # noqa: F401  (registers the modules)
    from mmrepvgg import benchmark as bm
    from mmrepvgg.export.runtime import set_threads
    from mmrepvgg.utils.fileio import scratch_dir

    set_threads(args.threads)
    if not args.tolerance > 0:
        raise bm.BenchmarkError(f'--tolerance must be > 0, got '
                                f'{args.tolerance}')
    archs = [bm.parse_arch(a, i) for i, a in enumerate(args.archs)]
    labels = [a[0] for a in archs]
    if len(set(labels)) != len(labels):
        raise bm.BenchmarkError(f'--archs: duplicate labels {labels}')
    sizes = [bm.parse_size(s) for s in args.sizes]
    forms = list(args.forms) if args.forms else default_forms()
    if args.bf16:
        forms.append('deploy-bf16')
    if args.half:
        forms.append('deploy-fp16')
    forms = bm.parse_forms(forms)
    bm.report_paths(args.out_dir)  # refused now, not after the timing
    det_cfg = _detector_config(args)
    # the ONNX graphs: in a folder the next run removes after a SIGKILL
    with scratch_dir('mmrepvgg-benchmark'):
        opts = {k: getattr(args, k) for k in vars(bm.BenchOptions())}
        rows = bm.run_benchmark(archs, sizes, args.batch_sizes,
                                **dict(opts, forms=forms))
        detector = None
        if det_cfg is not None:
            from mmrepvgg.benchmark.detector import detector_forms
            detector = detector_forms(det_cfg, *args.detector,
                                      args.detector_images, args.repeats,
                                      args.warmup)

    command = 'python tools/analysis_tools/benchmark.py ' + ' '.join(
        shlex.quote(a) for a in args.argv)
    settings = {
        'device': args.device, 'forms': ' '.join(forms),
        'repeats (timed rounds)': str(args.repeats),
        'warmup rounds': str(args.warmup),
        'settle calls': str(args.settle), 'order': args.order,
        'disturbed-round tolerance': f'{args.tolerance:g}',
        'onnxruntime spinning': str(args.ort_spinning),
    }
    if torch.device(args.device).type == 'cuda':
        settings['cudnn.benchmark'] = 'True (restored afterwards)'
    env = bm.environment(args.device)
    targets = bm.check_targets(rows, args.device)
    markdown = bm.format_markdown(rows, command, settings, env, targets)
    if detector is not None:
        markdown += _detector_section(detector, args.detector)
    paths = bm.write_report(rows, args.out_dir, markdown,
                            f'RepVGG backbone latency ({args.device})')
    print()
    print(bm.format_table(rows))
    print()
    print(bm.format_accuracy(rows))
    print()
    for line in targets:
        print(line)
    if detector is not None:
        print(_detector_section(detector, args.detector))
    print(f'wrote {paths["md"]}, {paths["png"]}, {paths["json"]}')
    return 0


def _detector_config(args):
    """The config of ``--detector``, checked before any timing (None
    without the option)."""
    from mmrepvgg import benchmark as bm
    from mmrepvgg.apis.convert import load_config
    if args.detector is None:
        if args.detector_images is not None:
            raise bm.BenchmarkError('--detector-images needs --detector')
        return None
    if args.detector_images is not None and args.detector_images < 1:
        raise bm.BenchmarkError(f'--detector-images must be >= 1, got '
                                f'{args.detector_images}')
    config, checkpoint = args.detector
    if not osp.isfile(checkpoint):
        raise bm.BenchmarkError(f'--detector: checkpoint {checkpoint} does '
                                'not exist')
    return load_config(config)


def _detector_section(d: dict, detector) -> str:
    """The detector part of benchmark.md."""
    s = d['scored']
    lines = ['', '## Detector end to end', '',
             f'`{detector[0]}` with `{detector[1]}`: mAP on {s["images"]} of '
             f'{s["of"]} {s["split"]} images (the config\'s evaluator); '
             f'INT8: {d["quantization"]}.', '', d['table'], '']
    lines += [f'- skipped: {k} ({v})' for k, v in d['skipped'].items()]
    lines += [f'- {t}' for t in d['targets']]
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
