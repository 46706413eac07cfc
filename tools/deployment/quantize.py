#!/usr/bin/env python
"""Quantize a fused RepVGG model to INT8 for onnxruntime (and OpenVINO) on
CPUs.

    python tools/deployment/quantize.py CONFIG CHECKPOINT OUT.onnx  # detector
    python tools/deployment/quantize.py CONFIG CHECKPOINT OUT.onnx \\
        --backbone-only \\
        --layers --bench 30

Exports the deploy-form model (a training checkpoint is fused first) to ONNX
and quantizes it statically with onnxruntime.quantization: QDQ format,
per-channel symmetric INT8 weights, 8-bit activations calibrated on
--calib-images real images of the config's train split through its test
pipeline and data preprocessor. The end-to-end detector graph keeps its
post-processing (score activation, decoding, TopK, NMS) in float; only the
convs and what feeds them are quantized. The INT8 graph is run on
--verify-images val images next to the FP32 graph: per-output SQNR and
relative error are printed, and every quantized output must reach
--min-sqnr dB. --layers adds the per-conv-layer SQNR (accumulated,
activation alone, weights), --bench times FP32 vs INT8 onnxruntime.
--backend nncf quantizes the same region with NNCF instead (QDQ file,
verified alike); with --max-drop X, NNCF's accuracy control keeps the bbox
mAP (the config's evaluator on --verify-split, --ac-images images) within X
of FP32, and the result is measured again before it is written.
Every output (OUT.onnx, --save-fp32, --layers-json) is checked against every
input (config and its bases, checkpoint, annotation files) and the
other outputs before any work, and all are written together at the very
end; any bad input exits 1 with one ``error: ...`` line (2 for a command
line that does not parse) and writes nothing. Intermediate graphs live in a
private temporary folder that the next run removes if this one was killed.
"""
import importlib.util
import os.path as osp
import runpy


