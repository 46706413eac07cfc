"""Choosing the checkpoint ``tools/train.py --resume`` continues from."""
import os
import os.path as osp
import re
from typing import Callable, List, Optional, Tuple

from mmrepvgg.deploy.checkpoint import CheckpointError, load_checkpoint

#: File in the work dir naming the latest checkpoint (written by mmengine's
#: CheckpointHook and by AtomicCheckpointHook).
LAST_CHECKPOINT = 'last_checkpoint'
#: Names of the checkpoints a checkpoint hook writes with default templates.
CHECKPOINT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def check_checkpoint(path: str, unsafe_load: bool = False) -> None:
    """Make sure ``path`` is a complete checkpoint a runner can resume from.

    :func:`mmrepvgg.deploy.load_checkpoint` reads it (missing, empty,
    truncated, CRC-mismatched or non-checkpoint files are refused) safely
    (``weights_only=True`` with mmrepvgg's allowlist, unless
    ``unsafe_load``); the result must be a dict holding a ``state_dict``.

    Args:
        path (str): checkpoint file.
        unsafe_load (bool): unpickle with ``weights_only=False`` (only for
            trusted files).

    Raises:
        CheckpointError: naming ``path`` and what is wrong with it.
    """
    ckpt = load_checkpoint(path, map_location='cpu', unsafe=unsafe_load)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'),
                                                    dict):
        raise CheckpointError(f'{path}: not a training checkpoint (no '
                              'state_dict)')


def _last_checkpoint_target(work_dir: str) -> Tuple[Optional[str], str]:
    """``(path named by last_checkpoint, problem)``; path None if unusable."""
    pointer = osp.join(work_dir, LAST_CHECKPOINT)
    if not osp.isfile(pointer):
        return None, ''
    try:
        with open(pointer, encoding='utf-8') as f:
            target = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f'{pointer} is unreadable ({e})'
    if not target:
        return None, f'{pointer} is empty'
    if not osp.isabs(target) and not osp.exists(target):
        # mmengine writes absolute paths; accept one relative to the dir.
        target = osp.join(work_dir, target)
    if not osp.exists(target):
        return None, f'{pointer} names {target}, which does not exist'
    return target, ''


def resume_candidates(work_dir: str) -> List[str]:
    """Checkpoints of ``work_dir``, newest first.

    The file ``last_checkpoint`` names, and every ``epoch_N.pth`` /
    ``iter_N.pth`` beside it or in ``work_dir``, ordered by modification time
    (then by N), newest first.
    """
    target, _ = _last_checkpoint_target(work_dir)
    folders = {osp.abspath(work_dir)}
    found = set()
    if target is not None:
        found.add(osp.abspath(target))
        folders.add(osp.dirname(osp.abspath(target)))
    for folder in folders:
        if not osp.isdir(folder):
            continue
        for name in os.listdir(folder):
            if CHECKPOINT_NAME.match(name):
                path = osp.join(folder, name)
                if osp.isfile(path):
                    found.add(osp.abspath(path))

    def key(path: str):
        m = CHECKPOINT_NAME.match(osp.basename(path))
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            mtime = -1
        return mtime, int(m.group(2)) if m else -1

    return sorted(found, key=key, reverse=True)


def find_resume_checkpoint(work_dir: str,
                           unsafe_load: bool = False,
                           warn: Optional[Callable[[str], None]] = None
                           ) -> Optional[str]:
    """The newest checkpoint of ``work_dir`` that is complete and loads.

    Candidates come from :func:`resume_candidates`; each is checked with
    :func:`check_checkpoint` until one passes. Every checkpoint skipped on
    the way, and a ``last_checkpoint`` naming a missing file, is reported
    through ``warn``.

    Args:
        work_dir (str): the training's work dir.
        unsafe_load (bool): see :func:`check_checkpoint`.
        warn (callable, optional): receives one message per problem.

    Returns:
        str | None: the checkpoint to resume from, or None if there is none.
    """
    warn = warn or (lambda msg: None)
    _, problem = _last_checkpoint_target(work_dir)
    if problem:
        warn(problem)
    for path in resume_candidates(work_dir):
        try:
            check_checkpoint(path, unsafe_load=unsafe_load)
        except CheckpointError as e:
            warn(f'skipping unreadable checkpoint: {e}')
            continue
        return path
    return None
