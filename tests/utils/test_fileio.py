"""Atomic writes, all-or-nothing groups, recovery and stale temporaries."""
import json
import os
import subprocess
import sys
import threading

import pytest

from mmrepvgg.utils import fileio
from mmrepvgg.utils.fileio import (JOURNAL_SUFFIX, TMP_SUFFIX, atomic_write,
                                   atomic_write_bytes, atomic_write_group,
                                   recover_groups, remove_stale_temporaries)


def _text(content):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(content)
    return write


def _fail(tmp):
    with open(tmp, 'w') as f:
        f.write('partial')
    raise OSError('disk full')


def test_atomic_write_replaces_or_keeps(tmp_path):
    out = tmp_path / 'a.txt'
    atomic_write(str(out), _text('one'))
    with pytest.raises(OSError):
        atomic_write(str(out), _fail)
    assert out.read_text() == 'one'
    assert sorted(os.listdir(tmp_path)) == ['a.txt']


def test_atomic_write_bytes(tmp_path):
    out = tmp_path / 'sub' / 'b.bin'
    atomic_write_bytes(str(out), b'\x00\xff')
    assert out.read_bytes() == b'\x00\xff'
    atomic_write_bytes(str(out), 'caf\u00e9\n')  # str: UTF-8
    assert out.read_bytes() == 'caf\u00e9\n'.encode('utf-8')
    assert sorted(os.listdir(out.parent)) == ['b.bin']


def test_group_is_all_or_nothing(tmp_path):
    a, b = tmp_path / 'm.pth', tmp_path / 'm.py'
    atomic_write_group([(str(a), _text('A1')), (str(b), _text('B1'))])
    assert (a.read_text(), b.read_text()) == ('A1', 'B1')
    # The second writer fails: neither file changes, nothing is left over.
    with pytest.raises(OSError):
        atomic_write_group([(str(a), _text('A2')), (str(b), _fail)])
    assert (a.read_text(), b.read_text()) == ('A1', 'B1')
    # Ctrl-C while writing the second file: the same.

    def interrupted(tmp):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write_group([(str(a), _text('A3')), (str(b), interrupted)])
    assert (a.read_text(), b.read_text()) == ('A1', 'B1')
    assert sorted(os.listdir(tmp_path)) == ['m.pth', 'm.py']


def _dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, '-c', ''])
    proc.wait()
    return proc.pid


def test_group_killed_during_renames_is_completed_by_recovery(
        tmp_path, monkeypatch):
    a, b = tmp_path / 'm.pth', tmp_path / 'm.py'
    atomic_write_group([(str(a), _text('A1')), (str(b), _text('B1'))])
    real_replace = os.replace

    def dying_replace(src, dst):
        # The journal's own rename and the first file go through; the
        # process "dies" before the second rename.
        if str(dst).endswith('m.py'):
            raise SystemExit('killed')
        return real_replace(src, dst)

    # The interrupted writer is another process, gone by now.
    monkeypatch.setattr(os, 'getpid', lambda pid=_dead_pid(): pid)
    monkeypatch.setattr(fileio.os, 'replace', dying_replace)
    with pytest.raises(SystemExit):
        atomic_write_group([(str(a), _text('A2')), (str(b), _text('B2'))])
    monkeypatch.undo()
    # Mixed pair on disk now, with the journal that says how to finish it.
    assert (a.read_text(), b.read_text()) == ('A2', 'B1')
    assert any(n.endswith(JOURNAL_SUFFIX) for n in os.listdir(tmp_path))
    assert recover_groups(str(tmp_path)) == ['m.py']
    assert (a.read_text(), b.read_text()) == ('A2', 'B2')
    assert sorted(os.listdir(tmp_path)) == ['m.pth', 'm.py']
    assert recover_groups(str(tmp_path)) == []


def test_unreadable_journal_is_ignored(tmp_path):
    name = f'.x.{fileio._host()}.{_dead_pid()}{JOURNAL_SUFFIX}'
    (tmp_path / name).write_text('{not json')
    assert recover_groups(str(tmp_path)) == []
    assert os.listdir(tmp_path) == [name]


