"""``--resume`` chooses by recorded progress, inside the work dir, and
never resumes into (or overwrites) something it should not (issue 19)."""
import collections
import os

import pytest
import torch

from mmrepvgg.deploy import CheckpointError
from mmrepvgg.engine import find_resume_checkpoint

SHAPES = {'w': torch.Size([2]), 'b': torch.Size([])}


def _ckpt(path, epoch, state=None, mtime=None):
    state = {'w': torch.ones(2), 'b': torch.tensor(0.)} if state is None \
        else state
    torch.save({'meta': {'epoch': epoch, 'iter': 10 * epoch},
                'state_dict': state}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


def _find(wd, **kwargs):
    warnings = []
    found = find_resume_checkpoint(str(wd), warn=warnings.append,
                                   expected=SHAPES, **kwargs)
    return found, warnings


def test_recorded_progress_wins_over_file_times(tmp_path):
    """epoch_12.pth restored from a backup has the newest mtime: resuming
    from it would retrain and max_keep_ckpts would delete epoch_24.pth."""
    good = _ckpt(tmp_path / 'epoch_24.pth', 24, mtime=1e9)
    _ckpt(tmp_path / 'epoch_12.pth', 12, mtime=2e9)
    (tmp_path / 'last_checkpoint').write_text(good)
    assert _find(tmp_path) == (good, [])


def test_recorded_progress_wins_over_names(tmp_path):
    newest = _ckpt(tmp_path / 'epoch_3.pth', 30)
    _ckpt(tmp_path / 'epoch_9.pth', 9)
    assert _find(tmp_path)[0] == newest


def test_last_checkpoint_wins_a_tie(tmp_path):
    _ckpt(tmp_path / 'epoch_5.pth', 5)
    named = _ckpt(tmp_path / 'copy.pth', 5)
    (tmp_path / 'last_checkpoint').write_text(named)
    assert _find(tmp_path)[0] == named


@pytest.mark.parametrize('state', [{}, {'w': torch.ones(3)},
                                   {'w': torch.ones(2)}])
def test_a_newer_checkpoint_that_does_not_fit_stops_the_resume(
        tmp_path, state):
    """An empty state_dict resumed non-strictly from random weights and the
    good checkpoint was deleted; a wrong model is refused alike."""
    _ckpt(tmp_path / 'epoch_1.pth', 1)
    bad = _ckpt(tmp_path / 'epoch_2.pth', 2, state=state)
    with pytest.raises(CheckpointError) as e:
        _find(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f'{bad}: ') and 'records more training' in msg
    assert 'no weights' in msg or 'does not match the model' in msg


def test_an_older_checkpoint_that_does_not_fit_is_skipped(tmp_path):
    _ckpt(tmp_path / 'epoch_1.pth', 1, state={})
    good = _ckpt(tmp_path / 'epoch_2.pth', 2)
    found, warnings = _find(tmp_path)
    assert found == good and len(warnings) == 1
    assert 'epoch_1.pth: no weights' in warnings[0]


def test_last_checkpoint_outside_the_work_dir_is_ignored(tmp_path):
    other = tmp_path / 'other'
    other.mkdir()
    outside = _ckpt(other / 'epoch_50.pth', 50)
    _ckpt(other / 'epoch_60.pth', 60)
    wd = tmp_path / 'wd'
    wd.mkdir()
    good = _ckpt(wd / 'epoch_1.pth', 1)
    (wd / 'last_checkpoint').write_text(outside)
    found, warnings = _find(wd)
    assert found == good
    assert len(warnings) == 1 and 'outside the work dir' in warnings[0]


@pytest.mark.parametrize('kind', ['sparse', 'fifo', 'dir', 'lines'])
def test_a_strange_last_checkpoint_is_ignored_quickly(tmp_path, kind):
    good = _ckpt(tmp_path / 'epoch_1.pth', 1)
    pointer = tmp_path / 'last_checkpoint'
    if kind == 'sparse':  # 5 GiB of nothing: never read whole
        with open(pointer, 'wb') as f:
            f.truncate(5 << 30)
    elif kind == 'fifo':  # opening it to read would block forever
        os.mkfifo(pointer)
    elif kind == 'dir':
        pointer.mkdir()
    else:
        pointer.write_text(f'{good}\n{good}\n')
    found, warnings = _find(tmp_path)
    assert found == good and len(warnings) == 1
    assert str(pointer) in warnings[0]


def test_atomic_hook_never_deletes_a_later_step(tmp_path):
    """keep_ckpt_ids restored from a (tampered) message hub may name later
    steps: the hook only removes steps before the one it just wrote."""
    from unittest import mock

    from mmengine.fileio import LocalBackend

    from mmrepvgg.engine import AtomicCheckpointHook
    for step in (1, 2, 9):
        _ckpt(tmp_path / f'epoch_{step}.pth', step)
    hook = AtomicCheckpointHook(interval=1, max_keep_ckpts=1)
    hook.out_dir = str(tmp_path)
    hook.file_backend = LocalBackend()
    hook.keep_ckpt_ids = collections.deque([9, 1])
    runner = mock.MagicMock(work_dir=str(tmp_path))
    runner.save_checkpoint.side_effect = lambda d, name, **kw: _ckpt(
        os.path.join(d, name), 3)
    with mock.patch('mmrepvgg.engine.hooks.atomic_checkpoint_hook.'
                    'is_main_process', return_value=True):
        hook._save_checkpoint_with_step(runner, 3, {})
    assert sorted(p.name for p in tmp_path.glob('epoch_*.pth')) == [
        'epoch_2.pth', 'epoch_3.pth', 'epoch_9.pth']


def _damaged_newest(wd, kind):
    """epoch_1 and epoch_2 good, epoch_3 (newest, named by last_checkpoint)
    damaged as ``kind``."""
    _ckpt(wd / 'epoch_1.pth', 1, mtime=1e9 + 1)
    _ckpt(wd / 'epoch_2.pth', 2, mtime=1e9 + 2)
    (wd / 'last_checkpoint').write_text(str(wd / 'epoch_3.pth'))
    if kind == 'missing':
        return
    data = (wd / 'epoch_2.pth').read_bytes()
    if kind == 'truncated':
        data = data[:len(data) // 2]
    elif kind == 'empty':
        data = b''
    elif kind == 'flipped':  # same size, bytes changed inside
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + \
            data[mid + 64:]
    (wd / 'epoch_3.pth').write_bytes(data)


@pytest.mark.parametrize('kind', ['truncated', 'empty', 'flipped', 'missing'])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good(
        tmp_path, kind):
    _damaged_newest(tmp_path, kind)
    found, warnings = _find(tmp_path)
    assert found == str(tmp_path / 'epoch_2.pth')
    assert len(warnings) == 1, warnings
    if kind == 'missing':
        assert 'does not exist' in warnings[0]
    else:
        assert 'skipping unreadable checkpoint' in warnings[0]
        assert str(tmp_path / 'epoch_3.pth') in warnings[0]


def test_more_progress_wins_over_a_stale_last_checkpoint(tmp_path):
    """Killed after the new checkpoint was renamed into place but before
    last_checkpoint was updated: the file recording more progress wins."""
    _ckpt(tmp_path / 'epoch_1.pth', 1)
    _ckpt(tmp_path / 'epoch_2.pth', 2)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    assert _find(tmp_path)[0] == str(tmp_path / 'epoch_2.pth')


def test_nothing_readable_is_none(tmp_path):
    (tmp_path / 'epoch_1.pth').write_bytes(b'\0' * 100)
    found, warnings = _find(tmp_path)
    assert found is None and len(warnings) == 1
    assert find_resume_checkpoint(str(tmp_path / 'absent')) is None
