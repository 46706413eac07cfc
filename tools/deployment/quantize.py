#!/usr/bin/env python
"""Quantize a fused RepVGG detector (or its backbone) to INT8 for CPUs.

    python tools/deployment/quantize.py CONFIG CHECKPOINT OUT.onnx \\
        [--backbone-only] [--layers] [--bench 30] [--backend nncf]

Exports the deploy-form model to ONNX, quantizes its conv region calibrated
on real images of the config and refuses to write it when a quantized output
is below --min-sqnr dB against FP32 on other images. Outputs are written
together at the end; a bad input is one ``error:`` line and no file.
"""
import importlib.util
import inspect
import os.path as osp
import runpy
from collections import Counter


def parse_args(argv=None):
    from mmrepvgg.export.quantize import (BACKENDS, DEFAULT_CALIB_IMAGES,
                                          DEFAULT_MIN_SQNR,
                                          DEFAULT_VERIFY_IMAGES)
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='model config (training or deploy twin)')
    p.add_argument('checkpoint', help='training-form or deploy checkpoint')
    p.add_argument('output', help='the INT8 .onnx file')
    p.add_argument('--backbone-only', action='store_true',
                   help='the backbone alone, not the detector end to end')
    p.add_argument('--img-shape-input', action='store_true',
                   help='detector graph with the img_shape input, as '
                   'export_onnx.py --img-shape-input')
    p.add_argument('--calib-images', type=int, default=DEFAULT_CALIB_IMAGES,
                   help='calibration images, spread over the split')
    p.add_argument('--calib-split', choices=['train', 'val', 'test'],
                   default='train')
    p.add_argument('--verify-images', type=int,
                   default=DEFAULT_VERIFY_IMAGES,
                   help='images on which INT8 is compared with FP32')
    p.add_argument('--verify-split', choices=['train', 'val', 'test'],
                   default='val')
    p.add_argument('--min-sqnr', type=float, default=DEFAULT_MIN_SQNR,
                   help='smallest SQNR (dB) of a quantized output against '
                   'FP32 before refusing to write')
    p.add_argument('--weight-type', choices=['int8', 'uint8'],
                   default='int8',
                   help='onnxruntime backend: uint8 avoids the int16 '
                   'saturation of CPUs without VNNI (slower)')
    p.add_argument('--backend', choices=BACKENDS, default='onnxruntime',
                   help='the quantizer (nncf: pip install -e .[openvino])')
    p.add_argument('--max-drop', type=float, metavar='X',
                   help='nncf: accuracy control, the largest absolute bbox '
                   'mAP drop vs FP32 on the --verify-images')
    p.add_argument('--layers', action='store_true',
                   help='print the per-conv-layer SQNR table')
    p.add_argument('--layers-json', metavar='PATH.json',
                   help='write the per-layer rows as JSON')
    p.add_argument('--bench', type=int, default=0, metavar='ROUNDS',
                   help='time FP32 vs INT8 onnxruntime on one image')
    p.add_argument('--save-fp32', dest='fp32_output', metavar='PATH',
                   help='also write the FP32 graph')
    p.add_argument('--threads', type=int,
                   help='onnxruntime (and PyTorch) threads')
    add_cli_args(p, cfg_options=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def _ops(hist: dict, n: int) -> str:
    items = Counter(hist).most_common()
    more = f', ... ({len(items) - n} more op types)' if len(items) > n else ''
    return ', '.join(f'{k} {v}' for k, v in items[:n]) + more


def print_report(r: dict) -> None:
    mib = 2**20
    print(f'quantized {r["exported"]} -> {r["output"]} ({r["size"] / mib:.2f}'
          f' MiB; FP32 {r["size_fp32"] / mib:.2f} MiB)')
    print(f'  checkpoint     : {r["checkpoint_form"]} form, {r["blocks"]} '
          'RepVGG block(s)')
    if 'postprocess' in r:
        print(f'  post-processing: {r["postprocess"]} (float)')
    print(f'  quantization   : {r["backend"]}: {r["config"]}')
    if 'accuracy' in r:
        a = r['accuracy']
        print(f'  accuracy ctrl  : bbox mAP on {a["images"]} of {a["of"]} '
              f'{a["split"]} images: FP32 {a["fp32_map"]:.4f}, INT8 '
              f'{a["int8_map"]:.4f} (drop {a["drop"]:+.4f}, --max-drop '
              f'{a["max_drop"]:g}; {a["evaluations"]} evaluations)')
    c = r['calibration']
    shapes = ', '.join('x'.join(map(str, s)) for s in c['shapes'])
    print(f'  calibration    : {c["images"]} of {c["of"]} {c["split"]} '
          f'images through the test pipeline ({shapes})')
    kept = _ops(r['excluded_ops'], 8)
    print(f'  quantized nodes: {r["quantized"]}; left in float: '
          f'{r["excluded"]}' + (f' ({kept})' if kept else ''))
    ops = r['runtime_ops']
    print(f'  onnxruntime ops: {ops["QLinearConv"]} of '
          f'{r["ops_fp32"]["Conv"]} convs run as QLinearConv; '
          f'{_ops(ops, 10)}')
    v = r['verification']
    print(f'  verification   : INT8 vs FP32 on {v["images"]} {v["split"]} '
          'images')
    for name, e in r['errors'].items():
        print(f'    {e["kind"]:8s} {name}: SQNR {e["sqnr_db"]:.1f} dB, max '
              f'rel err {e["rel_err"]:.3g}')
    if 'detections' in r:
        d = r['detections']
        print(f'    detections: {d["matched"]} of {d["reference_detections"]}'
              f' FP32 detections matched by INT8 ones (same label, box '
              f'within {d["box_tol"]:.2g} px, score within '
              f'{d["score_tol"]:g}); INT8 has {d["detections"]}, '
              f'{len(d["differing"])} image(s) differ')
    if 'bench' in r:
        t = r['bench']['timing']
        print(f'  onnxruntime    : {"x".join(map(str, r["bench"]["shape"]))}: '
              f'FP32 {t.median("fp32") * 1e3:.2f} ms, INT8 '
              f'{t.median("int8") * 1e3:.2f} ms, INT8/FP32 '
              f'{t.ratio("int8", "fp32")["median"]:.3f} ({t.describe()})')
    if 'layers' in r:
        from mmrepvgg.export.quantize import format_layer_table
        print('\n' + format_layer_table({'INT8': r['layers']}))


def run(args) -> int:
    import mmrepvgg  # noqa: F401  (registers modules and safe globals)
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.export.quantize import quantize_checkpoint
    from mmrepvgg.export.runtime import set_threads
    set_threads(args.threads)
    params = inspect.signature(quantize_checkpoint).parameters
    report = quantize_checkpoint(
        load_config(args.config, args.cfg_options), args.config,
        **{k: v for k, v in vars(args).items() if k in params})
    print_report(report)
    if args.layers_json:
        print(f'wrote {args.layers_json}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