def parse_args(argv=None):
    from mmrepvgg.export.quantize import (BACKENDS, CALIBRATION_METHODS,
                                          DEFAULT_CALIB_IMAGES,
                                          DEFAULT_MIN_SQNR,
                                          DEFAULT_VERIFY_IMAGES,
                                          QUANT_FORMATS, QUANT_TYPES)
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(
        description='Post-training static INT8 quantization of a fused '
        'RepVGG detector or backbone (onnxruntime), calibrated on real '
        'images and verified against FP32.')
    p.add_argument('config', help='model config (training or deploy twin)')
    p.add_argument('checkpoint', help='training-form or deploy checkpoint')
    p.add_argument('output', help='the INT8 .onnx file')
    p.add_argument('--backbone-only', action='store_true',
                   help='quantize the backbone alone (default: the '
                   'end-to-end detector graph)')
    p.add_argument('--img-shape-input', action='store_true',
                   help='detector graph with the img_shape input (boxes '
                   'clipped to each image inside the padded batch, as '
                   'tools/deployment/export_onnx.py --img-shape-input)')
    p.add_argument('--calib-images', type=int, default=DEFAULT_CALIB_IMAGES,
                   help='calibration images, spread evenly over the split '
                   f'(all if fewer); default {DEFAULT_CALIB_IMAGES}')
    p.add_argument('--calib-split', choices=['train', 'val', 'test'],
                   default='train',
                   help='split the calibration images come from; default '
                   'train (not the evaluation images)')
    p.add_argument('--verify-images', type=int,
                   default=DEFAULT_VERIFY_IMAGES,
                   help='images of --verify-split on which INT8 is compared '
                   f'with FP32; default {DEFAULT_VERIFY_IMAGES}')
    p.add_argument('--verify-split', choices=['train', 'val', 'test'],
                   default='val', help='default val')
    p.add_argument('--min-sqnr', type=float, default=DEFAULT_MIN_SQNR,
                   help='smallest SQNR (dB) of a quantized output against '
                   f'FP32 before refusing to write; default '
                   f'{DEFAULT_MIN_SQNR:g}')
    p.add_argument('--backend', choices=BACKENDS, default='onnxruntime',
                   help='the quantizer: onnxruntime (default) or nncf (pip '
                   'install -e .[openvino]); the same region, calibration '
                   'and verification')
    p.add_argument('--max-drop', type=float, metavar='X',
                   help='nncf: accuracy control, the largest absolute bbox '
                   'mAP drop vs FP32 on --verify-split (default: no '
                   'accuracy control)')
    p.add_argument('--ac-images', type=int, metavar='N',
                   help='images of --verify-split the accuracy control '
                   'evaluates (default: all)')
    p.add_argument('--max-iterations', type=int, metavar='N',
                   help='accuracy-control iterations at most (each reverts '
                   'a group of quantizers and evaluates); default 8')
    q = p.add_argument_group('quantization of --backend onnxruntime '
                             '(defaults: the measured best)')
    q.add_argument('--format', choices=QUANT_FORMATS, default='QDQ',
                   help='QDQ (fused into QLinearConv by onnxruntime) or '
                   'QOperator; default QDQ')
    q.add_argument('--activation-type', choices=QUANT_TYPES,
                   default='uint8', help='default uint8 (asymmetric)')
    q.add_argument('--weight-type', choices=QUANT_TYPES, default='int8',
                   help='default int8 (symmetric)')
    q.add_argument('--per-tensor', action='store_true',
                   help='one weight scale per tensor instead of per output '
                   'channel')
    q.add_argument('--reduce-range', action='store_true',
                   help='7-bit weights (CPUs without VNNI)')
    q.add_argument('--symmetric-activations', action='store_true',
                   help='zero point 0 for activations')
    q.add_argument('--calibration', choices=CALIBRATION_METHODS,
                   default='MinMax', help='default MinMax')
    q.add_argument('--percentile', type=float, default=99.999,
                   help='percentile of --calibration Percentile; default '
                   '99.999')
    p.add_argument('--layers', action='store_true',
                   help='print the per-conv-layer SQNR table')
    p.add_argument('--layers-json', metavar='PATH.json',
                   help='write the per-layer rows as JSON (implies '
                   '--layers)')
    p.add_argument('--bench', type=int, default=0, metavar='ROUNDS',
                   help='time FP32 vs INT8 onnxruntime on one verification '
                   'image with this many interleaved rounds')
    p.add_argument('--save-fp32', metavar='PATH',
                   help='also write the FP32 graph the INT8 one comes from')
    p.add_argument('--threads', type=int,
                   help='onnxruntime (and PyTorch) threads')
    add_cli_args(p, cfg_options=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def _db(v: float) -> str:
    return f'{v:.1f} dB' if v == v and abs(v) != float('inf') else str(v)


def _ops(hist: dict, n: int) -> str:
    items = sorted(hist.items(), key=lambda kv: -kv[1])
    text = ', '.join(f'{k} {v}' for k, v in items[:n])
    return text + (f', ... ({len(items) - n} more op types)'
                   if len(items) > n else '')


def print_report(r: dict) -> None:
    mib = 2**20
    print(f'quantized {r["exported"]} -> {r["output"]} '
          f'({r["size"] / mib:.2f} MiB; FP32 {r["size_fp32"] / mib:.2f} '
          'MiB)')
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
    convs = r['ops_fp32'].get('Conv', 0)
    print(f'  onnxruntime ops: {ops.get("QLinearConv", 0)} of {convs} convs '
          f'run as QLinearConv; {_ops(ops, 10)}')
    v = r['verification']
    print(f'  verification   : INT8 vs FP32 on {v["images"]} {v["split"]} '
          'images')
    for name, e in r['errors'].items():
        extra = f', shapes differ on {e["shape_mismatch"]}' if \
            e.get('shape_mismatch') else ''
        print(f'    {e["kind"]:8s} {name}: SQNR {_db(e["sqnr_db"])}, max '
              f'rel err {e["rel_err"]:.3g}{extra}')
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
        print()
        print(format_layer_table({'INT8': r['layers']}))


def run(args) -> int:
    import mmrepvgg  # noqa: F401  (registers modules and safe globals)
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.export.quantize import (QuantConfig, QuantizeError,
                                          quantize_checkpoint)
    from mmrepvgg.export.runtime import set_threads
    set_threads(args.threads)
    qcfg = QuantConfig(
        quant_format=args.format, activation_type=args.activation_type,
        weight_type=args.weight_type, per_channel=not args.per_tensor,
        reduce_range=args.reduce_range, calibrate_method=args.calibration,
        percentile=args.percentile,
        symmetric_activations=args.symmetric_activations)
    layers = args.layers or args.layers_json is not None
    if layers and args.format != 'QDQ':
        raise QuantizeError('--layers needs --format QDQ (it reads the '
                            'quantization parameters of the QDQ pairs)')
    cfg = load_config(args.config, args.cfg_options)
    report = quantize_checkpoint(
        cfg, args.config, args.checkpoint, args.output,
        backbone_only=args.backbone_only,
        img_shape_input=args.img_shape_input, calib_images=args.calib_images,
        calib_split=args.calib_split, verify_images=args.verify_images,
        verify_split=args.verify_split, config=qcfg,
        min_sqnr=args.min_sqnr, threads=args.threads,
        unsafe_load=args.unsafe_load, layers=layers, bench=args.bench,
        fp32_output=args.save_fp32, layers_json=args.layers_json,
        backend=args.backend, max_drop=args.max_drop,
        ac_images=args.ac_images, max_iterations=args.max_iterations)
    print_report(report)
    if args.layers_json:
        print(f'wrote {args.layers_json}')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
