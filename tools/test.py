#!/usr/bin/env python
"""Test (and evaluate) a detector, mmrepvgg registered.

Same arguments as mmdet's tools/test.py, plus ``--deploy``: switch every
RepVGG block of the loaded model to its fused form before testing.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmrepvgg  # noqa: E402,F401
from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmrepvgg.utils import (allow_cpu_distributed,  # noqa: E402
                            cpu_model_wrapper_cfg)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir',
                        help='the directory to save the file containing '
                        'evaluation metrics')
    parser.add_argument('--out', type=str,
                        help='dump predictions to a pickle file (.pkl)')
    parser.add_argument('--show', action='store_true',
                        help='show prediction results')
    parser.add_argument('--show-dir',
                        help='directory where painted images will be saved')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='the interval of show (s)')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation (needs tta_model and '
                        'tta_pipeline in the config)')
    parser.add_argument('--deploy', action='store_true',
                        help='switch the model to the fused deploy form '
                        'after loading the checkpoint')
    parser.add_argument(
        '--unsafe-load', action='store_true',
        help='unpickle the checkpoint with weights_only=False: ONLY for '
        'files you trust (a malicious checkpoint can run code)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value (see mmdet)')
    parser.add_argument('--launcher',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _add_visualization(cfg, args):
    hooks = cfg.default_hooks
    if 'visualization' not in hooks:
        raise SystemExit('error: --show/--show-dir need a "visualization" '
                         'hook in default_hooks')
    hooks.visualization.draw = True
    if args.show:
        hooks.visualization.show = True
        hooks.visualization.wait_time = args.wait_time
    if args.show_dir:
        hooks.visualization.test_out_dir = args.show_dir


def build_cfg(args) -> Config:
    for path, what in ((args.config, 'config'),
                       (args.checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise SystemExit(f'error: {what} file {path} does not exist')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        _add_visualization(cfg, args)
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise SystemExit('error: --tta needs tta_model and tta_pipeline '
                             'in the config')
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        test_data_cfg = cfg.test_dataloader.dataset
        while 'dataset' in test_data_cfg:
            test_data_cfg = test_data_cfg['dataset']
        test_data_cfg.pipeline = cfg.tta_pipeline
    if args.deploy:
        # Runs after the checkpoint is loaded (before_test), so the trained
        # multi-branch weights are fused, not the random initialisation.
        hooks = list(cfg.get('custom_hooks', []))
        if not any(h.get('type') == 'SwitchToDeployHook' for h in hooks):
            hooks.append(dict(type='SwitchToDeployHook'))
        cfg.custom_hooks = hooks
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise SystemExit('error: --out must be a .pkl or .pickle file')
        cfg.test_evaluator = _with_dump(cfg.test_evaluator, args.out)
    return cfg


def _with_dump(evaluator, out):
    dump = dict(type='DumpDetResults', out_file_path=out)
    if isinstance(evaluator, (list, tuple)):
        return list(evaluator) + [dump]
    return [evaluator, dump]


def main(argv=None):
    args = parse_args(argv)
    if args.unsafe_load:
        os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = '1'
    if args.launcher != 'none':
        allow_cpu_distributed()  # gloo on CPU-only torch (no-op with CUDA)
    cfg = build_cfg(args)
    if args.launcher != 'none':
        cpu_model_wrapper_cfg(cfg)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    runner.test()


if __name__ == '__main__':
    main()
