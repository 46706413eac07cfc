#!/usr/bin/env python
"""Import ImageNet RepVGG weights (official, mmpretrain, timm) as RepVGG
backbone weights.

    python tools/model_converters/import_checkpoint.py RepVGG-A0-train.pth \\
        repvgg_a0.pth
    python tools/model_converters/import_checkpoint.py repvgg_b1g4.pth \\
        out.pth --arch B1g4

Writes OUT = {'meta': {'mmrepvgg': {...}}, 'state_dict': backbone keys (no
'backbone.' prefix unless --prefix)}, usable as
``backbone=dict(type='RepVGG', arch=..., init_cfg=dict(type='Pretrained',
checkpoint=OUT))``. The source format and arch are detected from the keys and
weight shapes; the classifier is dropped; every other key must map onto the
backbone and the result must load strictly into a fresh RepVGG. Exits 1 with
one line naming the keys or file at fault, and writes nothing, on any error.
"""
import argparse
import importlib.util
import json
import os.path as osp
import runpy


FORMAT_NAMES = ('official', 'mmpretrain', 'timm', 'mmrepvgg')


def parse_args(argv=None):
    from mmrepvgg.utils.cli import add_cli_args
    p = argparse.ArgumentParser(
        description='Convert ImageNet RepVGG weights (DingXiaoH/RepVGG, '
        'mmpretrain, timm repvgg_*) into mmrepvgg RepVGG backbone weights.')
    p.add_argument('src', metavar='SRC', help='source checkpoint')
    p.add_argument('out', metavar='OUT', help='output checkpoint (.pth)')
    p.add_argument('--arch', help='force the arch: a name (A0 ... D2se) or a '
                   'JSON arch dict; detected from the weight shapes by '
                   'default')
    p.add_argument('--format', choices=FORMAT_NAMES,
                   help='force the source key layout (default: detected)')
    p.add_argument('--allow-custom-arch', action='store_true',
                   help='when the shapes match no published arch, import '
                   'them as an arch dict (recorded in meta) instead of '
                   'failing')
    p.add_argument('--prefix', default='',
                   help="prefix for every output key, e.g. 'backbone.' to "
                   'use OUT as load_from of a detector (default: none, for '
                   "the backbone's init_cfg Pretrained)")
    add_cli_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from mmrepvgg.utils.cli import tool_main
    return tool_main(parse_args, run, argv)


#: Largest number of blocks per stage accepted in an --arch dict (the
#: published archs have at most 24; a typo must not build for minutes).
MAX_STAGE_BLOCKS = 64


def parse_arch(value):
    """``--arch``: a published name or a JSON dict (None if not given)."""
    from mmrepvgg.utils.cli import ToolError
    if value is None:
        return None
    from mmrepvgg import ARCH_SETTINGS
    text = value.strip()
    if text.startswith('{'):
        try:
            arch = json.loads(text)
        except ValueError as e:
            raise ToolError(f'--arch: invalid JSON arch dict ({e})')
        if not isinstance(arch, dict):
            raise ToolError('--arch: expected a JSON object (arch dict), got '
                            f'{type(arch).__name__}')
        blocks = arch.get('num_blocks')
        if not (isinstance(blocks, list) and blocks and all(
                isinstance(n, int) and not isinstance(n, bool) and
                1 <= n <= MAX_STAGE_BLOCKS for n in blocks)):
            raise ToolError('--arch: num_blocks must be a list of integers in '
                            f'[1, {MAX_STAGE_BLOCKS}], got {blocks!r}')
        gmap = arch.get('group_layer_map')
        if isinstance(gmap, dict):
            try:
                arch['group_layer_map'] = {int(k): v for k, v in gmap.items()}
            except ValueError:
                raise ToolError('--arch: group_layer_map keys must be block '
                                f'indices, got {sorted(gmap)}')
        return arch
    if text not in ARCH_SETTINGS:
        raise ToolError(f'--arch {value!r} is unknown; choose one of '
                        f'{", ".join(ARCH_SETTINGS)} or pass a JSON dict')
    return text


def run(args) -> int:
    from mmrepvgg.utils.cli import ToolError
    import mmrepvgg  # noqa: F401  (registers modules and safe globals)
    from mmrepvgg.apis.import_checkpoint import (CheckpointImportError,
                                                 import_state_dict,
                                                 make_checkpoint)
    from mmrepvgg.utils.fileio import check_output_paths
    from mmrepvgg.deploy import load_checkpoint, save_checkpoint

    if not args.out.endswith('.pth'):
        raise ToolError(f'{args.out}: OUT must end with .pth')
    # by file identity: symlinks and hard links to the source are refused
    check_output_paths([(args.src, 'source checkpoint')], [args.out])
    arch = parse_arch(args.arch)
    obj = load_checkpoint(args.src, map_location='cpu',
                          unsafe=args.unsafe_load)
    try:
        state, info = import_state_dict(
            obj, arch=arch, fmt=args.format,
            allow_custom=args.allow_custom_arch)
    except CheckpointImportError as e:
        raise ToolError(f'{args.src}: {e}') from None
    ckpt = make_checkpoint(state, info, source=args.src, prefix=args.prefix)
    save_checkpoint(ckpt, args.out)
    print_report(args, info)
    return 0


def print_report(args, info: dict) -> None:
    from mmrepvgg.utils.cli import preview
    form = 'deploy (fused)' if info['deploy'] else 'training (multi-branch)'
    arch_repr = repr(info['arch'])
    print(f'imported {args.src} -> {args.out}')
    print(f'  source format : {info["format"]} ({info["format_description"]})')
    print(f'  arch          : {arch_repr}, {form} form')
    print(f'  tensors       : {info["num_tensors"]}')
    if info['dropped']:
        print(f'  dropped       : {len(info["dropped"])} classifier key(s) '
              f'({preview(info["dropped"], 4)})')
    if info['filled']:
        print(f'  filled        : {len(info["filled"])} missing '
              'num_batches_tracked buffer(s) with 0')
    deploy = ', deploy=True' if info['deploy'] else ''
    if args.prefix:
        print(f'  use with      : load_from={args.out!r} (keys prefixed '
              f'{args.prefix!r})')
    else:
        print(f"  use with      : backbone=dict(type='RepVGG', "
              f'arch={arch_repr}{deploy}, init_cfg=dict(type=\'Pretrained\','
              f' checkpoint={args.out!r}))')


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
