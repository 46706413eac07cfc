"""What tools/train.py and tools/test.py share: runner arguments, config
loading and launching mmengine's runner."""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction

from mmrepvgg.utils import allow_cpu_distributed, cpu_model_wrapper_cfg
from mmrepvgg.utils.cli import add_cli_args


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """Arguments common to mmdet's train and test tools."""
    parser.add_argument('--work-dir',
                        help='the dir to save logs, models and metrics')
    add_cli_args(parser, debug=False)
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value (see mmdet)')
    parser.add_argument('--launcher',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser: argparse.ArgumentParser, argv=None):
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def load_runner_config(args, files=()) -> Config:
    """Load ``args.config`` with launcher, ``--cfg-options`` and work dir.

    ``files``: extra ``(path, what)`` pairs that must exist.
    """
    for path, what in ((args.config, 'config'), ) + tuple(files):
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
    return cfg


def run_runner(cfg: Config, args, method: str):
    """Build mmengine's runner from ``cfg`` and call ``runner.<method>()``.

    ``--unsafe-load`` lifts ``weights_only`` for every load of this process;
    distributed runs on a CPU-only torch get the shims of
    :mod:`mmrepvgg.utils.dist`.
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if args.unsafe_load:
        os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = '1'
    if args.launcher != 'none':
        allow_cpu_distributed()  # gloo on CPU-only torch (no-op with CUDA)
        cpu_model_wrapper_cfg(cfg)
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
        else RUNNERS.build(cfg)
    return getattr(runner, method)()
