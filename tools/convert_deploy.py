#!/usr/bin/env python
"""Convert trained RepVGG-based detectors to their fused deploy form.

    python tools/convert_deploy.py CONFIG CHECKPOINT OUTPUT.pth
    python tools/convert_deploy.py CONFIG 'work_dirs/x/epoch_*.pth' OUT_DIR/

Writes OUTPUT.pth (meta + state_dict) and OUTPUT.py (the deploy config, every
RepVGG module with deploy=True) after checking that the converted model gives
the same backbone, neck and head outputs. Exits 1 with one line naming the
file or key at fault and writes nothing on any error.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))


def parse_args(argv=None):
    from mmrepvgg.utils.cli import add_cli_args
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(
        description='Fuse every RepVGG block of a trained detector and write '
        'a deploy checkpoint plus its config.')
    p.add_argument('config', help='training config of the checkpoint')
    p.add_argument('checkpoint',
                   help='checkpoint file, folder of *.pth, or glob pattern')
    p.add_argument('output', help='output .pth (or a folder when several '
                   'checkpoints are given)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings in the config, key=value')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help='verification input size (default: the config\'s '
                   'test resize)')
    p.add_argument('--device', default='cpu', help='cpu, cuda, cuda:1, ...')
    p.add_argument('--tolerance', type=float, default=1e-5,
                   help='max relative error max|a-b|/max|a| accepted '
                   '(default 1e-5)')
    p.add_argument('--no-verify', action='store_true',
                   help='skip the output comparison')
    p.add_argument('--repeats', type=int, default=5,
                   help='latency repeats per form, interleaved, median '
                   '(0 to skip timing)')
    add_cli_args(p)
    return p.parse_args(argv)


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
    if 'max_rel' in r:
        print(f'  verification     : {r["num_outputs"]} outputs at '
              f'{r["shape"][0]}x{r["shape"][1]}, max abs err '
              f'{r["max_abs"]:.3g}, max rel err {r["max_rel"]:.3g} '
              f'({r["worst"]})')
    if 'latency_before' in r:
        b, a = r['latency_before'], r['latency_after']
        print(f'  forward latency  : {b * 1e3:.1f} ms -> {a * 1e3:.1f} ms '
              f'({b / a:.2f}x)')


def run(args) -> int:
    import mmrepvgg  # noqa: F401  (registers modules and safe globals)
    from mmrepvgg.apis import ConvertError, convert_checkpoint, \
        find_checkpoints
    from mmrepvgg.apis.convert import load_config

    cfg = load_config(args.config, args.cfg_options)
    ckpts = find_checkpoints(args.checkpoint)
    if len(ckpts) == 1 and not (osp.isdir(args.output)
                                or args.output.endswith(os.sep)):
        outputs = [args.output]
    else:
        if osp.exists(args.output) and not osp.isdir(args.output):
            raise ConvertError(f'{args.output}: must be a folder when '
                               'converting several checkpoints')
        outputs = [osp.join(args.output,
                            osp.splitext(osp.basename(c))[0] + '_deploy.pth')
                   for c in ckpts]
    items = list(zip(ckpts, outputs))
    if len(items) > 1:
        from tqdm import tqdm
        items = tqdm(items, desc='converting', unit='ckpt', file=sys.stderr)
    for ckpt, out in items:
        report = convert_checkpoint(
            cfg, args.config, ckpt, out, shape=args.shape,
            device=args.device, tolerance=args.tolerance,
            verify=not args.no_verify, unsafe_load=args.unsafe_load,
            latency_repeats=args.repeats)
        print_report(report)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmrepvgg.utils.cli import run_cli
    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == '__main__':
    sys.exit(main())
