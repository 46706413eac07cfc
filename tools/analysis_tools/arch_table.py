#!/usr/bin/env python
"""Print the RepVGG arch table: parameters (both forms) vs the published
totals, and the fusion error of each whole backbone.

    python tools/analysis_tools/arch_table.py [--equivalence] [--size 64] \\
        [--archs A0 ...]
                               [--block RepVGGBlock|QARepVGGBlock]

Parameter counts are taken on the meta device (instant). With
``--equivalence`` every backbone is built for real, its weights and
batch-norm statistics randomized, converted, and compared on a random input
(relative error max|a-b| / max|a|, float32):

* fusion, fp64: every block fed its real input inside the network, in
  float64, training form vs fused form (worst block): the exactness of the
  fusion maths itself;
* backbone, fp32: last-stage output of the whole backbone, deploy form in
  float32 vs the training form in float64 (the truth);
* fp32 floor: the training form in float32 vs the same model in float64, the
  rounding noise any float32 comparison of this network carries;
* ratio: backbone fp32 / max(fp32 floor, 1 ulp), the machine-independent
  figure the test suite bounds (mmrepvgg.deploy.verify).

``--block QARepVGGBlock`` builds every backbone from quantization-friendly
QARepVGG blocks (``RepVGG(arch, block_cfg=dict(type='QARepVGGBlock'))``);
their deploy form, hence the deploy parameter count, is the same as RepVGG's.
"""
import argparse
import importlib.util
import os.path as osp
import runpy

#: Published totals (deploy form, 1000-class classifier included), millions,
#: RepVGG paper / official repository. B2g2 and B3g2 have none.
PUBLISHED_TOTAL_M = {
    'A0': 8.30, 'A1': 12.78, 'A2': 25.49, 'B0': 14.33, 'B1': 51.82,
    'B1g2': 41.36, 'B1g4': 36.12, 'B2': 80.31, 'B2g4': 55.77, 'B3': 110.96,
    'B3g4': 75.62, 'D2se': 120.39,
}


BLOCKS = ('RepVGGBlock', 'QARepVGGBlock')


def main(argv=None) -> int:
    import torch

    from mmrepvgg import ARCH_SETTINGS, RepVGG
    from mmrepvgg.testing import backbone_fusion_errors
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--equivalence', action='store_true')
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--archs', nargs='+', default=list(ARCH_SETTINGS))
    p.add_argument('--block', choices=BLOCKS, default=BLOCKS[0],
                   help='block of every backbone (default: %(default)s)')
    args = p.parse_args(argv)
    block_cfg = dict(type=args.block)

    def nparams(m):
        return sum(t.numel() for t in m.parameters())

    head = ('| arch | train params (M) | deploy params (M) | + classifier (M) '
            '| published (M) | diff |')
    if args.equivalence:
        head += (' fusion, fp64 (worst block) | backbone, fp32 | fp32 floor '
                 '| ratio |')
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for arch in args.archs:
        with torch.device('meta'):
            train = RepVGG(arch, block_cfg=block_cfg)
            deploy = RepVGG(arch, deploy=True, block_cfg=block_cfg)
        cls = int(512 * ARCH_SETTINGS[arch]['width_factor'][3]) * 1000 + 1000
        total = (nparams(deploy) + cls) / 1e6
        pub = PUBLISHED_TOTAL_M.get(arch)
        diff = f'{total - pub:+.4f}' if pub else 'n/a'
        row = (f'| {arch} | {nparams(train) / 1e6:.2f} | '
               f'{nparams(deploy) / 1e6:.2f} | {total:.4f} | '
               f'{pub if pub else "not published"} | {diff} |')
        if args.equivalence:
            e = backbone_fusion_errors(arch, args.size, args.block)
            row += (f' {e["block_fp64"]:.1e} | {e["model_fp32"]:.2e} | '
                    f'{e["floor_fp32"]:.2e} | {e["ratio"]:.2f} |')
        print(row, flush=True)
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
