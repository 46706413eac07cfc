#!/usr/bin/env python
"""The README's real-image table: RepVGG-A0, QARepVGG-A0 and ResNet-18
detectors on the NEON tree crowns, over seeds, side by side.

    python tools/analysis_tools/tree_crowns_table.py \\
        --work-dir work_dirs/trees --seeds 0 1 2

Reads the runs ``seed_sweep.py`` trained in the same work dir, one label per
config of :data:`RUNS` (docs/real_images.md): AP50 and mAP per seed of every
form (cached in the seed's ``eval.json``), size, and the first seed's
latencies, all forms timed in the same rounds.
"""
import importlib.util
import json
import os
import os.path as osp
import runpy
import sys

ROOT = osp.abspath(osp.join(__file__, '../../..'))  # the repository
RUNS = (
    ('RepVGG-A0', 'configs/neon_trees/atss_repvgg-a0_fpn_neon-trees.py'),
    ('QARepVGG-A0',
     'configs/neon_trees/atss_qarepvgg-a0_fpn_neon-trees.py'),
    ('ResNet-18', 'configs/neon_trees/atss_r18_fpn_neon-trees.py'),
)
TEST_SET = ['test_dataloader.dataset.ann_file=annotations/test.json',
            'test_dataloader.dataset.data_prefix.img=test/',
            'test_evaluator.ann_file=data/neon_trees/annotations/test.json']
#: Table column -> form of :func:`mmrepvgg.benchmark.detector.forms`.
FORMS = (('PyTorch training', 'PyTorch training'),
         ('PyTorch deploy', 'PyTorch deploy'),
         ('ORT FP32', 'ONNX FP32'), ('ORT INT8', 'ONNX INT8'),
         ('OV FP32', 'ONNX FP32 (OpenVINO)'),
         ('OV INT8', 'ONNX INT8 (OpenVINO)'))


def tools_test(config, checkpoint, work, options=()):
    """AP50 and mAP of ``tools/test.py`` (its log in ``work``)."""
    from mmrepvgg.apis.sweep import run_logged, test_metrics
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'test.py'), config,
           checkpoint, '--work-dir', work]
    run_logged(cmd + (['--cfg-options', *options] if options else []),
               osp.join(work, 'test.log'), f'tools/test.py on {checkpoint}',
               cwd=ROOT)
    return test_metrics(work)


def evaluate_seed(label, config, seed_dir):
    """Every accuracy number of one trained seed (cached in eval.json)."""
    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.apis.sweep import final_metric
    from mmrepvgg.export.quantize import quantize_checkpoint
    from mmrepvgg.utils.cli import ToolError
    from mmrepvgg.utils.fileio import atomic_write_bytes
    cfg = load_config(config)
    ckpt = osp.join(seed_dir, f'epoch_{cfg.train_cfg.max_epochs}.pth')
    record = osp.join(seed_dir, 'eval.json')
    if not osp.isfile(ckpt):
        raise ToolError(f'{ckpt}: not trained; run the seed_sweep.py command '
                        f'of {__file__} --help first')
    if osp.isfile(record) and os.stat(record).st_mtime > os.stat(
            ckpt).st_mtime:
        with open(record) as f:
            return json.load(f)
    out = osp.join(seed_dir, 'deploy')
    onnx = osp.join(out, 'end2end.onnx')
    int8 = osp.join(out, 'end2end_int8.onnx')
    os.makedirs(out, exist_ok=True)
    quantize_checkpoint(cfg, config, ckpt, int8, img_shape_input=True,
                        fp32_output=onnx)
    r = dict(val=dict(AP50=final_metric(seed_dir, 'coco/bbox_mAP_50'),
                      mAP=final_metric(seed_dir, 'coco/bbox_mAP')),
             test=tools_test(config, ckpt, osp.join(out, 'test_sites'),
                             TEST_SET),
             checkpoint=ckpt, onnx=onnx, int8=int8,
             onnx_val=tools_test(config, onnx, osp.join(out, 'test_onnx')),
             int8_val=tools_test(config, int8, osp.join(out, 'test_int8')))
    atomic_write_bytes(record, json.dumps(r, indent=1))
    return r


