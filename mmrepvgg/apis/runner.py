"""What tools/train.py and tools/test.py share: arguments, config, checks
before mmengine's runner starts (a refused run leaves no work dir), the
runner."""
import argparse
import os
import os.path as osp
import sys
from typing import Iterable, Optional, Sequence, Tuple

from mmengine.config import Config

from mmrepvgg.apis.convert import (build_model, key_mismatch, load_config,
                                   read_state_dict)
from mmrepvgg.utils import allow_cpu_distributed, cpu_model_wrapper_cfg
from mmrepvgg.utils.cli import (ToolError, add_cli_args, error_message,
                                merge_cfg_options, run_cli)
from mmrepvgg.utils.quiet import process_rank


def parse_runner_args(parser: argparse.ArgumentParser,
                      argv: Optional[Sequence[str]] = None
                      ) -> argparse.Namespace:
    """Add the arguments common to mmdet's train and test tools and parse
    ``argv``; sets ``LOCAL_RANK`` for mmengine if unset."""
    parser.add_argument('--work-dir',
                        help='the dir to save logs, models and metrics')
    add_cli_args(parser, cfg_options=True)
    parser.add_argument('--launcher',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr, from rank 0 only."""
    if process_rank() == 0:
        print(f'warning: {message}', file=sys.stderr, flush=True)


def load_runner_config(args: argparse.Namespace,
                       files: Iterable[Tuple[str, str]] = ()) -> Config:
    """Load ``args.config`` with launcher, ``--cfg-options`` and work dir;
    ``files`` are extra ``(path, what)`` pairs that must exist."""
    cfg = load_config(args.config)
    for path, what in files:
        if not osp.isfile(path):
            raise ToolError(f'{what} file {path} does not exist')
    cfg.launcher = args.launcher
    merge_cfg_options(cfg, args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


# ------------------------------------------------------------------ training
def use_atomic_checkpoints(cfg: Config) -> int:
    """Make every plain ``CheckpointHook`` of ``cfg`` an
    ``AtomicCheckpointHook``; returns how many."""
    from mmengine.hooks import CheckpointHook
    hooks = [cfg.get('default_hooks', {}).get('checkpoint')]
    hooks += list(cfg.get('custom_hooks', None) or [])
    n = 0
    for hook in hooks:
        if isinstance(hook, dict) and hook.get('type') in (
                'CheckpointHook', 'mmengine.CheckpointHook', CheckpointHook):
            hook['type'] = 'AtomicCheckpointHook'
            n += 1
    return n


def resolve_resume(cfg: Config, resume: Optional[str],
                   unsafe_load: bool = False) -> None:
    """Set ``cfg.resume``/``cfg.load_from`` for ``--resume [CKPT]``: the
    given checkpoint or, for ``'auto'``, the work dir's one with the most
    progress (none: from scratch), either loading and matching the model."""
    from mmrepvgg.deploy.checkpoint import CheckpointError
    from mmrepvgg.engine import check_checkpoint, find_resume_checkpoint
    if resume is None:
        return
    try:
        expected = {k: v.shape for k, v in build_model(cfg).state_dict()
                    .items()}
    except Exception as e:
        raise ToolError(f'cannot build the model to check --resume '
                        f'({error_message(e)})') from None
    try:
        if resume == 'auto':
            ckpt = find_resume_checkpoint(cfg.work_dir, unsafe_load,
                                          warn=warn, expected=expected)
        else:
            ckpt = resume
            check_checkpoint(ckpt, unsafe_load, expected)
    except CheckpointError as e:
        raise ToolError(f'--resume: {e}') from None
    cfg.resume, cfg.load_from = ckpt is not None, ckpt
    if ckpt is None:
        warn(f'--resume: no usable checkpoint in {cfg.work_dir}; '
             'training starts from scratch')
    elif process_rank() == 0:
        print(f'resuming from {ckpt}', flush=True)


def check_load_from(cfg: Config, unsafe_load: bool = False) -> None:
    """A local ``load_from`` must exist and load safely (URLs are left to
    mmengine)."""
    from mmrepvgg.deploy.checkpoint import CheckpointError, load_checkpoint
    path = cfg.get('load_from', None)
    if not path or '://' in str(path):
        return
    try:
        load_checkpoint(str(path), map_location='cpu', unsafe=unsafe_load)
    except CheckpointError as e:
        raise ToolError(f'load_from: {e}') from None


# ------------------------------------------------------------------- testing
def check_test_checkpoint(cfg: Config,
                          checkpoint: str,
                          config: str,
                          unsafe_load: bool = False,
                          strict: bool = True) -> None:
    """Read ``checkpoint`` safely and, with ``strict``, refuse it unless its
    keys and shapes are those of ``cfg``'s model."""
    sd, _ = read_state_dict(checkpoint, unsafe_load=unsafe_load)
    if not strict:
        return
    try:
        own = build_model(cfg).state_dict()
    except Exception as e:
        raise ToolError(f'{config}: cannot build the model '
                        f'({error_message(e)})') from None
    missing, unexpected, _, problem = key_mismatch(own, sd)

    def has(keys, part):
        return any(part in k for k in keys)

    if has(unexpected, '.conv_reparam.') and has(missing, '.branch_3x3.'):
        twin = osp.splitext(checkpoint)[0] + '.py'
        raise ToolError(
            f'{checkpoint}: this is a deploy checkpoint but {config} builds '
            f'the training model: use its deploy config ({twin}, written '
            'next to it by convert_deploy.py)')
    if has(unexpected, '.branch_3x3.') and has(missing, '.conv_reparam.'):
        raise ToolError(
            f'{checkpoint}: this is a training checkpoint but {config} builds '
            'the deploy model: use the training config (add --deploy to fuse '
            'after loading), or convert it with tools/convert_deploy.py')
    if problem:
        raise ToolError(f'{checkpoint} does not match config {config}: '
                        f'{problem} (--non-strict loads it anyway)')


# ------------------------------------------------------------------- running
def run_runner(cfg: Config, args: argparse.Namespace, method: str):
    """Build mmengine's runner from ``cfg`` and call ``runner.<method>()``,
    with every checkpoint load inside :func:`mmrepvgg.deploy.safe_loading`
    (and the CPU shims of :mod:`mmrepvgg.utils.dist` when distributed)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from mmrepvgg.deploy import safe_loading
    if args.launcher != 'none':
        allow_cpu_distributed()  # gloo on CPU-only torch (no-op with CUDA)
        cpu_model_wrapper_cfg(cfg)
    with safe_loading(unsafe=args.unsafe_load):
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg \
            else RUNNERS.build(cfg)
        return getattr(runner, method)()


def run_tool(body, args: argparse.Namespace, interrupted: str) -> int:
    """:func:`~mmrepvgg.utils.cli.run_cli` for a ``body()`` that returns
    nothing: exit 0, or one ``error:`` line and 1 (130 on Ctrl-C)."""

    def wrapped() -> int:
        body()
        return 0

    return run_cli(wrapped, debug=getattr(args, 'debug', False),
                   interrupted=interrupted)
