#!/usr/bin/env python
"""Train configs under several seeds and print their metrics side by side.

    python tools/analysis_tools/seed_sweep.py --seeds 0 1 2 3 \\
        --run repvgg configs/toy/retinanet_repvgg-tiny_repvgg-fpn_toy.py \\
        --run qarepvgg configs/toy/retinanet_qarepvgg-tiny_qarepvgg-fpn_toy.py

Each ``--run LABEL CONFIG [key=value ...]`` trains once per seed in
``<work-dir>/LABEL/seed<SEED>``; its last logged metric is recorded there, so
a rerun reuses finished seeds and refuses one trained from another config or
options. stdout is the table (mean +- std, difference to the first run).
"""
import importlib.util
import os.path as osp
import runpy
import sys
import time

ROOT = osp.abspath(osp.join(__file__, '../../..'))  # the repository


def parse_args(argv=None):
    from mmrepvgg.apis.sweep import DEFAULT_METRIC
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('--run', nargs='+', action='append', required=True,
                   metavar='LABEL CONFIG [KEY=VALUE',
                   help='a label, a config and optional --cfg-options items '
                   '(repeat for several runs; the first is the reference)')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3])
    p.add_argument('--work-dir', default='work_dirs/sweep')
    p.add_argument('--metric', default=DEFAULT_METRIC)
    add_cli_args(p, unsafe_load=False)
    args = p.parse_args(argv)
    for run in args.run:
        if len(run) < 2:
            p.error(f'--run {run[0]}: needs a label and a config')
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error('--seeds: distinct integers >= 0')
    labels = [run[0] for run in args.run]
    if len(set(labels)) != len(labels):
        p.error('--run: labels must be distinct')
    return args


def train(run, seed: int) -> None:
    """Train ``seed`` of ``run`` in a child process."""
    from mmrepvgg.apis.sweep import run_logged
    run_logged([sys.executable, osp.join(ROOT, 'tools', 'train.py'),
                *run.train_args(seed)],
               osp.join(run.work_dir(seed), 'sweep_train.log'),
               f'{run.label} seed {seed}: tools/train.py')


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmrepvgg.apis.sweep import SweepRun, final_metric, format_table
    from mmrepvgg.utils.cli import run_cli

    def body() -> int:
        runs = [SweepRun(r[0], r[1], r[2:], args.work_dir) for r in args.run]
        cached = {(r.label, s): r.cached(s, args.metric)
                  for r in runs for s in args.seeds}  # refuse before training
        results = {r.label: {} for r in runs}
        for run in runs:
            for seed in args.seeds:
                value = cached[run.label, seed]
                if value is None:
                    print(f'[sweep] {run.label} seed {seed}: training in '
                          f'{run.work_dir(seed)}', file=sys.stderr)
                    start = time.perf_counter()
                    train(run, seed)
                    value = final_metric(run.work_dir(seed), args.metric)
                    run.record(seed, args.metric, value)
                    took = f' ({time.perf_counter() - start:.0f} s)'
                else:
                    took = ' (recorded)'
                print(f'[sweep] {run.label} seed {seed}: {args.metric} '
                      f'{value:.3f}{took}', file=sys.stderr)
                results[run.label][seed] = value
        table = format_table(results, {r.label: r.config for r in runs},
                             args.metric)
        print(table)
        return 0

    return run_cli(body, debug=args.debug,
                   interrupted='interrupted; finished seeds are recorded '
                   '(rerun the same command to continue)')


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
