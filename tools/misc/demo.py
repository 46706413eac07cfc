#!/usr/bin/env python
"""End-to-end demo: toy data -> train -> convert -> test both forms -> ONNX
-> INT8 -> speed.

    python tools/misc/demo.py [--work-dir work_dirs/demo] [--epochs 24]

1. generates the toy shapes dataset (tools/misc/make_toy_dataset.py),
2. trains the tiny RepVGG RetinaNet on CPU with tools/train.py,
3. converts the checkpoint (what tools/convert_deploy.py runs),
4. tests the training form and the deploy form with tools/test.py,
5. exports the deploy model end to end, post-processing in the graph (what
   tools/deployment/export_onnx.py --postprocess runs) and tests the ONNX
   file with tools/test.py (onnxruntime in mmdet's test loop),
6. quantizes it to INT8 (what tools/deployment/quantize.py runs, calibrated on
   training images), tests the INT8 file the same way and draws the deploy
   and INT8 detections side by side (one PNG),
7. compares detections and times every form side by side (one table).

Every number comes from a machine-readable result, never from a log: the
metrics JSON that tools/test.py's runner writes into its work dir, the
detection pickles of --out, and the reports the package's convert, export
and quantize functions return. Full logs of the tools go to the work dir.
Exits non-zero if the deploy or ONNX mAP differs from the training mAP (3
decimals), the INT8 mAP is more than --max-int8-drop below the ONNX FP32 mAP,
or the training mAP is below --min-map.
"""
import argparse
import glob
import importlib.util
import json
import os
import os.path as osp
import runpy
import subprocess
import sys
import time

ROOT = osp.abspath(osp.join(__file__, '../../..'))  # the repository
CONFIG = osp.join(ROOT, 'configs/toy/retinanet_repvgg-tiny_repvgg-fpn_toy.py')
ONNX_FORM = 'ONNX FP32 end to end'
INT8_FORM = 'ONNX INT8 end to end'
#: Detections of two float32 forms are the same within these (pixels of the
#: original image, score) ...
FP32_TOL = (0.5, 1e-3)
#: ... and of an INT8 form and a float32 one within these.
INT8_TOL = (2.0, 0.05)


def _shown(cmd) -> str:
    return ' '.join(osp.relpath(c, ROOT) if osp.isabs(c) else c for c in cmd)


def run_tool(step: str, cmd, log_path: str) -> None:
    """Run a tool, its output into ``log_path``; exit with the log's tail if
    it fails."""
    print(f'\n==> {step}\n    $ {_shown(cmd)}', flush=True)
    t0 = time.time()
    with open(log_path, 'w') as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONWARNINGS='ignore'))
    if code:
        with open(log_path) as log:
            tail = ''.join(log.readlines()[-20:])
        raise SystemExit(f'{step} failed (exit {code}); full log: '
                         f'{log_path}\n{tail}')
    print(f'    done in {time.time() - t0:.0f} s (log: '
          f'{osp.relpath(log_path, ROOT)})', flush=True)


def run_step(step: str, cmd, fn):
    """Run ``fn()`` (the package function behind the tool command ``cmd``);
    a refusal exits with its one line."""
    from mmrepvgg.utils.cli import ToolError
    print(f'\n==> {step}\n    same as: {_shown(cmd)}', flush=True)
    try:
        return fn()
    except ToolError as e:
        raise SystemExit(f'{step} failed: {e}') from None


def test_map(work_dir: str) -> float:
    """bbox mAP of the newest run of tools/test.py in ``work_dir``, from the
    metrics JSON mmengine's runner writes (``<time>/<time>.json``)."""
    files = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    if not files:
        raise SystemExit(f'no metrics JSON in {work_dir}')
    with open(files[-1]) as f:
        return float(json.load(f)['coco/bbox_mAP'])


def compare(pkl_a: str, pkl_b: str, tol) -> dict:
    """:func:`mmrepvgg.export.verify.compare_detections` of two
    ``tools/test.py --out`` files."""
    from mmrepvgg.export.verify import compare_detections, dumped_detections
    return compare_detections(dumped_detections(pkl_b),
                              dumped_detections(pkl_a), *tol)


