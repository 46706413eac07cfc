#!/usr/bin/env python
"""Convert trained RepVGG-based detectors to their fused deploy form.

    python tools/convert_deploy.py CONFIG CHECKPOINT OUTPUT.pth
    python tools/convert_deploy.py CONFIG 'work_dirs/x/epoch_*.pth' OUT_DIR/

Writes OUTPUT.pth (meta + state_dict) and OUTPUT.py (the deploy config, every
RepVGG module with deploy=True) as one all-or-nothing pair after checking that
the converted model gives the same backbone, neck and head outputs: its float32
error against the original model evaluated in float64 must be at most
--noise-factor times the original model's own float32 error (a criterion that
holds on any CPU; --tolerance sets a fixed bound instead). Exits 1 with one
line naming the file or key at fault and writes nothing on any error.

With several checkpoints (a folder or a glob), every output path is planned
and checked for collisions before anything is written; then every good
checkpoint is converted, each bad one is reported on its own `error:` line,
and the tool exits 1 with a summary if any failed.
"""
import importlib.util
import os
import os.path as osp
import runpy
import sys


def parse_args(argv=None):
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(
        description='Fuse every RepVGG block of a trained detector and write '
        'a deploy checkpoint plus its config.')
    p.add_argument('config', help='training config of the checkpoint')
    p.add_argument('checkpoint',
                   help='checkpoint file, folder of *.pth, or glob pattern')
    p.add_argument('output', help='output .pth (or a folder when several '
                   'checkpoints are given)')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help='verification input size (default: the config\'s '
                   'test resize)')
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    p.add_argument('--noise-factor', type=float, default=None,
                   help='accept the converted model when its float32 error '
                   'against the float64 truth is at most this many times the '
                   'original model\'s own float32 error, per output '
                   '(default 4)')
    p.add_argument('--tolerance', type=float, default=None,
                   help='instead of the noise criterion, accept a converted '
                   'model whose relative error max|a-b|/max|a| against the '
                   'float64 truth is at most this fixed bound')
    p.add_argument('--no-verify', action='store_true',
                   help='skip the output comparison')
    p.add_argument('--repeats', type=int, default=5,
                   help='latency repeats per form, interleaved, median '
                   '(0 to skip timing)')
    add_cli_args(p, cfg_options=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def _mb(n: int) -> str:
    return f'{n / 2**20:.2f} MiB'


def print_report(r: dict) -> None:
    print(f'converted {r["checkpoint"]} -> {r["output"]} (+ {r["config"]})')
    print(f'  blocks converted : {r["blocks"]}')
    print(f'  parameters       : {r["params_before"]:,} -> '
          f'{r["params_after"]:,}')
    print(f'  conv layers      : {r["convs_before"]} -> {r["convs_after"]}')
    print(f'  file size        : {_mb(r["size_before"])} -> '
          f'{_mb(r["size_after"])}')
    if 'verify' in r:
        v = r['verify']
        print(f'  verification     : {v["num_outputs"]} outputs at '
              f'{r["shape"][0]}x{r["shape"][1]} vs float64 truth: '
              f'converted err {v["error"]:.3g}, original float32 err '
              f'{v["noise"]:.3g} at {v["worst"]} (ratio {v["ratio"]:.2f}; '
              f'{v["criterion"]})')
    if 'latency_before' in r:
        b, a = r['latency_before'], r['latency_after']
        print(f'  forward latency  : {b * 1e3:.1f} ms -> {a * 1e3:.1f} ms '
              f'({b / a:.2f}x)')


def run(args) -> int:
    import mmrepvgg  # noqa: F401  (registers modules)
    from mmrepvgg.apis import ConvertError, convert_checkpoint, \
        find_checkpoints
    from mmrepvgg.apis.convert import (check_options, check_output_paths,
                                       deploy_paths, load_config)
    from mmrepvgg.deploy.verify import NOISE_FACTOR
    from mmrepvgg.utils.cli import ToolError, error_message

    factor = NOISE_FACTOR if args.noise_factor is None else args.noise_factor
    if args.tolerance is not None and args.noise_factor is not None:
        raise ConvertError('--tolerance and --noise-factor exclude each '
                           'other: give one criterion')
    check_options(args.shape, args.tolerance, factor)
    cfg = load_config(args.config, args.cfg_options)
    ckpts = find_checkpoints(args.checkpoint)
    several = len(ckpts) > 1 or osp.isdir(args.output) or \
        args.output.endswith(os.sep)
    if not several:
        outputs = [args.output]
    else:
        if osp.exists(args.output) and not osp.isdir(args.output):
            raise ConvertError(f'{args.output}: must be a folder when '
                               'converting several checkpoints')
        outputs = [osp.join(args.output,
                            osp.splitext(osp.basename(c))[0] + '_deploy.pth')
                   for c in ckpts]
    # Plan every output before writing anything: no output may be an input
    # (by file identity) or be shared by two inputs.
    inputs = [(c, 'input checkpoint') for c in ckpts] + \
        [(args.config, 'input config')]
    check_output_paths(inputs, [p for o in outputs for p in deploy_paths(o)],
                       ConvertError)

    items = list(zip(ckpts, outputs))
    failed = []
    bar = items
    if len(items) > 1:
        from tqdm import tqdm
        bar = tqdm(items, desc='converting', unit='ckpt', file=sys.stderr)
    for ckpt, out in bar:
        try:
            report = convert_checkpoint(
                cfg, args.config, ckpt, out, shape=args.shape,
                device=args.device, tolerance=args.tolerance, factor=factor,
                verify=not args.no_verify, unsafe_load=args.unsafe_load,
                latency_repeats=args.repeats)
        except ToolError as e:
            if len(items) == 1:
                raise
            line = f'error: {error_message(e)}'
            if hasattr(bar, 'write'):  # keep the line apart from the bar
                bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr)
            failed.append(ckpt)
            continue
        print_report(report)
    if failed:
        raise ConvertError(
            f'converted {len(items) - len(failed)} of {len(items)} '
            f'checkpoints; failed: {", ".join(failed)}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
