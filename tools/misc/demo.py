#!/usr/bin/env python
"""End-to-end demo on real aerial images: tree crowns -> train -> convert ->
test both forms -> ONNX -> INT8 -> speed.

    python tools/misc/demo.py [--work-dir work_dirs/demo] [--epochs N]

Numbers come from machine-readable results, logs go to the work dir
(docs/get_started.md#the-demo). Exits 1 if a form's AP50 or mAP differs from
the one before it, INT8 loses more than --max-int8-drop or training reaches
less than --min-ap50.
"""
import argparse
import importlib.util
import json
import os
import os.path as osp
import runpy
import sys
import time

ROOT = osp.abspath(osp.join(__file__, '../../..'))  # the repository
CONFIG = osp.join(ROOT,
                  'configs/neon_trees/atss_repvgg-a0_fpn_neon-trees.py')
ONNX_FORM = 'ONNX FP32 end to end'
INT8_FORM = 'ONNX INT8 end to end'


def _shown(cmd) -> str:
    return ' '.join(osp.relpath(c, ROOT) if osp.isabs(c) else c for c in cmd)


def run_step(step: str, cmd, log: str = '', fn=None):
    """Run the tool command ``cmd`` in a child process, its output into
    ``log``, or ``fn()``, the package function behind it."""
    from mmrepvgg.apis.sweep import run_logged
    from mmrepvgg.utils.cli import ToolError
    print(f'\n==> {step}\n    {"same as:" if fn else "$"} {_shown(cmd)}',
          flush=True)
    t0 = time.time()
    try:
        if fn is not None:
            return fn()
        run_logged(cmd, log, _shown(cmd[1:2]), cwd=ROOT)
    except ToolError as e:
        raise SystemExit(f'{step} failed: {e}') from None
    print(f'    done in {time.time() - t0:.0f} s (log: '
          f'{osp.relpath(log, ROOT)})', flush=True)


