#!/usr/bin/env python
"""Float32 equivalence table: deploy error vs the network's own float32 noise.

    python tools/analysis_tools/noise_table.py [--archs A0 B3] [--toy] \\
        [--block QARepVGGBlock] [--size 64]
    make noise-table        # under every CPU code path / thread count

Per randomized model: the worst block fused in float64, both forms' float32
errors against float64 and their ratio, bounded by 4 (docs/exactness.md).
"""
import argparse
import importlib.util
import os
import os.path as osp
import runpy

TOY_CONFIG = osp.join(osp.dirname(__file__), '..', '..', 'configs', 'toy',
                      'retinanet_repvgg-tiny_repvgg-fpn_toy.py')


def backbone_row(arch: str, size: int, block: str) -> tuple:
    from mmrepvgg.testing import backbone_fusion_errors
    e = backbone_fusion_errors(arch, size, block)
    return (f'{block[:-len("Block")]}-{arch} {size}x{size}', e['block_fp64'],
            e['model_fp32'], e['floor_fp32'], e['ratio'])


def detector_row(config: str, size: int) -> tuple:
    from mmengine.config import Config

    import mmrepvgg
    from mmrepvgg.apis.convert import build_model, make_inputs, verify_models
    from mmrepvgg.testing import randomize_
    model = randomize_(build_model(Config.fromfile(config)), seed=0).eval()
    fused = mmrepvgg.switch_to_deploy(model, verbose=False)
    v = verify_models(model, fused, *make_inputs((size, size)))
    return (f'{osp.basename(config)[:-3]} {size}x{size} (worst of '
            f'{v["num_outputs"]}: {v["worst"]})', v['block_fp64'],
            v['error'], v['noise'], v['ratio'])


def main(argv=None) -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', nargs='*', default=['A0', 'B3'])
    p.add_argument('--block', default='RepVGGBlock',
                   choices=('RepVGGBlock', 'QARepVGGBlock'),
                   help='block of every backbone')
    p.add_argument('--toy', action='store_true',
                   help='also the toy detector (backbone, neck and head)')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--no-header', action='store_true')
    args = p.parse_args(argv)
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'default')
    rows = [backbone_row(a, args.size, args.block) for a in args.archs]
    if args.toy:
        rows.append(detector_row(TOY_CONFIG, max(args.size, 128)))
    if not args.no_header:
        print('| model | ISA | threads | worst block fp64 | deploy err vs '
              'fp64 | train err vs fp64 | ratio |')
        print('| --- | --- | --- | --- | --- | --- | --- |')
    for model, block, deploy, train, ratio in rows:
        print(f'| {model} | {isa} | {torch.get_num_threads()} | '
              f'{block:.1e} | {deploy:.3g} | {train:.3g} | {ratio:.2f} |',
              flush=True)
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
