#!/usr/bin/env python
"""Export a deployed (fused) RepVGG model to ONNX and verify it.

    python tools/export_onnx.py CONFIG CHECKPOINT OUTPUT.onnx
    python tools/export_onnx.py CONFIG CHECKPOINT backbone.onnx --backbone-only
    python tools/export_onnx.py CONFIG CHECKPOINT OUTPUT.onnx --bench

CHECKPOINT is a training-form checkpoint (converted here: built from CONFIG,
loaded, switch_to_deploy) or a deploy checkpoint from tools/convert_deploy.py
(detected from its conv_reparam keys; loaded into CONFIG's deploy twin). CONFIG
may be a detector config or a bare backbone config (model = dict(type='RepVGG',
...)). Single-stage detectors export their tensor forward
bbox_head(extract_feat(x)): raw head outputs, no post-processing; two-stage
detectors are refused (use --backbone-only). The input is the preprocessed
(normalized, padded) float32 NCHW batch; batch, height and width are dynamic.

Uses torch.onnx.export(dynamo=False). The graph goes to a temporary file, is
run with onnxruntime (CPUExecutionProvider) on two random inputs of different
batch and spatial sizes and compared with PyTorch; OUTPUT appears only if the
max relative error is <= --tolerance. Prints the operator histogram (a fused
backbone has only Conv and its activation). Needs `pip install -e .[onnx]`.
Exits 1 with one line `error: ...` naming the file or argument at fault, and
writes nothing, on any error.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

DEFAULT_OPSET = 17


def parse_args(argv=None):
    from mmrepvgg.utils.cli import add_cli_args
    from mmengine.config import DictAction
    p = argparse.ArgumentParser(
        description='Export a RepVGG model in deploy form to ONNX, verified '
        'with onnxruntime.')
    p.add_argument('config', help='model config (detector or backbone; the '
                   'training config also serves a deploy checkpoint)')
    p.add_argument('checkpoint', help='training-form or deploy checkpoint')
    p.add_argument('output', help='output .onnx file')
    p.add_argument('--backbone-only', action='store_true',
                   help='export the backbone alone')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help="traced and verified input size (default: the "
                   "config's test resize, 640x640 without one)")
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                   help=f'ONNX opset (default {DEFAULT_OPSET})')
    p.add_argument('--device', default='cpu',
                   help='device of the PyTorch model in verification and '
                   '--bench (the graph is always traced on cpu; onnxruntime '
                   'runs on cpu)')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='max relative error max|a-b|/max|a| between '
                   'onnxruntime and PyTorch (default 1e-4)')
    p.add_argument('--bench', action='store_true',
                   help='time onnxruntime vs PyTorch deploy on the same '
                   'input (interleaved, median)')
    p.add_argument('--repeats', type=int, default=20,
                   help='--bench timed rounds (default 20)')
    p.add_argument('--warmup', type=int, default=3,
                   help='--bench untimed rounds (default 3)')
    p.add_argument('--threads', type=int,
                   help='threads of both PyTorch and onnxruntime')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override settings in the config, key=value')
    add_cli_args(p)
    return p.parse_args(argv)


def print_report(r: dict) -> None:
    print(f'exported {r["exported"]} -> {r["output"]} '
          f'({r["size"] / 2**20:.2f} MiB, opset {r["opset"]})')
    print(f'  checkpoint       : {r["checkpoint_form"]} form, '
          f'{r["blocks"]} RepVGG block(s)')
    shapes = ', '.join(f'{b}x3x{hw[0]}x{hw[1]}' for b, hw in r['checks'])
    print(f'  verification     : onnxruntime vs PyTorch on {shapes}: max rel '
          f'err {r["max_rel"]:.3g} ({r["worst"]})')
    ops = ', '.join(f'{op} {n}' for op, n in r['ops'].most_common())
    print(f'  operators        : {ops}')
    if 'leftovers' in r:
        if r['leftovers']:
            print('  backbone ops     : not only Conv + activation: ' +
                  ', '.join(f'{k} {v}' for k, v in r['leftovers'].items()))
        else:
            print('  backbone ops     : Conv + activation only (no '
                  'BatchNormalization, no Add)')
    if 'bench' in r:
        b = r['bench']
        shape = 'x'.join(str(s) for s in b['shape'])
        print(f'  bench ({shape}, median of {b["repeats"]}): PyTorch '
              f'{b["pytorch"] * 1e3:.2f} ms, onnxruntime '
              f'{b["onnxruntime"] * 1e3:.2f} ms, onnxruntime/PyTorch '
              f'{b["ratio"]:.2f}')


def run(args) -> int:
    import torch

    import mmrepvgg  # noqa: F401  (registers modules and safe globals)
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.apis.export import ExportError, export_onnx

    if args.repeats < 1 or args.warmup < 0:
        raise ExportError('--repeats must be >= 1 and --warmup >= 0')
    if args.threads is not None:
        if args.threads < 1:
            raise ExportError(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options)
    report = export_onnx(
        cfg, args.config, args.checkpoint, args.output,
        backbone_only=args.backbone_only, shape=args.shape,
        opset=args.opset, device=args.device, tolerance=args.tolerance,
        unsafe_load=args.unsafe_load, bench=args.bench,
        repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    print_report(report)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmrepvgg.utils.cli import run_cli
    return run_cli(lambda: run(args), debug=args.debug)


if __name__ == '__main__':
    sys.exit(main())
