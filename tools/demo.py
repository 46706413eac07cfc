#!/usr/bin/env python
"""End-to-end demo: toy data -> train -> convert -> test both forms -> ONNX
-> speed.

    python tools/demo.py [--work-dir work_dirs/demo] [--epochs 24]

1. generates the toy shapes dataset (tools/make_toy_dataset.py),
2. trains the tiny RepVGG RetinaNet on CPU with tools/train.py,
3. converts the checkpoint with tools/convert_deploy.py,
4. tests the training form and the deploy form with tools/test.py,
5. exports the deploy model end to end (post-processing in the graph) with
   tools/export_onnx.py --postprocess and tests the ONNX file with
   tools/test.py (onnxruntime in mmdet's test loop),
6. quantizes it to INT8 (tools/quantize.py, calibrated on training images),
   tests the INT8 file the same way and draws the deploy and INT8
   detections side by side (one PNG),
7. compares detections and times every form side by side (one table).
Exits non-zero if the deploy or ONNX mAP differs from the training mAP (3
decimals), the INT8 mAP is more than --max-int8-drop below the ONNX FP32 mAP,
or the training mAP is below --min-map.
"""
import argparse
import os
import warnings
import os.path as osp
import pickle
import re
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if __name__ == '__main__':  # stdlib only, before torch/mmengine are imported
    __import__('runpy').run_path(osp.join(ROOT, 'mmrepvgg', 'utils',
                                          'quiet.py'))['silence_warnings']()
CONFIG = osp.join(ROOT, 'configs/toy/retinanet_repvgg-tiny_repvgg-fpn_toy.py')
PROGRESS = re.compile(r'Epoch\((train|val)\)|bbox_mAP_copypaste|converted|'
                      r'blocks converted|parameters|conv layers|file size|'
                      r'verification|forward latency|^error|^exported |'
                      r'test_cfg in graph|raw tensors|images identical|'
                      r'SQNR|^wrote|^quantized')


def run(step: str, cmd, log_path: str) -> str:
    """Run ``cmd``, echo progress lines, keep the full log; return stdout."""
    print(f'\n==> {step}', flush=True)
    shown = [osp.relpath(c, ROOT) if osp.isabs(c) else c for c in cmd]
    print('    $ ' + ' '.join(shown), flush=True)
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    lines = []
    with open(log_path, 'w') as log, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            if PROGRESS.search(line):
                print('    ' + _short(line.rstrip()), flush=True)
        proc.wait()
    if proc.returncode:
        tail = ''.join(lines[-20:])
        raise SystemExit(f'{step} failed (exit {proc.returncode}); full log: '
                         f'{log_path}\n{tail}')
    return ''.join(lines)


def _short(line: str) -> str:
    # "11/22 00:20:46 - mmengine - INFO - Epoch(train) [23][10/12] ..." ->
    # "Epoch(train) [23][10/12] ...", without eta/time/data_time noise.
    line = re.sub(r'^.*? - mmengine - \w+ - ', '', line)
    line = re.sub(r'\s+(eta|time|data_time|memory):\s+\S+', '', line)
    return line


def parse_map(output: str) -> float:
    m = re.findall(r'bbox_mAP_copypaste: ([\d.]+)', output)
    if not m:
        raise SystemExit('could not find bbox_mAP in the test output')
    return float(m[-1])


def compare_detections(pkl_a: str, pkl_b: str) -> dict:
    with open(pkl_a, 'rb') as f:
        a = pickle.load(f)  # written by our own tools/test.py run
    with open(pkl_b, 'rb') as f:
        b = pickle.load(f)
    import numpy as np
    box_diff = score_diff = 0.0
    count_mismatch = 0
    for ra, rb in zip(a, b):
        pa, pb = ra['pred_instances'], rb['pred_instances']
        ba, bb = np.asarray(pa['bboxes']), np.asarray(pb['bboxes'])
        if ba.shape != bb.shape or not np.array_equal(
                np.asarray(pa['labels']), np.asarray(pb['labels'])):
            count_mismatch += 1
            continue
        if ba.size:
            box_diff = max(box_diff, float(np.abs(ba - bb).max()))
            score_diff = max(score_diff, float(np.abs(
                np.asarray(pa['scores']) - np.asarray(pb['scores'])).max()))
    return dict(images=len(a), mismatched_images=count_mismatch,
                box=box_diff, score=score_diff)


