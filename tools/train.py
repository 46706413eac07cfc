#!/usr/bin/env python
"""Train a detector with mmdet's runner, mmrepvgg registered.

Same arguments and behaviour as mmdet's tools/train.py.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmrepvgg  # noqa: E402,F401  (registers RepVGG modules, safe globals)
from mmrepvgg.apis.runner import (add_runner_args,  # noqa: E402
                                  load_runner_config, parse_runner_args,
                                  run_runner)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or from the latest checkpoint in '
        'the work dir when no path is given')
    add_runner_args(parser)
    return parse_runner_args(parser, argv)


def build_cfg(args):
    cfg = load_runner_config(args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if not cfg.get('auto_scale_lr', {}).get('base_batch_size'):
            raise SystemExit('error: --auto-scale-lr needs auto_scale_lr.'
                             'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    run_runner(build_cfg(args), args, 'train')


if __name__ == '__main__':
    main()
