"""What tools/train.py and tools/test.py share: runner arguments, config
loading, the checks done before mmengine's runner starts, and launching it.

Everything that can be refused is checked before the runner is built (so a
refused run leaves no work dir behind) and raised as a
:class:`~mmrepvgg.utils.cli.ToolError`, printed by
:func:`~mmrepvgg.utils.cli.run_cli` as one ``error: ...`` line (by rank 0
only under ``torchrun``).
"""
import argparse
import os
import os.path as osp
import sys
from typing import Iterable, Optional, Sequence, Tuple

from mmengine.config import Config

from mmrepvgg.apis.convert import (build_model, key_mismatch, load_config,
                                   read_state_dict)
from mmrepvgg.utils import allow_cpu_distributed, cpu_model_wrapper_cfg
from mmrepvgg.utils.cli import (ToolError, add_cli_args,
                                error_message, merge_cfg_options, run_cli)
from mmrepvgg.utils.quiet import process_rank


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """Arguments common to mmdet's train and test tools (plus
    ``--unsafe-load`` and ``--debug``)."""
    parser.add_argument('--work-dir',
                        help='the dir to save logs, models and metrics')
    add_cli_args(parser, cfg_options=True)
    parser.add_argument('--launcher',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser: argparse.ArgumentParser,
                      argv: Optional[Sequence[str]] = None
                      ) -> argparse.Namespace:
    """Parse ``argv``; sets ``LOCAL_RANK`` for mmengine if unset."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr, from rank 0 only."""
    if process_rank() == 0:
        print(f'warning: {message}', file=sys.stderr, flush=True)


def load_runner_config(args: argparse.Namespace,
                       files: Iterable[Tuple[str, str]] = ()) -> Config:
    """Load ``args.config`` with launcher, ``--cfg-options`` and work dir.

    Args:
        args: parsed arguments (``config``, ``cfg_options``, ``launcher``,
            ``work_dir``).
        files: extra ``(path, what)`` pairs that must exist.

    Raises:
        ToolError: a missing file, a config that cannot be loaded (syntax
            error, missing ``_base_``, failing ``custom_imports``), or a
            ``--cfg-options`` key that cannot be set.
    """
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
    """Replace every plain ``CheckpointHook`` of ``cfg`` (default hook or
    custom hook) by :class:`~mmrepvgg.engine.AtomicCheckpointHook`, with the
    same arguments. Subclasses and other hooks are left alone.

    Returns:
        int: how many hooks were replaced.
    """
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
    """Set ``cfg.resume``/``cfg.load_from`` for ``--resume [CKPT]``.

    ``resume='auto'`` (``--resume`` alone) picks the work dir's checkpoint
    with the most recorded progress that loads and matches the model
    (:func:`~mmrepvgg.engine.find_resume_checkpoint`), warning about every
    one skipped; without any, training starts from scratch, with a warning.
    An explicit ``CKPT`` must exist, load and match the model, or
    :class:`ToolError`.
    """
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
    if ckpt is None:
        warn(f'--resume: no usable checkpoint in {cfg.work_dir}; '
             'training starts from scratch')
        cfg.resume = False
        cfg.load_from = None
        return
    cfg.resume = True
    cfg.load_from = ckpt
    if process_rank() == 0:
        print(f'resuming from {ckpt}', flush=True)


def check_load_from(cfg: Config, unsafe_load: bool = False) -> None:
    """A local ``load_from`` (fine-tuning) must exist and load safely:
    refuse it up front (:class:`ToolError` naming it) rather than with the
    runner's traceback. URLs are left to mmengine."""
    from mmrepvgg.deploy.checkpoint import CheckpointError, load_checkpoint
    path = cfg.get('load_from', None)
    if not path or '://' in str(path):
        return
    try:
        load_checkpoint(str(path), map_location='cpu', unsafe=unsafe_load)
    except CheckpointError as e:
        raise ToolError(f'load_from: {e}') from None


# ------------------------------------------------------------------- testing
def _has(keys: Iterable[str], part: str) -> bool:
    return any(part in k for k in keys)


def check_test_checkpoint(cfg: Config,
                          checkpoint: str,
                          config: str,
                          unsafe_load: bool = False,
                          strict: bool = True) -> None:
    """Refuse a checkpoint that does not fit the config's model.

    The file is read safely (:func:`mmrepvgg.apis.convert.read_state_dict`:
    missing, empty, truncated, random or malicious files are refused); with
    ``strict``, its keys and shapes must equal those of the model built from
    ``cfg``, else :class:`ToolError` explains the mismatch: a deploy
    checkpoint (``conv_reparam``) given with a training config, a training
    checkpoint given with a deploy config, or the missing/unexpected keys.

    Args:
        cfg (Config): the test config (before any TTA wrapping).
        checkpoint (str): checkpoint file.
        config (str): the config's path, for messages.
        unsafe_load (bool): unpickle with ``weights_only=False``.
        strict (bool): compare keys and shapes with the model.
    """
    sd, _ = read_state_dict(checkpoint, unsafe_load=unsafe_load)
    if not strict:
        return
    try:
        own = build_model(cfg).state_dict()
    except Exception as e:
        raise ToolError(f'{config}: cannot build the model '
                        f'({error_message(e)})') from None
    missing, unexpected, _, problem = key_mismatch(own, sd)
    if not problem:
        return

    ckpt_deploy = _has(unexpected, '.conv_reparam.')
    ckpt_training = _has(unexpected, '.branch_3x3.')
    model_training = _has(missing, '.branch_3x3.')
    model_deploy = _has(missing, '.conv_reparam.')
    if ckpt_deploy and model_training:
        twin = osp.splitext(checkpoint)[0] + '.py'
        where = (f'{twin}, written next to it by convert_deploy.py'
                 if osp.isfile(twin) else
                 'the .py convert_deploy.py wrote next to it, or the '
                 "config's deploy twin (configs/repvgg/deploy/)")
        raise ToolError(
            f'{checkpoint}: this is a deploy checkpoint (fused conv_reparam '
            f'weights) but {config} builds the multi-branch training model: '
            f'use its deploy config ({where}); --deploy cannot help, it '
            'fuses after loading')
    if ckpt_training and model_deploy:
        raise ToolError(
            f'{checkpoint}: this is a training checkpoint (multi-branch '
            f'weights) but {config} builds the fused deploy model: use the '
            'training config (add --deploy to fuse after loading), or '
            'convert it with tools/convert_deploy.py')
    raise ToolError(f'{checkpoint} does not match config {config}: ' +
                    problem + ' (--non-strict loads it anyway)')


# ------------------------------------------------------------------- running
def run_runner(cfg: Config, args: argparse.Namespace, method: str):
    """Build mmengine's runner from ``cfg`` and call ``runner.<method>()``.

    Distributed runs on a CPU-only torch get the shims of
    :mod:`mmrepvgg.utils.dist`. The run is wrapped in
    :func:`mmrepvgg.deploy.safe_loading`: mmengine's ``load_from``,
    ``resume`` and ``Pretrained`` loads go through
    :func:`mmrepvgg.deploy.load_checkpoint` (``--unsafe-load``: torch's
    unrestricted unpickler).
    """
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
    """:func:`~mmrepvgg.utils.cli.run_cli` for train.py/test.py: ``body()``
    returns nothing; exit 0, or one ``error:`` line and 1 (130 on Ctrl-C).
    """

    def wrapped() -> int:
        body()
        return 0

    return run_cli(wrapped, debug=getattr(args, 'debug', False),
                   interrupted=interrupted)