def test_group_needs_one_folder(tmp_path):
    (tmp_path / 'sub').mkdir()
    with pytest.raises(ValueError, match='folder'):
        atomic_write_group([(str(tmp_path / 'a'), _text('')),
                            (str(tmp_path / 'sub' / 'b'), _text(''))])


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    # A temporary whose writer was SIGKILLed ...
    code = ('import os, signal, sys\n'
            'from mmrepvgg.utils.fileio import atomic_write\n'
            'def w(tmp):\n'
            '    open(tmp, "w").write("half")\n'
            '    os.kill(os.getpid(), signal.SIGKILL)\n'
            f'atomic_write({str(tmp_path / "out.pth")!r}, w)\n')
    proc = subprocess.run([sys.executable, '-c', code])
    assert proc.returncode == -9
    stale = [n for n in os.listdir(tmp_path) if n.endswith(TMP_SUFFIX)]
    assert len(stale) == 1 and stale[0].startswith('.out.pth.')
    # ... one of a live process (this one), and a file that only looks alike.
    live = tmp_path / f'.out.pth.{fileio._host()}.{os.getpid()}.ab{TMP_SUFFIX}'
    live.write_text('mine')
    other = tmp_path / f'.notes{TMP_SUFFIX}'
    other.write_text('not ours')
    assert remove_stale_temporaries(str(tmp_path)) == stale
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name])


def test_journal_format_is_plain_json(tmp_path, monkeypatch):
    seen = {}
    real = fileio.atomic_write_bytes

    def spy(path, data):
        seen[os.path.basename(path)] = json.loads(data)
        return real(path, data)

    monkeypatch.setattr(fileio, 'atomic_write_bytes', spy)
    atomic_write_group([(str(tmp_path / 'a'), _text('1')),
                        (str(tmp_path / 'b'), _text('2'))])
    ((name, journal), ) = seen.items()
    assert name == f'.a.{fileio._host()}.{os.getpid()}{JOURNAL_SUFFIX}'
    assert journal['pid'] == os.getpid() and journal['host']
    assert [dst for _, dst in journal['renames']] == ['a', 'b']
    assert all(src.endswith(TMP_SUFFIX) for src, _ in journal['renames'])
    assert sorted(os.listdir(tmp_path)) == ['a', 'b']


def _plant(folder, pid, renames, host=None, name=None, temps=True):
    """A journal (and its temporaries) as an interrupted group of process
    ``pid`` would leave them; returns the journal's path."""
    host = fileio._host() if host is None else host
    if temps:
        for tmp, dest in renames:
            (folder / tmp).write_text(f'new {dest}')
    name = name or f'.{renames[0][1]}.{host}.{pid}{JOURNAL_SUFFIX}'
    journal = folder / name
    journal.write_text(json.dumps(dict(host=host, pid=pid,
                                       renames=renames)))
    return journal


def _temp(dest, pid, host=None):
    host = fileio._host() if host is None else host
    return f'.{dest}.{host}.{pid}.abc123{TMP_SUFFIX}'


def test_live_writers_journal_is_left_alone(tmp_path):
    # A journal whose writer still runs (here: a sleeping child) is not
    # touched by another process's recovery.
    child = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(30)'])
    try:
        journal = _plant(tmp_path, child.pid, [[_temp('a', child.pid), 'a']])
        assert recover_groups(str(tmp_path)) == []
        assert journal.exists()
    finally:
        child.kill()
        child.wait()
    assert recover_groups(str(tmp_path)) == ['a']
    assert (tmp_path / 'a').read_text() == 'new a'
    assert os.listdir(tmp_path) == ['a']


def _victim_folder(tmp_path):
    (tmp_path / 'model_final.pth').write_text('victim')
    (tmp_path / 'evil.bin').write_text('attacker')
    (tmp_path / 'sub').mkdir()
    return tmp_path


@pytest.mark.parametrize('case', [
    'other_host', 'foreign_source', 'source_is_folder', 'source_of_other_dest',
    'source_of_other_pid', 'pid_float', 'pid_inf', 'pid_list', 'pid_huge',
    'pid_bool', 'pid_zero', 'not_a_dict', 'renames_not_list', 'wrong_name',
    'too_large', 'symlink_journal', 'hard_linked_journal', 'symlinked_temp',
    'foreign_owner'])