def ground_truth_dump(ann_file: str, like: str, out: str) -> str:
    """The boxes of ``ann_file`` (COCO) as a ``tools/test.py --out`` pickle
    in the image order of the pickle ``like``."""
    import pickle
    import numpy as np
    with open(ann_file) as f:
        coco = json.load(f)
    boxes = {i['file_name']: [] for i in coco['images']}
    names = {i['id']: i['file_name'] for i in coco['images']}
    for a in coco['annotations']:
        if not a['iscrowd']:
            x, y, w, h = a['bbox']
            boxes[names[a['image_id']]].append([x, y, x + w, y + h])
    with open(like, 'rb') as f:
        order = [r['img_path'] for r in pickle.load(f)]
    dump = [dict(img_path=p, pred_instances=dict(
        bboxes=np.asarray(boxes[osp.basename(p)], np.float32).reshape(-1, 4),
        scores=np.ones(len(boxes[osp.basename(p)]), np.float32),
        labels=np.zeros(len(boxes[osp.basename(p)]), np.int64)))
        for p in order]
    with open(out, 'wb') as f:
        pickle.dump(dump, f)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    p.add_argument('--epochs', type=int,
                   help="training epochs (default: the config's)")
    p.add_argument('--min-ap50', type=float, default=0.2,
                   help='lowest accepted hold-out AP50 of the training form')
    p.add_argument('--max-int8-drop', type=float, default=0.02,
                   help='largest accepted INT8 AP50 drop vs ONNX FP32')
    args = p.parse_args(argv)
    wd = osp.abspath(args.work_dir)
    os.makedirs(osp.join(wd, 'onnx'), exist_ok=True)
    py, tools = sys.executable, osp.join(ROOT, 'tools')
    t_start = time.time()

    run_step('1/7 fetch and tile the NEON tree-crown images',
             [py, osp.join(tools, 'dataset_converters', 'neon_tree_crowns.py'),
              '--out', osp.join(ROOT, 'data', 'neon_trees')],
             osp.join(wd, 'data.log'))
    import mmrepvgg  # noqa: F401  (registers the modules)
    from mmrepvgg.apis.convert import convert_checkpoint, load_config
    from mmrepvgg.apis.sweep import test_metrics
    from mmrepvgg.benchmark.detector import demo_summary, side_by_side
    from mmrepvgg.export.onnx_export import export_onnx
    from mmrepvgg.export.quantize import quantize_checkpoint
    os.chdir(ROOT)  # the configs' data_root is relative to the repository
    cfg = load_config(CONFIG)
    epochs = args.epochs or cfg.train_cfg.max_epochs
    train_dir = osp.join(wd, 'train')
    run_step(f'2/7 train the RepVGG-A0 detector on CPU from scratch '
             f'({epochs} epochs)',
             [py, osp.join(tools, 'train.py'), CONFIG, '--work-dir',
              train_dir, '--cfg-options',
              f'train_cfg.max_epochs={epochs}',
              f'param_scheduler.1.end={epochs}',  # the cosine decay too
              f'train_cfg.val_interval={epochs}',
              f'default_hooks.checkpoint.interval={epochs}'],
             osp.join(wd, 'train.log'))

    ckpt = osp.join(train_dir, f'epoch_{epochs}.pth')
    deploy_ckpt = osp.join(wd, 'deploy', 'trees_deploy.pth')
    deploy_cfg = osp.splitext(deploy_ckpt)[0] + '.py'
    conv = run_step(
        '3/7 convert to the deploy form',
        ['tools/convert_deploy.py', CONFIG, ckpt, deploy_ckpt],
        fn=lambda: convert_checkpoint(cfg, CONFIG, ckpt, deploy_ckpt))
    print(f'    {conv["blocks"]} blocks fused, {conv["convs_before"]} -> '
          f'{conv["convs_after"]} convs')

    def test(step: str, config: str, checkpoint: str, name: str):
        """``tools/test.py`` on ``checkpoint``: (metrics, detections .pkl)."""
        out = osp.join(wd, f'det_{name}.pkl')
        work = osp.join(wd, f'test_{name}')
        run_step(step, [py, osp.join(tools, 'test.py'), config, checkpoint,
                        '--work-dir', work, '--out', out],
                 osp.join(wd, f'test_{name}.log'))
        value = test_metrics(work)
        print(f'    AP50 {value["AP50"]:.3f}, mAP {value["mAP"]:.3f}')
        return value, out

    m_a, _ = test('4/7 test the training form', CONFIG, ckpt, 'training')
    m_b, out_b = test('4/7 test the deploy form', deploy_cfg, deploy_ckpt,
                      'deploy')
    onnx_file = osp.join(wd, 'onnx', 'trees_end2end.onnx')
    exp = run_step(
        '5/7 export the deploy model end to end to ONNX',
        ['tools/deployment/export_onnx.py', deploy_cfg, deploy_ckpt, onnx_file,
         '--postprocess', '--img-shape-input', '--verify-images', '8'],
        fn=lambda: export_onnx(
            load_config(deploy_cfg), deploy_cfg, deploy_ckpt, onnx_file,
            mode='end2end', img_shape_input=True, verify_images=8))
    print(f'    verified on {", ".join(exp.batches)}: '
          f'{exp.predict_check["matched"]} of '
          f'{exp.predict_check["reference_detections"]} detections of '
          "mmdet's predict matched")
    m_c, _ = test('5/7 test the ONNX file (onnxruntime in the same test '
                  'loop)', CONFIG, onnx_file, 'onnx')
    int8_file = osp.join(wd, 'onnx', 'trees_end2end_int8.onnx')
    q = run_step(
        '6/7 quantize the end-to-end graph to INT8 (calibrated on 64 '
        'training tiles)',
        ['tools/deployment/quantize.py', deploy_cfg, deploy_ckpt, int8_file,
         '--img-shape-input'],
        fn=lambda: quantize_checkpoint(load_config(deploy_cfg), deploy_cfg,
                                       deploy_ckpt, int8_file,
                                       img_shape_input=True))
    print(f'    {q["runtime_ops"].get("QLinearConv", 0)} of '
          f'{q["ops_fp32"].get("Conv", 0)} convs run as QLinearConv')
    m_d, out_d = test('6/7 test the INT8 file (onnxruntime in the same '
                      'test loop)', CONFIG, int8_file, 'int8')
    truth = ground_truth_dump(
        osp.join(cfg.data_root, cfg.val_dataloader.dataset.ann_file), out_b,
        osp.join(wd, 'ground_truth.pkl'))
    picture = side_by_side(
        {'ground truth': truth, 'PyTorch deploy': out_b, 'ONNX INT8': out_d},
        osp.join(wd, 'trees_truth_deploy_int8.png'), cfg.classes,
        score_thr=0.2)  # ATSS scores are class x centerness: they run low
    print('\n==> 7/7 speed of the forms (side by side, median)', flush=True)
    forms = {'PyTorch training': m_a, 'PyTorch deploy': m_b, ONNX_FORM: m_c,
             INT8_FORM: m_d}
    speed = demo_summary(cfg, CONFIG, ckpt, {ONNX_FORM: onnx_file,
                                             INT8_FORM: int8_file},
                         {k: v['AP50'] for k, v in forms.items()},
                         openvino=True, map_label='hold-out AP50')

    def same(x, y):
        return all(f'{x[k]:.3f}' == f'{y[k]:.3f}' for k in ('AP50', 'mAP'))

    ok_equal, ok_onnx = same(m_a, m_b), same(m_b, m_c)
    ok_int8 = m_d['AP50'] >= m_c['AP50'] - args.max_int8_drop

    def show(m):
        return f'AP50 {m["AP50"]:.3f}, mAP {m["mAP"]:.3f}'

    print('\n' + '=' * 64 + '\nmmrepvgg demo summary (NEON tree crowns, '
          'spatial hold-out)\n' + '=' * 64)
    print(f'training form           : {show(m_a)}')
    print(f'deploy form             : {show(m_b)}   '
          f'(equal to 3 decimals: {"yes" if ok_equal else "NO"})')
    print(f'ONNX end to end         : {show(m_c)}   (equal to the deploy '
          f'form to 3 decimals: {"yes" if ok_onnx else "NO"})')
    print(f'ONNX INT8               : {show(m_d)}   '
          f'({m_d["AP50"] - m_c["AP50"]:+.3f} AP50 vs ONNX FP32)')
    v = conv['verify']
    print(f'raw output error        : deploy {v["error"]:.3g} vs float64, '
          f'training form\'s own float32 error {v["noise"]:.3g} (backbone, '
          'neck, head)')
    print(f'truth | deploy | INT8   : {osp.relpath(picture, ROOT)}')
    print('end to end (preprocessed tile in, detections out; PyTorch = '
          'network + mmdet post-processing):')
    print('    ' + speed['table'].replace('\n', '\n    '))
    for form, why in speed.get('skipped', {}).items():
        print(f'    {form}: not timed ({why})')
    print(f'total time              : {time.time() - t_start:.0f} s; '
          f'logs and outputs in {osp.relpath(wd, ROOT)}/')
    failed = [text for ok, text in (
        (m_a['AP50'] >= args.min_ap50,
         f'training AP50 {m_a["AP50"]:.3f} < {args.min_ap50}'),
        (ok_equal, 'deploy AP50/mAP differ from the training form\'s'),
        (ok_onnx, 'ONNX end-to-end AP50/mAP differ from the deploy form\'s'),
        (ok_int8, f'INT8 AP50 {m_d["AP50"]:.3f} is more than '
         f'{args.max_int8_drop} below ONNX FP32 {m_c["AP50"]:.3f}')) if not ok]
    for text in failed:
        print(f'FAILED: {text}')
    return 1 if failed else 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](
        main, exit_on_ctrl_c=False)
