"""Atomic file writes: an output is the complete new file or the previous
one, never a partial file (docs/safe_loading.md#writing).

Temporaries (``.<name>.<host>.<pid>.<random>.mmrepvgg-tmp``) are written
beside their destination; :func:`atomic_write_group` commits files that
belong together through a journal, completed by the next write into the
folder if the writer was killed. Recovery acts only on what this module
could have written (single-link regular files of this user, this host, a
dead pid in range; a bounded journal renaming only its own temporaries)
and skips anything else without failing.
"""
import contextlib
import json
import os
import os.path as osp
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from mmrepvgg.utils.cli import ToolError

TMP_SUFFIX = '.mmrepvgg-tmp'
JOURNAL_SUFFIX = '.mmrepvgg-journal'
#: A longer journal was not written here.
JOURNAL_MAX_BYTES = 8192
#: Largest process id (``pid_t`` is a 32-bit int).
MAX_PID = 2**31 - 1
# '.<dest>.<host>.<pid>.<random>' + TMP_SUFFIX; host has no '.', the
# random part is tempfile's [a-z0-9_].
_TEMP_NAME = re.compile(r'\.(.+)\.([^./]+)\.([0-9]{1,10})\.[a-z0-9_]+' +
                        re.escape(TMP_SUFFIX))

Writer = Callable[[str], None]


def _host() -> str:
    return socket.gethostname().replace('.', '_') or 'host'


def _tmp_prefix(path: str) -> str:
    return f'.{osp.basename(path)}.{_host()}.{os.getpid()}.'


def _journal_name(first: str, host: str, pid: int) -> str:
    return f'.{first}.{host}.{pid}{JOURNAL_SUFFIX}'


def _parse_temp(name: str) -> Optional[Tuple[str, str, int]]:
    """``(dest, host, pid)`` of this module's temporaries' names, else
    None."""
    m = _TEMP_NAME.fullmatch(name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def _sane_pid(pid) -> bool:
    return type(pid) is int and 0 < pid <= MAX_PID


def _plain_name(name: str) -> bool:
    return name not in ('', '.', '..') and '/' not in name and \
        '\0' not in name and (os.altsep is None or os.altsep not in name)


def _ours(st: Optional[os.stat_result], kind=stat.S_ISREG) -> bool:
    # A file of this user of ``kind`` with one link (``st`` from lstat).
    return st is not None and kind(st.st_mode) and \
        st.st_uid == os.geteuid() and (kind is stat.S_ISDIR or
                                       st.st_nlink == 1)


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _gone(pid: int) -> bool:
    """Whether ``pid`` names no running process other than this one."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def _listdir(directory: str) -> List[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:  # not a folder, or not readable
        return []


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: str, write: Writer) -> str:
    """A synced temporary beside ``path`` with its content (removed on any
    error), once the folder's interrupted groups are completed (their
    temporaries are their data) and stale temporaries removed."""
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    recover_groups(directory)
    remove_stale_temporaries(directory)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX,
                               dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the usual 0666 minus umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _write_temps(items: Sequence[Tuple[str, Writer]]) -> List[str]:
    """:func:`_write_temp` of every item; all removed if any fails."""
    temps: List[str] = []
    try:
        for path, write in items:
            temps.append(_write_temp(path, write))
    except BaseException:
        for t in temps:
            _remove_quietly(t)
        raise
    return temps


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def atomic_write(path: str, write: Writer) -> None:
    """``write(tmp_path)``, then rename the synced temporary (in the same
    folder) to ``path``: ``path`` is the complete new file or untouched."""
    atomic_write_all([(path, write)])


def atomic_write_bytes(path: str, data: bytes) -> None:
    """:func:`atomic_write` of ``data`` (bytes, or str written as UTF-8)."""
    if isinstance(data, str):
        data = data.encode('utf-8')
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_all(items: Sequence[Tuple[str, Writer]]) -> None:
    """:func:`atomic_write` of ``(path, write)`` items of any folders, all
    temporaries written before the first rename, so that an error or Ctrl-C
    while writing touches no destination. A kill between the renames is not
    repaired: that is :func:`atomic_write_group`'s job."""
    temps = _write_temps(items)
    try:
        for tmp, (path, _) in zip(temps, items):
            os.replace(tmp, path)
            _fsync_dir(osp.dirname(osp.abspath(path)))
    except BaseException:
        for t in temps:
            _remove_quietly(t)
        raise