def test_planted_journal_is_never_obeyed(case, tmp_path):
    """A journal or temporary someone else put in an output folder renames
    nothing, is left in place, and never stops a write there."""
    d = _victim_folder(tmp_path)
    pid = _dead_pid()
    host = fileio._host()
    renames = [['evil.bin', 'model_final.pth']]
    kw = dict(temps=False)
    if case == 'other_host':
        host = 'elsewhere'
        renames = [[_temp('model_final.pth', 1, host), 'model_final.pth']]
        kw = dict(host=host)
        pid = 1
    elif case == 'foreign_source':
        pass  # evil.bin is not a temporary of this module
    elif case == 'source_is_folder':
        tmp = _temp('model_final.pth', pid)
        (d / 'sub').rename(d / tmp)
        renames = [[tmp, 'model_final.pth']]
    elif case == 'source_of_other_dest':
        renames = [[_temp('evil.bin', pid), 'model_final.pth']]
        kw = {}
    elif case == 'source_of_other_pid':
        renames = [[_temp('model_final.pth', pid + 1), 'model_final.pth']]
        kw = {}
    elif case.startswith('pid_') or case in ('not_a_dict',
                                             'renames_not_list'):
        bad = dict(pid_float=1e30, pid_inf=float('inf'), pid_list=[1],
                   pid_huge=10**30, pid_bool=True, pid_zero=0).get(case)
        tmp = _temp('model_final.pth', pid)
        (d / tmp).write_text('planted')
        record = dict(host=host, pid=bad, renames=[[tmp,
                                                    'model_final.pth']])
        if case == 'not_a_dict':
            record = [record]
        elif case == 'renames_not_list':
            record = dict(host=host, pid=pid,
                          renames={tmp: 'model_final.pth'})
        (d / f'.model_final.pth.{host}.{bad}{JOURNAL_SUFFIX}').write_text(
            json.dumps(record))
        renames = None
    elif case == 'wrong_name':
        renames = [[_temp('model_final.pth', pid), 'model_final.pth']]
        kw = dict(name=f'.x{JOURNAL_SUFFIX}')
    elif case == 'too_large':
        renames = [[_temp('model_final.pth', pid), 'model_final.pth']]
        kw = dict(name='big')
    elif case in ('symlink_journal', 'hard_linked_journal'):
        renames = [[_temp('model_final.pth', pid), 'model_final.pth']]
        kw = dict(name='elsewhere')
    elif case == 'symlinked_temp':
        tmp = _temp('model_final.pth', pid)
        os.symlink(d / 'evil.bin', d / tmp)
        renames = [[tmp, 'model_final.pth']]
    elif case == 'foreign_owner':
        if os.geteuid() != 0:
            pytest.skip('needs root to plant a file of another user')
        renames = [[_temp('model_final.pth', pid), 'model_final.pth']]
        kw = {}
    if renames is not None:
        journal = _plant(d, pid, renames, **kw)
        real = d / f'.{renames[0][1]}.{host}.{pid}{JOURNAL_SUFFIX}'
        if case == 'too_large':
            journal.rename(real)
            with open(real, 'a') as f:  # valid JSON, padded
                f.write(' ' * fileio.JOURNAL_MAX_BYTES)
        elif case == 'symlink_journal':
            os.symlink(journal, real)
        elif case == 'hard_linked_journal':
            os.link(journal, real)
        elif case == 'foreign_owner':
            os.chown(journal, 4242, 4242)
    victim = (d / 'model_final.pth').lstat()
    journals = {n for n in os.listdir(d) if n.endswith(JOURNAL_SUFFIX)}
    assert recover_groups(str(d)) == []
    # Every write into the folder still works and moves nothing else.
    atomic_write(str(d / 'out.txt'), _text('mine'))
    atomic_write_group([(str(d / 'g1'), _text('1')),
                        (str(d / 'g2'), _text('2'))])
    assert (d / 'out.txt').read_text() == 'mine'
    assert ((d / 'g1').read_text(), (d / 'g2').read_text()) == ('1', '2')
    assert (d / 'model_final.pth').lstat().st_ino == victim.st_ino
    assert (d / 'model_final.pth').read_text() == 'victim'
    assert (d / 'evil.bin').read_text() == 'attacker'
    if case == 'source_is_folder':
        assert (d / renames[0][0]).is_dir()
    else:
        assert (d / 'sub').is_dir()
    if case not in ('source_is_folder', 'symlinked_temp'):
        # not a journal this module wrote: left as it was
        assert journals <= set(os.listdir(d))