def complexity(config):
    """Parameters (M) of both forms, GFLOPs of the deploy form, input."""
    import torch
    from mmengine.analysis import get_model_complexity_info

    from mmrepvgg.apis.convert import (build_model, load_config,
                                       test_input_shape)
    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.deploy.switch import count_params
    cfg = load_config(config)
    model = build_model(cfg).eval()
    deploy = switch_to_deploy(model, inplace=False, verbose=False)
    h, w = test_input_shape(cfg)
    flops = get_model_complexity_info(
        deploy, inputs=(torch.zeros(1, 3, h, w), ), show_table=False,
        show_arch=False)['flops']
    return (count_params(model) / 1e6, count_params(deploy) / 1e6,
            flops / 1e9, (h, w))


def time_forms(first_seeds, repeats):
    """Median latency (ms) of every form of every run, timed in the same
    rounds; the timing; why OpenVINO was left out (None if it was not)."""
    import torch

    from mmrepvgg.apis.convert import load_config
    from mmrepvgg.benchmark.detector import forms
    from mmrepvgg.utils.timing import measure
    fns, skipped = {}, {}
    for label, config in RUNS:
        r = first_seeds[label]
        f = forms(load_config(config), config, r['checkpoint'],
                  {'ONNX FP32': r['onnx'], 'ONNX INT8': r['int8']},
                  openvino=True)
        fns.update(((label, form), fn) for form, fn in f['fns'].items())
        skipped.update(f['skipped'])
    names = {f'{label} / {form}': fn for (label, form), fn in fns.items()}
    with torch.inference_mode():
        timing = measure(names, repeats, 3, threads=torch.get_num_threads())
    latency = {k: timing.median(f'{k[0]} / {k[1]}') * 1e3 for k in fns}
    return latency, timing, next(iter(skipped.values()), None)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args, run_cli
    p = ToolArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument('--work-dir', default='work_dirs/trees',
                   help="seed_sweep.py's --work-dir")
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--repeats', type=int, default=20, help='timed rounds')
    add_cli_args(p, unsafe_load=False)
    args = p.parse_args(argv)

    def body() -> int:
        import torch

        import mmrepvgg  # noqa: F401  (registers the modules)
        from mmrepvgg.apis.sweep import summarize
        from mmrepvgg.benchmark.report import md_table
        os.chdir(ROOT)  # the configs' data_root is relative to the repo
        results = {label: {s: evaluate_seed(
            label, config, osp.join(args.work_dir, label, f'seed{s}'))
            for s in args.seeds} for label, config in RUNS}
        latency, timing, no_openvino = time_forms(
            {k: v[args.seeds[0]] for k, v in results.items()}, args.repeats)

        def stat(label, get):
            s = summarize([get(results[label][seed]) for seed in args.seeds])
            return f'{s["mean"]:.3f} ± {s["std"]:.3f}'

        rows = []
        for label, config in RUNS:
            pt, pd, gflops, (h, w) = complexity(config)
            cells = [label, f'{pt:.2f} / {pd:.2f}', f'{gflops:.1f}',
                     stat(label, lambda r: r['val']['AP50']),
                     stat(label, lambda r: r['val']['mAP']),
                     stat(label, lambda r: r['test']['AP50']),
                     stat(label, lambda r: r['test']['mAP'])]
            cells += [f'{latency[label, f]:.1f}' if (label, f) in latency
                      else 'n/a' for _, f in FORMS]
            rows.append(cells + [stat(label, lambda r: r['onnx_val']['AP50']
                                      - r['int8_val']['AP50'])])
        table = '\n'.join(md_table(
            ['model', 'params M (train / deploy)', 'GFLOPs', 'hold-out AP50',
             'hold-out mAP', 'other sites AP50', 'other sites mAP']
            + [f'{col} ms' for col, _ in FORMS] + ['INT8 AP50 drop'], rows,
            left=2))
        note = (f'{len(args.seeds)} seeds ({", ".join(map(str, args.seeds))})'
                f', mean ± sample std; latency: seed {args.seeds[0]}, batch '
                f'1, {h}x{w}, {torch.get_num_threads()} threads, '
                f'{timing.describe()}; OV = OpenVINO (f32 hint), ORT = '
                'onnxruntime; INT8 drop: onnxruntime, hold-out')
        if no_openvino:
            note += f'; OpenVINO columns n/a: {no_openvino}'
        print(table + '\n\n' + note)
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
