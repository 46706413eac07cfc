"""A kill while saving a checkpoint must not lose training (issue 9, item 2).

The first test SIGKILLs a real ``tools/train.py`` process in the middle of
writing a checkpoint (the toy config keeps one checkpoint,
``max_keep_ckpts=1``: mmengine's own hook deletes the previous one before
writing the new one in place, so this state used to hold no checkpoint at
all) and resumes it. The others exercise ``--resume``'s choice among good
and bad checkpoints and the hook's bookkeeping.
"""
import os
import os.path as osp
import shutil
import sys
import textwrap

import pytest

from _toolkit import TOOLS, TOY_CONFIG, load_tool, run_tool

# Imported by the killed run through custom_imports: during the save of
# checkpoint ``epoch``, write half of the bytes, sync them, and SIGKILL the
# process (as a crash or the OOM killer would).
KILL_MODULE = '''
import os
import signal

from mmengine.fileio.backends import local_backend
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillWhileSavingHook(Hook):
    priority = 'VERY_LOW'

    def __init__(self, epoch):
        self.epoch = epoch

    def before_save_checkpoint(self, runner, checkpoint):
        if checkpoint['meta'].get('epoch') != self.epoch:
            return

        def put_half_and_die(backend, obj, filepath):
            with open(filepath, 'wb') as f:
                f.write(obj[:len(obj) // 2])
                f.flush()
                os.fsync(f.fileno())
            with open(os.environ['KILL_MARKER'], 'w') as f:
                f.write(str(filepath))
            os.kill(os.getpid(), signal.SIGKILL)

        local_backend.LocalBackend.put = put_half_and_die
'''


def _options(epochs):
    # No validation: these tests are about checkpoints.
    return ['--cfg-options', f'train_cfg.max_epochs={epochs}',
            'train_cfg.val_interval=1000',
            'default_hooks.checkpoint.interval=1',
            'default_hooks.logger.interval=1', 'param_scheduler.0.end=2']


def _train(ws, config, work_dir, extra=(), epochs=3, env=None):
    return run_tool([sys.executable, osp.join(TOOLS, 'train.py'), str(config),
                     '--work-dir', str(work_dir)] + list(extra) +
                    _options(epochs), cwd=ws, env_extra=env, timeout=300)


def _loads(path):
    from mmrepvgg.deploy import load_checkpoint
    return load_checkpoint(str(path))['meta']


def _pointer(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read().strip()


def _temporaries(work_dir):
    return sorted(n for n in os.listdir(work_dir) if n.endswith('-tmp'))


def test_sigkill_while_saving_keeps_a_checkpoint_and_resume_finishes(
        toy_workspace, tmp_path):
    ws = toy_workspace
    (tmp_path / 'kill_while_saving.py').write_text(KILL_MODULE)
    config = tmp_path / 'toy_killed.py'
    config.write_text(textwrap.dedent(f'''
        _base_ = {TOY_CONFIG!r}
        custom_imports = dict(imports=['mmrepvgg', 'kill_while_saving'],
                              allow_failed_imports=False)
        custom_hooks = [dict(type='KillWhileSavingHook', epoch=2)]
        '''))
    wd = tmp_path / 'work'
    marker = tmp_path / 'killed_at'
    env = dict(PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get('PYTHONPATH', '')]),
        KILL_MARKER=str(marker))

    proc = _train(ws, config, wd, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == -9, out[-3000:]  # really killed
    half_written = marker.read_text()
    # The kill hit the write of epoch 2, into a temporary, not epoch_2.pth.
    assert osp.basename(half_written).startswith('.epoch_2.pth.')
    assert _temporaries(wd) == [osp.basename(half_written)]
    assert not (wd / 'epoch_2.pth').exists()
    # The previous checkpoint survives (max_keep_ckpts=1 deleted it before
    # the new one was written, with mmengine's hook), complete, and
    # last_checkpoint names it.
    assert (wd / 'epoch_1.pth').is_file()
    assert _pointer(wd) == str(wd / 'epoch_1.pth')
    assert _loads(_pointer(wd))['epoch'] == 1

    proc = _train(ws, TOY_CONFIG, wd, ['--resume'])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f'resuming from {wd / "epoch_1.pth"}' in out
    assert 'resumed epoch: 1' in out
    assert 'Traceback' not in out
    # Finished: one complete checkpoint kept, named by last_checkpoint, the
    # killed run's temporary cleaned up.
    assert sorted(n for n in os.listdir(wd) if n.endswith('.pth')) == \
        ['epoch_3.pth']
    assert _pointer(wd) == str(wd / 'epoch_3.pth')
    assert _loads(wd / 'epoch_3.pth')['epoch'] == 3
    assert _temporaries(wd) == []


@pytest.fixture
def three_checkpoints(toy_trained, tmp_path):
    """A work dir with epoch_1 (good), epoch_2 (good), and the newer
    epoch_3.pth given by the test, last_checkpoint naming epoch_3."""
    wd = tmp_path / 'work'
    wd.mkdir()
    for epoch in (1, 2):
        shutil.copy(toy_trained['ckpt'], wd / f'epoch_{epoch}.pth')
        os.utime(wd / f'epoch_{epoch}.pth', (1e9 + epoch, 1e9 + epoch))
    (wd / 'last_checkpoint').write_text(str(wd / 'epoch_3.pth'))
    return wd


def _make_latest(wd, kind, good):
    latest = wd / 'epoch_3.pth'
    data = good.read_bytes()
    if kind == 'truncated':
        latest.write_bytes(data[:len(data) // 2])
    elif kind == 'empty':
        latest.write_bytes(b'')
    elif kind == 'flipped':  # same size, bytes changed inside a tensor
        blob = bytearray(data)
        mid = len(blob) // 2
        blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])
        latest.write_bytes(bytes(blob))
    elif kind == 'missing':
        pass
    if latest.exists():
        os.utime(latest, (1e9 + 3, 1e9 + 3))


def test_resume_skips_a_truncated_latest_checkpoint(toy_trained,
                                                    three_checkpoints):
    """A real --resume: epoch_3.pth truncated, last_checkpoint naming it:
    one warning, training continues from epoch_2.pth and finishes."""
    wd = three_checkpoints
    _make_latest(wd, 'truncated', toy_trained['ckpt'])
    proc = _train(toy_trained['ws'], TOY_CONFIG, wd, ['--resume'], epochs=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines()
                if ln.startswith('warning: ')]
    assert len(warnings) == 1 and 'epoch_3.pth' in warnings[0], warnings
    assert f'resuming from {wd / "epoch_2.pth"}' in out
    assert 'Traceback' not in out


def test_explicit_resume_of_a_bad_file_is_one_line(toy_trained, tmp_path,
                                                   capsys):
    bad = tmp_path / 'epoch_9.pth'
    bad.write_bytes(toy_trained['ckpt'].read_bytes()[:5000])
    train = load_tool('train')
    for path, expect in ((bad, 'corrupt checkpoint'),
                         (tmp_path / 'absent.pth', 'no such checkpoint')):
        code = train.main([TOY_CONFIG, '--work-dir', str(tmp_path / 'w'),
                           '--resume', str(path)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 1, lines
        assert len(lines) == 1 and lines[0].startswith('error: --resume: ')
        assert str(path) in lines[0] and expect in lines[0], lines
    assert not (tmp_path / 'w').exists()  # refused before the runner
