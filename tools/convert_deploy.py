#!/usr/bin/env python
"""Convert trained RepVGG-based detectors to their fused deploy form.

    python tools/convert_deploy.py CONFIG CHECKPOINT OUTPUT.pth
    python tools/convert_deploy.py CONFIG 'work_dirs/x/epoch_*.pth' OUT_DIR/

Writes OUTPUT.pth and OUTPUT.py (the deploy config) as one pair once the
converted model passed the float32-noise check (docs/deployment.md); with
several checkpoints, each failure is one `error:` line, then a summary.
"""
import importlib.util
import os
import os.path as osp
import runpy
import sys


def parse_args(argv=None):
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='training config of the checkpoint')
    p.add_argument('checkpoint',
                   help='checkpoint file, folder of *.pth, or glob pattern')
    p.add_argument('output', help='output .pth (or a folder when several '
                   'checkpoints are given)')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help="verification input size (default: the config's "
                   'test resize)')
    p.add_argument('--noise-factor', type=float,
                   help='largest accepted ratio of the converted error to '
                   "the original model's own float32 error (default 4)")
    p.add_argument('--no-verify', action='store_true',
                   help='skip the output comparison')
    add_cli_args(p, cfg_options=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def print_report(r: dict) -> None:
    mib = 2**20
    print(f'converted {r["checkpoint"]} -> {r["output"]} (+ {r["config"]})')
    print(f'  blocks converted : {r["blocks"]}')
    print(f'  parameters       : {r["params_before"]:,} -> '
          f'{r["params_after"]:,}')
    print(f'  conv layers      : {r["convs_before"]} -> {r["convs_after"]}')
    print(f'  file size        : {r["size_before"] / mib:.2f} MiB -> '
          f'{r["size_after"] / mib:.2f} MiB')
    if 'verify' in r:
        v = r['verify']
        print(f'  verification     : {v["num_outputs"]} outputs at '
              f'{r["shape"][0]}x{r["shape"][1]} vs float64 truth: '
              f'converted err {v["error"]:.3g}, original float32 err '
              f'{v["noise"]:.3g} at {v["worst"]} (ratio {v["ratio"]:.2f}; '
              f'{v["criterion"]})')


def run(args) -> int:
    import mmrepvgg  # noqa: F401  (registers modules)
    from mmrepvgg.apis.convert import (ConvertError, check_options,
                                       check_output_paths, convert_checkpoint,
                                       deploy_paths, find_checkpoints,
                                       load_config)
    from mmrepvgg.deploy.verify import NOISE_FACTOR
    from mmrepvgg.utils.cli import ToolError, error_message

    factor = NOISE_FACTOR if args.noise_factor is None else args.noise_factor
    check_options(args.shape, factor)
    cfg = load_config(args.config, args.cfg_options)
    ckpts = find_checkpoints(args.checkpoint)
    several = len(ckpts) > 1 or osp.isdir(args.output) or \
        args.output.endswith(os.sep)
    outputs = [args.output]
    if several:
        if osp.exists(args.output) and not osp.isdir(args.output):
            raise ConvertError(f'{args.output}: must be a folder when '
                               'converting several checkpoints')
        outputs = [osp.join(args.output,
                            osp.splitext(osp.basename(c))[0] + '_deploy.pth')
                   for c in ckpts]
    # Plan every output first: none may be an input or shared by two inputs.
    inputs = [(c, 'input checkpoint') for c in ckpts] + \
        [(args.config, 'input config')]
    check_output_paths(inputs, [p for o in outputs for p in deploy_paths(o)],
                       ConvertError)
    items = list(zip(ckpts, outputs))
    failed = []
    if len(items) > 1:
        from tqdm import tqdm
        items = tqdm(items, desc='converting', unit='ckpt', file=sys.stderr)
    for ckpt, out in items:
        try:
            print_report(convert_checkpoint(
                cfg, args.config, ckpt, out, shape=args.shape, factor=factor,
                verify=not args.no_verify, unsafe_load=args.unsafe_load))
        except ToolError as e:
            if len(ckpts) == 1:
                raise
            # tqdm.write keeps the line apart from the progress bar
            items.write(f'error: {error_message(e)}', file=sys.stderr)
            failed.append(ckpt)
    if failed:
        raise ConvertError(
            f'converted {len(ckpts) - len(failed)} of {len(ckpts)} '
            f'checkpoints; failed: {", ".join(failed)}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