def time_forms(train_cfg: str, train_ckpt: str, deploy_cfg: str,
               deploy_ckpt: str, batch: int, repeats: int) -> dict:
    """Median latency of both forms, measured interleaved in one process."""
    warnings.filterwarnings('ignore', category=UserWarning)
    import torch
    sys.path.insert(0, ROOT)
    import mmrepvgg  # noqa: F401
    from mmrepvgg.apis.convert import (build_model, load_config, load_weights,
                                       make_inputs, measure_latency,
                                       read_state_dict, test_input_shape)

    def load(cfg_path, ckpt_path):
        cfg = load_config(cfg_path)
        model = build_model(cfg)
        load_weights(model, read_state_dict(ckpt_path)[0], ckpt_path,
                     cfg_path)
        return cfg, model.eval()

    cfg, train_model = load(train_cfg, train_ckpt)
    _, deploy_model = load(deploy_cfg, deploy_ckpt)
    x, samples = make_inputs(test_input_shape(cfg), batch=batch)
    ta, tb = measure_latency([train_model, deploy_model], x, samples,
                             repeats=repeats, warmup=3)
    med = dict(training=ta, deploy=tb)
    med['shape'] = tuple(x.shape)
    med['threads'] = torch.get_num_threads()
    return med


def time_end_to_end(config: str, ckpt: str, onnx_files: dict, maps: dict,
                    repeats: int) -> dict:
    """End-to-end latency (preprocessed image in, detections out) of the
    PyTorch forms (network + mmdet post-processing) and the ONNX graph,
    interleaved, with the benchmark's timing (disturbed rounds dropped)."""
    sys.path.insert(0, ROOT)
    import mmrepvgg  # noqa: F401
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.benchmark.detector import demo_summary
    return demo_summary(load_config(config), config, ckpt, onnx_files,
                        maps, bf16=False, batch=1, repeats=repeats, warmup=3)


def draw_side_by_side(results: dict, out_file: str) -> str:
    sys.path.insert(0, ROOT)
    from mmengine.config import Config

    from mmrepvgg.benchmark.detector import side_by_side
    classes = Config.fromfile(CONFIG).classes
    return side_by_side(results, out_file, classes)


