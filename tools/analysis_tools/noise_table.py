#!/usr/bin/env python
"""Float32 equivalence table: deploy error vs the network's own float32 noise.

    python tools/analysis_tools/noise_table.py [--archs A0 B3] [--toy] \\
        [--size 64]
    make noise-table        # the same under every CPU code path / thread count

For each model (weights and batch-norm statistics randomized, seed 0) prints,
for the current CPU code path (``ONEDNN_MAX_CPU_ISA``) and thread count:

* deploy err: the fused model in float32 vs the truth (the training form in
  float64), ``max|a-b| / max|a|`` over the last backbone output, or the worst
  backbone/neck/head output of a detector;
* train err: the training form in float32 vs the same truth: the network's
  own float32 rounding noise on this machine;
* ratio: deploy err / max(train err, 1 ulp): what the tools and tests judge
  (pass when <= 4, ``mmrepvgg.deploy.verify.NOISE_FACTOR``).
"""
import argparse
import importlib.util
import os
import os.path as osp
import runpy

TOY_CONFIG = osp.join(osp.dirname(__file__), '..', '..', 'configs', 'toy',
                      'retinanet_repvgg-tiny_repvgg-fpn_toy.py')


def backbone_row(arch: str, size: int) -> dict:
    from mmrepvgg.testing import backbone_fusion_errors
    errs = backbone_fusion_errors(arch, size)
    return dict(model=f'RepVGG-{arch} {size}x{size}',
                deploy=errs['model_fp32'], train=errs['floor_fp32'],
                ratio=errs['ratio'], block=errs['block_fp64'])


def detector_row(config: str, size: int) -> dict:
    from mmengine.config import Config

    import mmrepvgg
    from mmrepvgg.apis.convert import build_model, make_inputs, verify_models
    from mmrepvgg.testing import randomize_
    cfg = Config.fromfile(config)
    model = randomize_(build_model(cfg), seed=0).eval()
    fused = mmrepvgg.switch_to_deploy(model, verbose=False)
    x, samples = make_inputs((size, size))
    v = verify_models(model, fused, x, samples)
    return dict(model=f'{osp.basename(config)[:-3]} {size}x{size} '
                f'(worst of {v["num_outputs"]}: {v["worst"]})',
                deploy=v['error'], train=v['noise'], ratio=v['ratio'],
                block=float('nan'))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', nargs='*', default=['A0', 'B3'])
    p.add_argument('--toy', action='store_true',
                   help='also the toy detector (backbone, neck and head)')
    p.add_argument('--config', action='append', default=[],
                   help='also this detector config (random weights)')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--no-header', action='store_true')
    args = p.parse_args(argv)
    import torch
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'default')
    threads = torch.get_num_threads()
    rows = [backbone_row(a, args.size) for a in args.archs]
    configs = ([TOY_CONFIG] if args.toy else []) + args.config
    rows += [detector_row(c, max(args.size, 128)) for c in configs]
    if not args.no_header:
        print('| model | ISA | threads | deploy err vs fp64 | train err vs '
              'fp64 | ratio |')
        print('| --- | --- | --- | --- | --- | --- |')
    for r in rows:
        print(f'| {r["model"]} | {isa} | {threads} | {r["deploy"]:.3g} | '
              f'{r["train"]:.3g} | {r["ratio"]:.2f} |')
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