def _finishes(fn, timeout=10):
    """Run ``fn`` in a thread; whether it returned within ``timeout``."""
    result = {}
    t = threading.Thread(target=lambda: result.update(value=fn()),
                         daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive() and 'value' in result


@pytest.mark.parametrize('kind', ['fifo', 'symlink'])
def test_journal_that_would_block_is_skipped(kind, tmp_path):
    """A FIFO journal hung every write; a symlink (to /dev/zero it ate
    memory) is never followed: shown with a symlink to a FIFO, which hangs
    instead of filling memory if that ever regresses."""
    pid = _dead_pid()
    journal = tmp_path / f'.a.{fileio._host()}.{pid}{JOURNAL_SUFFIX}'
    names = [journal.name, 'b']
    if kind == 'fifo':
        os.mkfifo(journal)
    else:
        os.mkfifo(tmp_path / 'fifo')
        os.symlink(tmp_path / 'fifo', journal)
        names.append('fifo')
    assert _finishes(lambda: recover_groups(str(tmp_path)))
    assert _finishes(lambda: atomic_write(str(tmp_path / 'b'), _text('b')))
    assert (tmp_path / 'b').read_text() == 'b'
    assert sorted(os.listdir(tmp_path)) == sorted(names)


@pytest.mark.parametrize('pid', ['9' * 40, '0', '4294967296', '\u0663'])
def test_planted_temporary_with_odd_pid_locks_nothing(pid, tmp_path):
    """``.p.vm.999...9.x.mmrepvgg-tmp`` made every write fail with
    OverflowError."""
    planted = tmp_path / f'.p.{fileio._host()}.{pid}.x{TMP_SUFFIX}'
    planted.write_text('planted')
    atomic_write(str(tmp_path / 'y.txt'), _text('y'))
    assert sorted(os.listdir(tmp_path)) == sorted([planted.name, 'y.txt'])


def test_stale_temporary_that_is_not_a_plain_file_of_ours_stays(tmp_path):
    pid = _dead_pid()
    link = tmp_path / _temp('a', pid)
    os.symlink(tmp_path / 'target', link)
    (tmp_path / 'target').write_text('kept')
    folder = tmp_path / _temp('b', pid).replace('abc123', 'abc124')
    folder.mkdir()
    names = [link.name, folder.name, 'target']
    if os.geteuid() == 0:
        foreign = tmp_path / _temp('c', pid)
        foreign.write_text('theirs')
        os.chown(foreign, 4242, 4242)
        names.append(foreign.name)
    assert remove_stale_temporaries(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == sorted(names)


def test_swapped_temporary_of_a_real_journal_is_not_renamed(tmp_path):
    """Our own interrupted group whose temporary was replaced by a symlink:
    the other renames complete, the symlink is not moved."""
    pid = _dead_pid()
    (tmp_path / 'secret').write_text('secret')
    renames = [[_temp('a', pid), 'a'], [_temp('b', pid), 'b']]
    _plant(tmp_path, pid, renames)
    (tmp_path / renames[1][0]).unlink()
    os.symlink(tmp_path / 'secret', tmp_path / renames[1][0])
    assert recover_groups(str(tmp_path)) == ['a']
    assert not (tmp_path / 'b').exists()
    assert os.path.islink(tmp_path / renames[1][0])


def test_scratch_dir_is_private_and_tidied(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    pid = _dead_pid()
    stale = tmp_path / f'.quantize.{fileio._host()}.{pid}.k1{TMP_SUFFIX}'
    (stale / 'tmpabc').mkdir(parents=True)  # what a SIGKILL leaves
    other = tmp_path / f'.other.{fileio._host()}.{pid}.k1{TMP_SUFFIX}'
    other.mkdir()
    with fileio.scratch_dir('quantize') as d:
        assert not stale.exists() and other.exists()
        assert os.path.dirname(d) == str(tmp_path)
        assert os.stat(d).st_mode & 0o777 == 0o700
        with tempfile.TemporaryDirectory() as inner:  # libraries' temps
            assert os.path.dirname(inner) == d
    assert not os.path.exists(d) and tempfile.tempdir == str(tmp_path)
    assert os.listdir(tmp_path) == [other.name]


def test_every_atomic_write_tidies_its_folder(tmp_path):
    stale = tmp_path / f'.x.pth.{fileio._host()}.999999999.zz{TMP_SUFFIX}'
    stale.write_text('left by a killed run')
    atomic_write(str(tmp_path / 'y.txt'), _text('y'))
    assert sorted(os.listdir(tmp_path)) == ['y.txt']


def test_outputs_never_replace_a_config_or_its_bases(tmp_path):
    """A config's ``_base_`` files (relative, in a list, two levels) are
    inputs too: the deploy config written over one changed every config
    inheriting it."""
    (tmp_path / 'cfgs').mkdir()
    (tmp_path / 'root.py').write_text('a = 1\n')
    (tmp_path / 'cfgs' / 'mid.py').write_text("_base_ = '../root.py'\n")
    child = tmp_path / 'cfgs' / 'child.py'
    child.write_text("_base_ = ['./mid.py']\nb = 2\n")
    for victim in ('root.py', 'cfgs/mid.py', 'cfgs/child.py'):
        with pytest.raises(fileio.ToolError,
                           match='refusing to overwrite the .*config'):
            fileio.check_output_paths([(str(child), 'input config')],
                                      [str(tmp_path / victim)])
    fileio.check_output_paths([(str(child), 'input config')],
                              [str(tmp_path / 'out.py')])
    # only configs have bases; an unparsable one is left to its loader
    (tmp_path / 'bad.py').write_text('_base_ = [\n')
    fileio.check_output_paths([(str(child), 'checkpoint'),
                               (str(tmp_path / 'bad.py'), 'config')],
                              [str(tmp_path / 'root.py')])
