"""Which checkpoint ``--resume`` continues from (docs/safe_loading.md): of
the work dir's ``epoch_N.pth`` / ``iter_N.pth`` and the file
``last_checkpoint`` names there (it wins a tie), the one with the most
recorded progress that loads and fits the model; one that does not fit but
records more progress stops the resume.
"""
import os
import os.path as osp
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from mmrepvgg.deploy.checkpoint import CheckpointError, load_checkpoint
from .hooks.atomic_checkpoint_hook import LAST_CHECKPOINT

#: Names of the checkpoints a checkpoint hook writes with default templates.
CHECKPOINT_NAME = re.compile(r'^(epoch|iter)_(\d+)\.pth$')
_MAX_POINTER_BYTES = 4096

Shapes = Dict[str, torch.Size]
Progress = Tuple[int, int]


def _progress(path: str, ckpt: object) -> Progress:
    meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    values = [meta.get(k) if isinstance(meta, dict) else None
              for k in ('iter', 'epoch')]
    if not all(type(v) is int and v >= 0 for v in values):
        raise CheckpointError(f'{path}: no training progress recorded '
                              '(meta iter/epoch)')
    return values[0], values[1]


def _mismatch(path: str, state: object, expected: Optional[Shapes]) -> str:
    # Why ``state`` cannot be resumed into a model of ``expected`` shapes.
    if not isinstance(state, dict) or not state:
        return f'{path}: no weights (empty or missing state_dict)'
    if expected is None:
        return ''
    got = {k: tuple(getattr(v, 'shape', ())) for k, v in state.items()}
    want = {k: tuple(v) for k, v in expected.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    parts = [f'{len(v)} {what} (e.g. {v[0]})' for what, v in (
        ('missing keys', missing), ('unexpected keys', extra),
        ('shape mismatches', shapes)) if v]
    return f'{path}: does not match the model: ' + ', '.join(parts) \
        if parts else ''


def check_checkpoint(path: str,
                     unsafe_load: bool = False,
                     expected: Optional[Shapes] = None) -> Progress:
    """The ``(iter, epoch)`` of ``path`` if a runner can resume from it,
    else :class:`CheckpointError`; its ``state_dict`` must match
    ``expected`` (the model's ``{key: shape}``) exactly."""
    ckpt = load_checkpoint(path, map_location='cpu', unsafe=unsafe_load)
    progress = _progress(path, ckpt)
    problem = _mismatch(path, ckpt.get('state_dict'), expected)
    if problem:
        raise CheckpointError(problem)
    return progress


def _last_checkpoint_target(work_dir: str) -> Tuple[Optional[str], str]:
    """``(path named by last_checkpoint, problem)``: a short regular file
    naming a file inside ``work_dir``, else path None."""
    pointer = osp.join(work_dir, LAST_CHECKPOINT)
    if not osp.lexists(pointer):
        return None, ''
    if not osp.isfile(pointer):
        return None, f'{pointer} is not a regular file'
    try:
        with open(pointer, 'rb') as f:
            raw = f.read(_MAX_POINTER_BYTES + 1)
        target = raw.decode('utf-8').strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f'{pointer} is unreadable ({e})'
    if len(raw) > _MAX_POINTER_BYTES or not target or '\n' in target:
        return None, f'{pointer} does not hold one path'
    if not osp.isabs(target):
        target = osp.join(work_dir, target)
    root = osp.realpath(work_dir)
    if osp.commonpath([root, osp.realpath(target)]) != root:
        return None, f'{pointer} names {target}, outside the work dir'
    if not osp.isfile(target):
        return None, f'{pointer} names {target}, which does not exist'
    return target, ''


def find_resume_checkpoint(work_dir: str,
                           unsafe_load: bool = False,
                           warn: Optional[Callable[[str], None]] = None,
                           expected: Optional[Shapes] = None
                           ) -> Optional[str]:
    """The checkpoint of ``work_dir`` to resume from, or None (see the module
    docstring); ``warn`` receives one message per skipped file."""
    warn = warn or (lambda msg: None)
    target, problem = _last_checkpoint_target(work_dir)
    if problem:
        warn(problem)
    named = osp.abspath(target) if target else None
    candidates = [named] if named else []
    if osp.isdir(work_dir):
        for name in sorted(os.listdir(work_dir)):
            path = osp.abspath(osp.join(work_dir, name))
            if CHECKPOINT_NAME.match(name) and osp.isfile(path) and \
                    path not in candidates:
                candidates.append(path)
    usable: List[Tuple[Progress, bool, str]] = []
    unfit: List[Tuple[Progress, str]] = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path, map_location='cpu',
                                   unsafe=unsafe_load)
            progress = _progress(path, ckpt)
        except CheckpointError as e:
            warn(f'skipping unreadable checkpoint: {e}')
            continue
        reason = _mismatch(path, ckpt.get('state_dict'), expected)
        del ckpt
        if reason:
            unfit.append((progress, reason))
        else:
            usable.append((progress, path == named, path))
    best = max(usable, default=None)
    for progress, reason in unfit:
        if best is None or progress > best[0]:
            raise CheckpointError(
                f'{reason}; it records more training (iter {progress[0]}) '
                'than any usable checkpoint, so resuming would overwrite '
                'it: resume it with the config it was trained with, or '
                'move it out of the work dir')
        warn(f'skipping checkpoint: {reason}')
    return best[2] if best else None