def atomic_write_group(items: Sequence[Tuple[str, Writer]]) -> None:
    """Write ``(path, write)`` items of one folder as an all-or-nothing
    group: all temporaries first, then a journal of the renames, the
    renames, the journal removed (see the module docstring)."""
    paths = [osp.abspath(p) for p, _ in items]
    directory = osp.dirname(paths[0])
    if any(osp.dirname(p) != directory for p in paths):
        raise ValueError('atomic_write_group: all files must share a folder')
    temps = _write_temps(items)
    host, pid = _host(), os.getpid()
    renames = [[osp.basename(t), osp.basename(p)]
               for t, p in zip(temps, paths)]
    record = json.dumps(dict(host=host, pid=pid, renames=renames))
    journal = osp.join(directory,
                       _journal_name(renames[0][1], host, pid))
    try:
        if len(record.encode('utf-8')) > JOURNAL_MAX_BYTES:
            raise ValueError('atomic_write_group: too many files or too '
                             f'long names for one journal ({renames})')
        atomic_write_bytes(journal, record)
    except BaseException:
        for t in temps:
            _remove_quietly(t)
        raise
    for tmp, dest in renames:
        os.replace(osp.join(directory, tmp), osp.join(directory, dest))
    _fsync_dir(directory)
    _remove_quietly(journal)
    _fsync_dir(directory)


def _read_journal(path: str) -> Optional[List[Tuple[str, str]]]:
    """The ``(temporary, destination)`` names of a journal this module could
    have written, of a writer that is gone, else None; never raises or
    blocks."""
    st = _lstat(path)
    if not _ours(st) or st.st_size > JOURNAL_MAX_BYTES:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fst = os.fstat(fd)  # the file lstat saw, still ours
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or \
                not _ours(fst):
            return None
        data = os.read(fd, JOURNAL_MAX_BYTES + 1)
        record = json.loads(data.decode('utf-8'))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if len(data) > JOURNAL_MAX_BYTES or not isinstance(record, dict):
        return None
    host, pid, renames = (record.get(k) for k in ('host', 'pid', 'renames'))
    if host != _host() or not _sane_pid(pid) or \
            not isinstance(renames, list) or not renames:
        return None
    pairs = []
    for item in renames:
        if not (isinstance(item, list) and len(item) == 2 and
                all(isinstance(s, str) for s in item)):
            return None
        tmp, dest = item
        if not _plain_name(dest) or _parse_temp(tmp) != (dest, host, pid):
            return None
        pairs.append((tmp, dest))
    if osp.basename(path) != _journal_name(pairs[0][1], host, pid) or \
            not _gone(pid):  # a live writer is renaming right now
        return None
    return pairs


def _apply_journal(journal: str) -> List[str]:
    """The renamed destinations of ``journal``, if :func:`_read_journal`
    accepts it; then it is removed."""
    pairs = _read_journal(journal)
    if pairs is None:
        return []
    directory = osp.dirname(journal)
    done = []
    for tmp, dest in pairs:
        src = osp.join(directory, tmp)
        if not _ours(_lstat(src)):  # renamed already, or not our file
            continue
        with contextlib.suppress(OSError):
            os.replace(src, osp.join(directory, dest))
            done.append(dest)
    _fsync_dir(directory)
    _remove_quietly(journal)
    _fsync_dir(directory)
    return done