def _diff(d: dict) -> str:
    return (f'boxes {d["max_box"]:.2e} px, scores {d["max_score"]:.2e} over '
            f'{d["images"]} images ({len(d["differing"])} with different '
            'detections)')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    p.add_argument('--epochs', type=int, default=24)
    p.add_argument('--min-map', type=float, default=0.5)
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--max-int8-drop', type=float, default=0.01,
                   help='largest accepted INT8 mAP drop vs ONNX FP32')
    args = p.parse_args(argv)
    wd = osp.abspath(args.work_dir)
    os.makedirs(osp.join(wd, 'onnx'), exist_ok=True)
    py, tools = sys.executable, osp.join(ROOT, 'tools')
    t_start = time.time()

    run_tool('1/7 generate the toy dataset',
             [py, osp.join(tools, 'misc', 'make_toy_dataset.py'), '--out',
              osp.join(ROOT, 'data', 'toy')], osp.join(wd, 'data.log'))
    train_dir = osp.join(wd, 'train')
    run_tool(f'2/7 train the RepVGG detector on CPU ({args.epochs} epochs)',
             [py, osp.join(tools, 'train.py'), CONFIG, '--work-dir',
              train_dir, '--cfg-options',
              f'train_cfg.max_epochs={args.epochs}',
              f'train_cfg.val_interval={args.epochs}',
              f'default_hooks.checkpoint.interval={args.epochs}'],
             osp.join(wd, 'train.log'))

    import mmrepvgg  # noqa: F401  (registers the modules)
    from mmrepvgg.apis.convert import convert_checkpoint, load_config
    from mmrepvgg.benchmark.detector import demo_summary, side_by_side
    from mmrepvgg.export.onnx_export import export_onnx
    from mmrepvgg.export.quantize import quantize_checkpoint
    os.chdir(ROOT)  # the configs' data_root is relative to the repository
    cfg = load_config(CONFIG)
    ckpt = osp.join(train_dir, f'epoch_{args.epochs}.pth')
    deploy_ckpt = osp.join(wd, 'deploy', 'toy_deploy.pth')
    deploy_cfg = osp.splitext(deploy_ckpt)[0] + '.py'
    conv = run_step(
        '3/7 convert to the deploy form',
        ['tools/convert_deploy.py', CONFIG, ckpt, deploy_ckpt],
        lambda: convert_checkpoint(cfg, CONFIG, ckpt, deploy_ckpt))
    print(f'    {conv["blocks"]} blocks fused, {conv["convs_before"]} -> '
          f'{conv["convs_after"]} convs')

    def test(step: str, config: str, checkpoint: str, name: str):
        """``tools/test.py`` on ``checkpoint``: (mAP, detections .pkl)."""
        out = osp.join(wd, f'det_{name}.pkl')
        work = osp.join(wd, f'test_{name}')
        run_tool(step, [py, osp.join(tools, 'test.py'), config, checkpoint,
                        '--work-dir', work, '--out', out],
                 osp.join(wd, f'test_{name}.log'))
        value = test_map(work)
        print(f'    bbox mAP {value:.3f}')
        return value, out

    map_a, out_a = test('4/7 test the training form', CONFIG, ckpt,
                        'training')
    map_b, out_b = test('4/7 test the deploy form', deploy_cfg, deploy_ckpt,
                        'deploy')
    onnx_file = osp.join(wd, 'onnx', 'toy_end2end.onnx')
    exp = run_step(
        '5/7 export the deploy model end to end to ONNX',
        ['tools/deployment/export_onnx.py', deploy_cfg, deploy_ckpt, onnx_file,
         '--postprocess', '--verify-images', '32'],
        lambda: export_onnx(load_config(deploy_cfg), deploy_cfg, deploy_ckpt,
                            onnx_file, mode='end2end', verify_images=32))
    print(f'    verified on {", ".join(exp.batches)}: '
          f'{exp.predict_check["matched"]} of '
          f'{exp.predict_check["reference_detections"]} detections of '
          "mmdet's predict matched")
    map_c, out_c = test('5/7 test the ONNX file (onnxruntime in the same '
                        'test loop)', CONFIG, onnx_file, 'onnx')
    int8_file = osp.join(wd, 'onnx', 'toy_end2end_int8.onnx')
    q = run_step(
        '6/7 quantize the end-to-end graph to INT8 (calibrated on 64 '
        'training images)',
        ['tools/deployment/quantize.py', deploy_cfg, deploy_ckpt, int8_file],
        lambda: quantize_checkpoint(load_config(deploy_cfg), deploy_cfg,
                                    deploy_ckpt, int8_file))
    convs = q['ops_fp32'].get('Conv', 0)
    print(f'    {q["runtime_ops"].get("QLinearConv", 0)} of {convs} convs '
          'run as QLinearConv')
    map_d, out_d = test('6/7 test the INT8 file (onnxruntime in the same '
                        'test loop)', CONFIG, int8_file, 'int8')
    picture = side_by_side({'PyTorch deploy': out_b, 'ONNX INT8': out_d},
                           osp.join(wd, 'deploy_vs_int8.png'), cfg.classes)
    print('\n==> 7/7 speed of the forms (side by side, median)', flush=True)
    speed = demo_summary(cfg, CONFIG, ckpt, {ONNX_FORM: onnx_file,
                                             INT8_FORM: int8_file},
                         {'PyTorch training': map_a, 'PyTorch deploy': map_b,
                          ONNX_FORM: map_c, INT8_FORM: map_d},
                         repeats=args.repeats, network_batch=8)

    ok_equal = f'{map_a:.3f}' == f'{map_b:.3f}'
    ok_onnx = f'{map_c:.3f}' == f'{map_b:.3f}'
    ok_int8 = map_d >= map_c - args.max_int8_drop
    ok_map = map_a >= args.min_map
    det_int8 = compare(out_b, out_d, INT8_TOL)
    v = conv['verify']
    net = speed['network']['timing']
    b, _, h, w = speed['network']['shape']
    ta, tb = net.median('training'), net.median('deploy')
    print('\n' + '=' * 64 + '\nmmrepvgg demo summary\n' + '=' * 64)
    print(f'bbox mAP, training form : {map_a:.3f}')
    print(f'bbox mAP, deploy form   : {map_b:.3f}   '
          f'(equal to 3 decimals: {"yes" if ok_equal else "NO"})')
    print(f'raw output error        : deploy {v["error"]:.3g} vs float64, '
          f'training form\'s own float32 error {v["noise"]:.3g} (backbone, '
          'neck, head)')
    print('max detection diff      : ' +
          _diff(compare(out_a, out_b, FP32_TOL)))
    print(f'speed (CPU, {speed["network"]["threads"]} threads, batch {b}, '
          f'{h}x{w}) : '
          f'training {ta * 1e3:.1f} ms ({b / ta:.0f} img/s), deploy '
          f'{tb * 1e3:.1f} ms ({b / tb:.0f} img/s): '
          f'{net.ratio("training", "deploy")["median"]:.2f}x faster '
          '(network only)')
    print(f'bbox mAP, ONNX end to end: {map_c:.3f}   (equal to the deploy '
          f'form to 3 decimals: {"yes" if ok_onnx else "NO"})')
    print('ONNX vs deploy detections: ' +
          _diff(compare(out_b, out_c, FP32_TOL)))
    print(f'bbox mAP, ONNX INT8     : {map_d:.3f}   ({map_d - map_c:+.3f} vs '
          f'ONNX FP32; INT8 vs deploy detections: '
          f'{len(det_int8["differing"])} of {det_int8["images"]} images '
          'differ)')
    print(f'deploy vs INT8 picture  : {osp.relpath(picture, ROOT)}')
    print('end to end (preprocessed image in, detections out; PyTorch = '
          'network + mmdet post-processing):')
    print('    ' + speed['table'].replace('\n', '\n    '))
    print(f'total time              : {time.time() - t_start:.0f} s; '
          f'logs and outputs in {osp.relpath(wd, ROOT)}/')
    failed = [text for ok, text in (
        (ok_map, f'training mAP {map_a:.3f} < {args.min_map}'),
        (ok_equal, 'deploy mAP differs from training mAP'),
        (ok_onnx, 'ONNX end-to-end mAP differs from the deploy mAP'),
        (ok_int8, f'INT8 mAP {map_d:.3f} is more than {args.max_int8_drop} '
         f'below ONNX FP32 {map_c:.3f}')) if not ok]
    for text in failed:
        print(f'FAILED: {text}')
    return 1 if failed else 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](
        main, exit_on_ctrl_c=False)
