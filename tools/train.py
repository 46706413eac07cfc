#!/usr/bin/env python
"""Train a detector with mmdet's runner, mmrepvgg registered.

Same arguments as mmdet's tools/train.py; checkpoints are written atomically
and ``--resume`` alone continues from the newest usable one.
"""
import importlib.util
import os.path as osp
import runpy


def parse_args(argv=None):
    from mmrepvgg.apis.runner import parse_runner_args
    from mmrepvgg.utils.cli import ToolArgumentParser
    parser = ToolArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint or, without a path, from the work '
        "dir's newest usable one")
    return parse_runner_args(parser, argv)


def build_cfg(args):
    """The runner config for ``args``; raises ToolError on bad input."""
    import mmrepvgg  # noqa: F401  (registers RepVGG modules and hooks)
    from mmrepvgg.apis.runner import (check_load_from, load_runner_config,
                                      resolve_resume, use_atomic_checkpoints)
    from mmrepvgg.utils.cli import ToolError
    cfg = load_runner_config(args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr', {}).get('base_batch_size'):
            raise ToolError('--auto-scale-lr needs auto_scale_lr.'
                            'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    use_atomic_checkpoints(cfg)
    if args.resume is None:
        check_load_from(cfg, unsafe_load=args.unsafe_load)
    else:
        resolve_resume(cfg, args.resume, unsafe_load=args.unsafe_load)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmrepvgg.apis.runner import run_runner, run_tool
    return run_tool(
        lambda: run_runner(build_cfg(args), args, 'train'), args,
        interrupted='interrupted; the checkpoints saved so far are complete '
        '(continue with --resume)')


if __name__ == '__main__':  # stdlib-only quiet start: utils/quiet.py
    PKG = importlib.util.find_spec('mmrepvgg').submodule_search_locations[0]
    runpy.run_path(osp.join(PKG, 'utils', 'quiet.py'))['run_tool'](main)