ONNX_FORM = 'ONNX FP32 end to end'
INT8_FORM = 'ONNX INT8 end to end'


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
    os.makedirs(wd, exist_ok=True)
    py = sys.executable
    tools = osp.join(ROOT, 'tools')
    t_start = time.time()

    run('1/7 generate the toy dataset',
        [py, osp.join(tools, 'make_toy_dataset.py'), '--out',
         osp.join(ROOT, 'data', 'toy')], osp.join(wd, 'data.log'))
    train_dir = osp.join(wd, 'train')
    run(f'2/7 train the RepVGG detector on CPU ({args.epochs} epochs)',
        [py, osp.join(tools, 'train.py'), CONFIG, '--work-dir', train_dir,
         '--cfg-options', f'train_cfg.max_epochs={args.epochs}',
         f'train_cfg.val_interval={args.epochs}',
         f'default_hooks.checkpoint.interval={args.epochs}'],
        osp.join(wd, 'train.log'))
    ckpt = osp.join(train_dir, f'epoch_{args.epochs}.pth')
    deploy_ckpt = osp.join(wd, 'deploy', 'toy_deploy.pth')
    deploy_cfg = osp.splitext(deploy_ckpt)[0] + '.py'
    conv = run('3/7 convert to the deploy form',
               [py, osp.join(tools, 'convert_deploy.py'), CONFIG, ckpt,
                deploy_ckpt], osp.join(wd, 'convert.log'))
    rel = re.search(r'converted err (\S+), original float32 err (\S+)',
                    conv)

    def test(step: str, config: str, checkpoint: str, name: str):
        """Step ``step``: tools/test.py on ``checkpoint``; (mAP, .pkl)."""
        out = osp.join(wd, f'det_{name}.pkl')
        log = run(step, [py, osp.join(tools, 'test.py'), config, checkpoint,
                         '--work-dir', osp.join(wd, f'test_{name}'),
                         '--out', out], osp.join(wd, f'test_{name}.log'))
        return parse_map(log), out

    map_a, out_a = test('4/7 test the training form', CONFIG, ckpt,
                        'training')
    map_b, out_b = test('4/7 test the deploy form', deploy_cfg, deploy_ckpt,
                        'deploy')
    det = compare_detections(out_a, out_b)
    onnx_file = osp.join(wd, 'onnx', 'toy_end2end.onnx')
    run('5/7 export the deploy model end to end to ONNX',
        [py, osp.join(tools, 'export_onnx.py'), deploy_cfg, deploy_ckpt,
         onnx_file, '--postprocess', '--verify-images', '32'],
        osp.join(wd, 'export_onnx.log'))
    map_c, out_c = test('5/7 test the ONNX file (onnxruntime in the same '
                        'test loop)', CONFIG, onnx_file, 'onnx')
    det_onnx = compare_detections(out_b, out_c)
    int8_file = osp.join(wd, 'onnx', 'toy_end2end_int8.onnx')
    run('6/7 quantize the end-to-end graph to INT8 (calibrated on 64 '
        'training images)',
        [py, osp.join(tools, 'quantize.py'), deploy_cfg, deploy_ckpt,
         int8_file], osp.join(wd, 'quantize.log'))
    map_d, out_d = test('6/7 test the INT8 file (onnxruntime in the same '
                        'test loop)', CONFIG, int8_file, 'int8')
    det_int8 = compare_detections(out_b, out_d)
    picture = draw_side_by_side({'PyTorch deploy': out_b,
                                 'ONNX INT8': out_d},
                                osp.join(wd, 'deploy_vs_int8.png'))
    print('\n==> 7/7 speed of the forms (interleaved, median)', flush=True)
    speed = time_forms(CONFIG, ckpt, deploy_cfg, deploy_ckpt, batch=8,
                       repeats=args.repeats)
    e2e = time_end_to_end(CONFIG, ckpt, {ONNX_FORM: onnx_file,
                                         INT8_FORM: int8_file}, {
        'PyTorch training': map_a, 'PyTorch deploy': map_b,
        ONNX_FORM: map_c, INT8_FORM: map_d}, args.repeats)

    ok_equal = f'{map_a:.3f}' == f'{map_b:.3f}'
    ok_onnx = f'{map_c:.3f}' == f'{map_b:.3f}'
    ok_int8 = map_d >= map_c - args.max_int8_drop
    ok_map = map_a >= args.min_map
    print('\n' + '=' * 64)
    print('mmrepvgg demo summary')
    print('=' * 64)
    print(f'bbox mAP, training form : {map_a:.3f}')
    print(f'bbox mAP, deploy form   : {map_b:.3f}   '
          f'(equal to 3 decimals: {"yes" if ok_equal else "NO"})')
    if rel:
        print(f'raw output error        : deploy {rel.group(1)} vs float64, '
              f'training form\'s own float32 error {rel.group(2)} '
              '(backbone, neck, head; convert_deploy.py)')
    print(f'max detection diff      : boxes {det["box"]:.2e} px, scores '
          f'{det["score"]:.2e} over {det["images"]} images '
          f'({det["mismatched_images"]} with different detections)')
    ta, tb = speed['training'], speed['deploy']
    b, _, h, w = speed['shape']
    print(f'speed (CPU, {speed["threads"]} threads, batch {b}, {h}x{w}) : '
          f'training {ta * 1e3:.1f} ms ({b / ta:.0f} img/s), deploy '
          f'{tb * 1e3:.1f} ms ({b / tb:.0f} img/s): {ta / tb:.2f}x faster '
          '(network only)')
    print(f'bbox mAP, ONNX end to end: {map_c:.3f}   (equal to the deploy '
          f'form to 3 decimals: {"yes" if ok_onnx else "NO"})')
    print(f'ONNX vs deploy detections: boxes {det_onnx["box"]:.2e} px, '
          f'scores {det_onnx["score"]:.2e} over {det_onnx["images"]} images '
          f'({det_onnx["mismatched_images"]} with different detections)')
    print(f'bbox mAP, ONNX INT8     : {map_d:.3f}   ({map_d - map_c:+.3f} vs '
          f'ONNX FP32; INT8 vs deploy detections: '
          f'{det_int8["mismatched_images"]} of {det_int8["images"]} images '
          'differ)')
    print(f'deploy vs INT8 picture  : {osp.relpath(picture, ROOT)}')
    print('end to end (preprocessed image in, detections out; PyTorch = '
          'network + mmdet post-processing):')
    print('    ' + e2e['table'].replace('\n', '\n    '))
    print(f'total time              : {time.time() - t_start:.0f} s; '
          f'logs and outputs in {osp.relpath(wd, ROOT)}/')
    if not ok_map:
        print(f'FAILED: training mAP {map_a:.3f} < {args.min_map}')
    if not ok_equal:
        print('FAILED: deploy mAP differs from training mAP')
    if not ok_onnx:
        print('FAILED: ONNX end-to-end mAP differs from the deploy mAP')
    if not ok_int8:
        print(f'FAILED: INT8 mAP {map_d:.3f} is more than '
              f'{args.max_int8_drop} below ONNX FP32 {map_c:.3f}')
    return 0 if ok_map and ok_equal and ok_onnx and ok_int8 else 1


if __name__ == '__main__':
    sys.exit(main())
