"""Atomic writes, all-or-nothing groups, recovery and stale temporaries."""
import json
import os
import subprocess
import sys

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


def test_group_killed_during_renames_is_completed_by_recovery(
        tmp_path, monkeypatch):
    a, b = tmp_path / 'm.pth', tmp_path / 'm.py'
    atomic_write_group([(str(a), _text('A1')), (str(b), _text('B1'))])
    calls = []
    real_replace = os.replace

    def dying_replace(src, dst):
        # The journal's own rename and the first file go through; the
        # process "dies" before the second rename.
        if str(dst).endswith('m.py'):
            raise SystemExit('killed')
        calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, 'replace', dying_replace)
    with pytest.raises(SystemExit):
        atomic_write_group([(str(a), _text('A2')), (str(b), _text('B2'))])
    monkeypatch.setattr(fileio.os, 'replace', real_replace)
    # Mixed pair on disk now, with the journal that says how to finish it.
    assert (a.read_text(), b.read_text()) == ('A2', 'B1')
    assert any(n.endswith(JOURNAL_SUFFIX) for n in os.listdir(tmp_path))
    assert recover_groups(str(tmp_path)) == ['m.py']
    assert (a.read_text(), b.read_text()) == ('A2', 'B2')
    assert sorted(os.listdir(tmp_path)) == ['m.pth', 'm.py']
    assert recover_groups(str(tmp_path)) == []


def test_unreadable_journal_is_dropped(tmp_path):
    (tmp_path / f'.x{JOURNAL_SUFFIX}').write_text('{not json')
    assert recover_groups(str(tmp_path)) == []
    assert os.listdir(tmp_path) == []


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
    real = fileio._apply_journal

    def spy(journal):
        with open(journal) as f:
            seen['renames'] = json.load(f)
        return real(journal)

    monkeypatch.setattr(fileio, '_apply_journal', spy)
    atomic_write_group([(str(tmp_path / 'a'), _text('1')),
                        (str(tmp_path / 'b'), _text('2'))])
    journal = seen['renames']
    assert journal['pid'] == os.getpid() and journal['host']
    assert [dst for _, dst in journal['renames']] == ['a', 'b']
    assert all(src.endswith(TMP_SUFFIX) for src, _ in journal['renames'])


def test_live_writers_journal_is_left_alone(tmp_path):
    # A journal whose writer still runs (here: a sleeping child) is not
    # touched by another process's recovery.
    child = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(30)'])
    try:
        (tmp_path / '.tmpx').write_text('new')
        journal = tmp_path / f'.a{JOURNAL_SUFFIX}'
        journal.write_text(json.dumps(dict(
            host=fileio._host(), pid=child.pid,
            renames=[['.tmpx', 'a']])))
        assert recover_groups(str(tmp_path)) == []
        assert journal.exists()
    finally:
        child.kill()
        child.wait()
    assert recover_groups(str(tmp_path)) == ['a']
    assert (tmp_path / 'a').read_text() == 'new'


def test_every_atomic_write_tidies_its_folder(tmp_path):
    stale = tmp_path / f'.x.pth.{fileio._host()}.999999999.zz{TMP_SUFFIX}'
    stale.write_text('left by a killed run')
    atomic_write(str(tmp_path / 'y.txt'), _text('y'))
    assert sorted(os.listdir(tmp_path)) == ['y.txt']
