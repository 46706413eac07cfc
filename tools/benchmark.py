#!/usr/bin/env python
"""Benchmark the training, deploy and plain-reference forms of RepVGG.

    python tools/benchmark.py          # A0 B1g2 B3 x 224 640 x batch 1 8
    python tools/benchmark.py --archs A0 --sizes 224 --batch-sizes 1 \\
        --repeats 50 --warmup 5 --threads 2 --out-dir work_dirs/benchmark
    python tools/benchmark.py --sizes 64 --archs \\
        '{"name": "tiny", "num_blocks": [1, 1, 1, 1],
          "width_factor": [0.25, 0.25, 0.25, 0.25]}'

For every arch, input size and batch size, times the multi-branch training
form (eval mode), the fused deploy form and a hand-built stack of plain
nn.Conv2d + activation holding the deploy weights (checked equal to the deploy
form first), interleaved, and reports the median latency, throughput, the
deploy/reference and training/deploy ratios, parameter counts and peak
activation memory. Writes OUT_DIR/benchmark.md (table, command line and
machine), benchmark.png (grouped bars) and benchmark.json (all samples), and
prints PASS/MISS for the targets deploy/reference <= 1.02 (every row) and
training/deploy >= 1.3 (A0 at 224x224 on CPU). Run it on a quiet machine:
the ratios are medians of per-round ratios, robust to slow drifts of load but
not to another process competing for the cores. The default run (3 archs x
2 sizes x 2 batch sizes, 24 + 3 rounds of 3 forms) is dominated by B3 at
640x640 batch 8 and takes the order of an hour on 2 CPU cores. Exits 1 with
one line ``error: ...`` on a bad option or a failed equivalence check.
"""
import argparse
import os.path as osp
import shlex
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    from mmrepvgg.utils.cli import add_cli_args
    p = argparse.ArgumentParser(
        description='Time the training, deploy and plain-conv reference '
        'forms of RepVGG backbones, interleaved, with warm-up and medians.')
    p.add_argument('--archs', nargs='+', default=['A0', 'B1g2', 'B3'],
                   help='arch names (A0 ... D2se) or JSON arch dicts (an '
                   'optional "name" key labels them); default A0 B1g2 B3')
    p.add_argument('--sizes', nargs='+', default=['224', '640'],
                   help='input sizes, N (square) or HxW; default 224 640')
    p.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8],
                   help='batch sizes; default 1 8')
    p.add_argument('--repeats', type=int, default=24,
                   help='timed rounds per row (median reported); a multiple '
                   'of 6 balances the order of the forms exactly; default 24')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed rounds per row first; default 3')
    p.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    p.add_argument('--channels-last', action='store_true',
                   help='models and inputs in channels_last memory format')
    prec = p.add_mutually_exclusive_group()
    prec.add_argument('--half', action='store_true',
                      help='float16 (CUDA only)')
    prec.add_argument('--bf16', action='store_true',
                      help='bfloat16 (CUDA with bf16, or a CPU with native '
                      'bf16)')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile every form (dynamic=False); '
                   'compilation happens in the warm-up')
    p.add_argument('--threads', type=int,
                   help='torch.set_num_threads for the run (default: '
                   "torch's default)")
    p.add_argument('--out-dir', default='work_dirs/benchmark',
                   help='where benchmark.md/.png/.json go; default '
                   'work_dirs/benchmark')
    add_cli_args(p, unsafe_load=False)
    return p.parse_args(argv)


def run(args, argv) -> int:
    import torch

    import mmrepvgg  # noqa: F401  (registers the modules)
    from mmrepvgg.apis import benchmark as bm

    if args.threads is not None:
        if args.threads < 1:
            raise bm.BenchmarkError(f'--threads must be >= 1, got '
                                    f'{args.threads}')
        torch.set_num_threads(args.threads)
    archs = [bm.parse_arch(a, i) for i, a in enumerate(args.archs)]
    labels = [a[0] for a in archs]
    if len(set(labels)) != len(labels):
        raise bm.BenchmarkError(f'--archs: duplicate labels {labels}')
    sizes = [bm.parse_size(s) for s in args.sizes]
    dtype = bm.dtype_from_flags(args.half, args.bf16)
    rows = bm.run_benchmark(
        archs, sizes, args.batch_sizes, repeats=args.repeats,
        warmup=args.warmup, device=args.device, dtype=dtype,
        channels_last=args.channels_last, compile=args.compile)

    command = 'python tools/benchmark.py ' + ' '.join(
        shlex.quote(a) for a in argv)
    settings = {
        'device': args.device, 'dtype': str(dtype).replace('torch.', ''),
        'channels_last': str(args.channels_last),
        'torch.compile': str(args.compile),
        'repeats (median of)': str(args.repeats),
        'warmup rounds': str(args.warmup),
    }
    if torch.device(args.device).type == 'cuda':
        settings['cudnn.benchmark'] = 'True (restored afterwards)'
    env = bm.environment(args.device)
    targets = bm.check_targets(rows, args.device)
    markdown = bm.format_markdown(rows, command, settings, env, targets)
    title = bm.summary_title(args.device, dtype, args.channels_last,
                             args.compile)
    paths = bm.write_report(rows, args.out_dir, markdown, title)
    print()
    print(bm.format_table(rows))
    print()
    for line in targets:
        print(line)
    print(f'wrote {paths["md"]}, {paths["png"]}, {paths["json"]}')
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from mmrepvgg.utils.cli import run_cli
    return run_cli(lambda: run(args, argv), debug=args.debug)


if __name__ == '__main__':
    sys.exit(main())
