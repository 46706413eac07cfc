"""Atomic file writes: an output is either the complete new file or the
previous one, never a partial file.

Temporary files are written beside their destination (same file system, so
the final rename is atomic) and named ``.<name>.<host>.<pid>.<random>
.mmrepvgg-tmp``: a later run can tell a temporary left by a killed process
(same host, process gone) from one being written right now, and remove only
the former (:func:`remove_stale_temporaries`).

Several files that belong together (a deploy checkpoint and its config) are
committed with :func:`atomic_write_group`: every file is first written and
synced in full; a journal naming the renames is then written atomically, the
renames are done and the journal removed. A process killed during the renames
leaves the journal behind, and the next write into that folder
(:func:`recover_groups`, run by every atomic write) completes them, so a
reader never sees a new file of the group beside an old one once a tool has
run again there. No scheme without such a record can do that: after the
kill, nothing else tells which of the new files belong to an unfinished
group.

Because every write into a folder runs that recovery, and output folders may
be shared with other users (a sticky ``/tmp``-like folder) or hold files of
unknown origin, recovery obeys only what this module could have written
itself, and ignores (leaves in place, never fails on) anything else:

* a journal is read only if it is a regular file (``lstat``; opened with
  ``O_NOFOLLOW | O_NONBLOCK``, so a symlink, FIFO or device is never
  followed or waited on) with one link, owned by this user, at most
  :data:`JOURNAL_MAX_BYTES` long, named after its first file, host and pid,
  and recording this host and a process id in ``pid_t``'s range that no
  longer runs;
* it only renames its own temporaries: each entry moves
  ``.<dest>.<host>.<pid>.<random>.mmrepvgg-tmp`` (the journal's host and
  pid, a plain name in the same folder) to ``<dest>``, and only if that
  temporary is a regular file with one link owned by this user;
* a stale temporary is removed only under the same conditions (this host,
  a process id in range that no longer runs, a regular file of this user).

Another user can therefore neither steer a rename nor stop writes into a
shared folder, and a crafted name or journal (odd pid, wrong type, huge
size, FIFO, symlink) is skipped without a read or a system call that could
fail. :func:`scratch_dir` gives a tool a private temporary folder that a
later call removes if its process was killed.
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
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from mmrepvgg.utils.cli import ToolError

TMP_SUFFIX = '.mmrepvgg-tmp'
JOURNAL_SUFFIX = '.mmrepvgg-journal'
#: A journal names a few files; a longer file was not written here.
JOURNAL_MAX_BYTES = 8192
#: Largest process id (``pid_t`` is a 32-bit int); a name or journal with a
#: larger one was not written here.
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
    """``(dest, host, pid)`` of a name of this module's temporaries, else
    None."""
    m = _TEMP_NAME.fullmatch(name)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


def _sane_pid(pid) -> bool:
    return type(pid) is int and 0 < pid <= MAX_PID


def _plain_name(name: str) -> bool:
    return name not in ('', '.', '..') and '/' not in name and \
        '\0' not in name and (os.altsep is None or os.altsep not in name)


def _ours(st: Optional[os.stat_result], kind=stat.S_ISREG) -> bool:
    """A file of this user of ``kind`` with one link (never a symlink:
    ``st`` comes from ``lstat``)."""
    return st is not None and kind(st.st_mode) and \
        st.st_uid == os.geteuid() and (kind is stat.S_ISDIR or
                                       st.st_nlink == 1)


def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _gone(pid: int) -> bool:
    """Whether ``pid`` (in range) names no running process other than
    this one."""
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
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def _default_mode(path: str) -> None:
    # mkstemp creates 0600; give the file the usual 0666 minus umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_temp(path: str, write: Writer) -> str:
    """Write ``path``'s content to a synced temporary beside it; returns the
    temporary's path (removed again on any error). Interrupted groups of
    dead processes in that folder are completed and their stale temporaries
    removed first."""
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tidy(directory)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX,
                               dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _fsync_file(tmp)
        _default_mode(tmp)
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
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str, write: Writer) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``.

    The temporary file lives in the destination folder (same file system, so
    the rename is atomic) and is synced before the rename; on any error it is
    removed, so ``path`` is either the complete new file or untouched.
    """
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(osp.dirname(osp.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """:func:`atomic_write` of ``data`` (bytes, or str written as UTF-8)."""
    if isinstance(data, str):
        data = data.encode('utf-8')

    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_all(items: Sequence[Tuple[str, Writer]]) -> None:
    """Write files of any folders so that an error or Ctrl-C while writing
    leaves every destination untouched: all temporaries are written first,
    then renamed in order (the last item last).

    Unlike :func:`atomic_write_group` a kill between the renames is not
    repaired; use it for a tool's separate outputs, the group for files a
    reader must never see mixed.

    Args:
        items: ``(path, write)`` pairs, as for :func:`atomic_write`.
    """
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
    """Write several files as one all-or-nothing group.

    Every ``write(tmp)`` runs first; if any fails (or is interrupted) all
    temporaries are removed and no destination is touched. Otherwise the
    renames are recorded in a journal beside the files, done, and the
    journal removed; see the module docstring for the recovery after a kill.

    Args:
        items: ``(path, write)`` pairs; all paths must be in one folder.
    """
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
    """The ``(temporary, destination)`` names of a journal that this module
    could have written and whose writer is gone, else None (see the module
    docstring); never raises, never blocks."""
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
    """Complete the renames of ``journal`` if :func:`_read_journal` accepts
    it, moving only its own temporaries, then remove it (idempotent);
    returns the destinations it renamed."""
    pairs = _read_journal(journal)
    if pairs is None:
        return []
    directory = osp.dirname(journal)
    done = []
    for tmp, dest in pairs:
        src = osp.join(directory, tmp)
        if not _ours(_lstat(src)):  # renamed already, or not our file
            continue
        try:
            os.replace(src, osp.join(directory, dest))
            done.append(dest)
        except OSError:
            pass
    _fsync_dir(directory)
    _remove_quietly(journal)
    _fsync_dir(directory)
    return done


def recover_groups(directory: str) -> List[str]:
    """Complete every group write interrupted in ``directory`` (journals
    that this module wrote, of processes that no longer run; anything else
    is left alone).

    Returns:
        list[str]: destination names completed (empty if nothing was left).
    """
    done: List[str] = []
    for name in _listdir(directory):
        if name.startswith('.') and name.endswith(JOURNAL_SUFFIX):
            done.extend(_apply_journal(osp.join(directory, name)))
    return done


def tidy(directory: str) -> None:
    """:func:`recover_groups` then :func:`remove_stale_temporaries` (in this
    order: a pending group's temporaries are its data)."""
    recover_groups(directory)
    remove_stale_temporaries(directory)


def _stale(root: str, name: str, kind=stat.S_ISREG) -> bool:
    """Whether ``root/name`` is a temporary of this module (file, or folder
    of :func:`scratch_dir`) left by a process of this host that is gone."""
    parsed = _parse_temp(name)
    return parsed is not None and parsed[1] == _host() and \
        _sane_pid(parsed[2]) and _gone(parsed[2]) and \
        _ours(_lstat(osp.join(root, name)), kind)


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove temporaries left in ``directory`` by killed processes.

    Only regular files of this user named by this module, written on this
    host by a process that no longer exists, are removed; temporaries of
    live processes or other hosts, and anything else, are left alone.

    Returns:
        list[str]: the names removed.
    """
    removed: List[str] = []
    for name in _listdir(directory):
        if _stale(directory, name):
            try:
                os.remove(osp.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


@contextlib.contextmanager
def scratch_dir(tag: str) -> Iterator[str]:
    """A private folder for a tool's intermediate files, removed on exit.

    It is made (mode 0700) in the system's temporary folder, named like a
    temporary of this module (``.<tag>.<host>.<pid>.<random>.mmrepvgg-tmp``),
    and is :mod:`tempfile`'s default folder while the context is open, so
    the temporary files and folders of the libraries called meanwhile go
    inside too. A SIGKILL runs no clean-up: the folders of ``tag`` left by
    processes of this host that are gone are removed on entry.

    Args:
        tag (str): the tool's name (no ``.`` or ``/``).
    """
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


# ------------------------------------------------------ outputs vs inputs
def _identity(path: str):
    """``(st_dev, st_ino)`` of an existing file, else its real path (symlinks
    of every parent resolved)."""
    try:
        st = os.stat(path)
        return ('inode', st.st_dev, st.st_ino)
    except OSError:
        return ('path', osp.realpath(path))


def _with_bases(path: str, what: str, depth: int = 0) -> list:
    """``[(path, what)]`` and, for a config, every ``_base_`` file it
    inherits (mmengine's own resolution; a config that cannot be parsed is
    reported by its loader, not here)."""
    out = [(path, what)]
    if 'config' not in what.lower() or depth > 16 or not osp.isfile(path):
        return out
    from mmengine.config import Config
    try:
        bases = Config._get_base_files(path)
        for base in bases:
            base = Config._get_cfg_path(base, path)[0]
            out += _with_bases(base, f'base config of {path}', depth + 1)
    except Exception:  # noqa: B902  (any parse error: the loader says it)
        pass
    return out


def check_output_paths(inputs: Sequence[Tuple[str, str]],
                       outputs: Sequence[str],
                       error: type = ToolError) -> None:
    """Refuse any output that is (by file identity, through symlinks and
    hard links) one of the inputs or another output, and outputs that exist
    as folders. The one check every tool runs before it writes anything.

    Args:
        inputs: ``(path, what)`` of every file read; a ``what`` naming a
            config brings the ``_base_`` files it inherits along.
        outputs: every file to be written.
        error: the :class:`ToolError` subclass raised.
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