def recover_groups(directory: str) -> List[str]:
    """Complete the interrupted group writes of ``directory``; returns the
    destination names completed."""
    done: List[str] = []
    for name in _listdir(directory):
        if name.startswith('.') and name.endswith(JOURNAL_SUFFIX):
            done.extend(_apply_journal(osp.join(directory, name)))
    return done


def _stale(root: str, name: str, kind=stat.S_ISREG) -> bool:
    """Whether ``root/name`` is a temporary (file, or folder of
    :func:`scratch_dir`) of a process of this host that is gone."""
    parsed = _parse_temp(name)
    return parsed is not None and parsed[1] == _host() and \
        _sane_pid(parsed[2]) and _gone(parsed[2]) and \
        _ours(_lstat(osp.join(root, name)), kind)


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove (and return the names of) the temporaries left in
    ``directory`` by killed processes of this host and user."""
    removed: List[str] = []
    for name in _listdir(directory):
        if _stale(directory, name):
            with contextlib.suppress(OSError):
                os.remove(osp.join(directory, name))
                removed.append(name)
    return removed


@contextlib.contextmanager
def scratch_dir(tag: str) -> Iterator[str]:
    """A private folder for a tool's files, :mod:`tempfile`'s default
    meanwhile, removed on exit (and on entry, those of ``tag``, a tool's
    name, left by killed processes of this host)."""
    root = tempfile.gettempdir()
    for name in _listdir(root):
        parsed = _parse_temp(name)
        if parsed and parsed[0] == tag and _stale(root, name, stat.S_ISDIR):
            shutil.rmtree(osp.join(root, name), ignore_errors=True)
    path = tempfile.mkdtemp(prefix=_tmp_prefix(tag), suffix=TMP_SUFFIX,
                            dir=root)
    previous, tempfile.tempdir = tempfile.tempdir, path
    try:
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)


def _identity(path: str):
    """``(st_dev, st_ino)`` of an existing file, else its real path."""
    try:
        st = os.stat(path)
        return ('inode', st.st_dev, st.st_ino)
    except OSError:
        return ('path', osp.realpath(path))


def _with_bases(path: str, what: str, depth: int = 0) -> list:
    """``[(path, what)]`` and, for a config, every ``_base_`` file it
    inherits."""
    out = [(path, what)]
    if 'config' not in what.lower() or depth > 16 or not osp.isfile(path):
        return out
    from mmengine.config import Config
    with contextlib.suppress(Exception):  # the loader reports parse errors
        for base in Config._get_base_files(path):
            base = Config._get_cfg_path(base, path)[0]
            out += _with_bases(base, f'base config of {path}', depth + 1)
    return out


def check_output_paths(inputs: Sequence[Tuple[str, str]],
                       outputs: Sequence[str],
                       error: type = ToolError) -> None:
    """Raise ``error`` for an output that is a folder, or (by file identity,
    through symlinks and hard links) an input or another output; the one
    check every tool runs before it writes anything.

    Args:
        inputs: ``(path, what)`` of every file read; a ``what`` naming a
            config brings its ``_base_`` files along.
    """
    seen = {}
    for path, what in (i for p, w in inputs for i in _with_bases(p, w)):
        if osp.exists(path):
            seen[_identity(path)] = f'the {what} {path}'
    for out in outputs:
        if osp.isdir(out):
            raise error(f'{out}: is a folder; expected a file path')
        ident = _identity(out)
        if ident in seen:
            raise error(f'{out}: refusing to overwrite {seen[ident]}; '
                        'choose another output path')
        seen[ident] = f'output {out} (two outputs would share one file)'
        # A not-yet-existing output may still be reached by another name.
        real = ('path', osp.realpath(out))
        if real != ident and real in seen:
            raise error(f'{out}: refusing to overwrite {seen[real]}; '
                        'choose another output path')
        seen[real] = seen[ident]


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """A new folder beside ``path`` to fill; on success it replaces
    ``path`` (a folder) whole, on any error it is removed."""
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(path)}.', dir=parent)
    try:
        yield tmp
        if osp.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
