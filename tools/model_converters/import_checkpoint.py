#!/usr/bin/env python
"""Import ImageNet RepVGG weights (official, mmpretrain, timm) as RepVGG
backbone weights.

    python tools/model_converters/import_checkpoint.py SRC.pth OUT.pth \\
        [--arch B1g4] [--format official] [--prefix backbone.]

Format and arch are detected, the classifier dropped, and the result must
load strictly into a fresh RepVGG (the backbone's ``init_cfg`` Pretrained).
"""
import importlib.util
import os.path as osp
import runpy


def parse_args(argv=None):
    from mmrepvgg.utils.cli import ToolArgumentParser, add_cli_args
    p = ToolArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('src', metavar='SRC', help='source checkpoint')
    p.add_argument('out', metavar='OUT', help='output checkpoint (.pth)')
    p.add_argument('--arch', help='force the arch (A0 ... D2se; default: '
                   'detected from the weight shapes)')
    p.add_argument('--format',
                   choices=('official', 'mmpretrain', 'timm', 'mmrepvgg'),
                   help='force the source key layout (default: detected)')
    p.add_argument('--prefix', default='',
                   help="prefix for every output key, e.g. 'backbone.' to "
                   'use OUT as load_from of a detector')
    add_cli_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


def run(args) -> int:
    from mmrepvgg.apis.import_checkpoint import (import_state_dict,
                                                 make_checkpoint)
    from mmrepvgg.deploy import load_checkpoint, save_checkpoint
    from mmrepvgg.utils.cli import ToolError, preview
    from mmrepvgg.utils.fileio import check_output_paths

    if not args.out.endswith('.pth'):
        raise ToolError(f'{args.out}: OUT must end with .pth')
    # by file identity: symlinks and hard links to the source are refused
    check_output_paths([(args.src, 'source checkpoint')], [args.out])
    obj = load_checkpoint(args.src, map_location='cpu',
                          unsafe=args.unsafe_load)
    try:
        state, info = import_state_dict(obj, arch=args.arch, fmt=args.format)
    except ToolError as e:  # the importer's errors name no file
        raise ToolError(f'{args.src}: {e}') from None
    save_checkpoint(make_checkpoint(state, info, source=args.src,
                                    prefix=args.prefix), args.out)

    form = 'deploy (fused)' if info['deploy'] else 'training (multi-branch)'
    print(f'imported {args.src} -> {args.out}')
    print(f'  source format : {info["format"]} ({info["format_description"]})')
    print(f'  arch          : {info["arch"]!r}, {form} form')
    print(f'  tensors       : {info["num_tensors"]}')
    if info['dropped']:
        print(f'  dropped       : {len(info["dropped"])} classifier key(s) '
              f'({preview(info["dropped"], 4)})')
    if info['filled']:
        print(f'  filled        : {len(info["filled"])} missing '
              'num_batches_tracked buffer(s) with 0')
    if args.prefix:
        print(f'  use with      : load_from={args.out!r} (keys prefixed '
              f'{args.prefix!r})')
    else:
        deploy = ', deploy=True' if info['deploy'] else ''
        print(f"  use with      : backbone=dict(type='RepVGG', "
              f"arch={info['arch']!r}{deploy}, init_cfg=dict("
              f"type='Pretrained', checkpoint={args.out!r}))")
    return 0


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
