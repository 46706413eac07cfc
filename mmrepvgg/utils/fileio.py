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
leaves the journal behind, and the next :func:`recover_groups` on that folder
(every conversion runs it first) completes them, so a reader never sees a new
file of the group beside an old one once a tool has run again there.
"""
import json
import os
import os.path as osp
import socket
import tempfile
from typing import Callable, List, Sequence, Tuple

from mmrepvgg.utils.cli import ToolError

TMP_SUFFIX = '.mmrepvgg-tmp'
JOURNAL_SUFFIX = '.mmrepvgg-journal'

Writer = Callable[[str], None]


def _host() -> str:
    return socket.gethostname().replace('.', '_') or 'host'


def _tmp_prefix(path: str) -> str:
    return f'.{osp.basename(path)}.{_host()}.{os.getpid()}.'


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


def atomic_write_group(items: Sequence[Tuple[str, Writer]]) -> None:
    """Write several files as one all-or-nothing group.

    Every ``write(tmp)`` runs first; if any fails (or is interrupted) all
    temporaries are removed and no destination is touched. Otherwise the
    renames are recorded in a journal beside the first file, done, and the
    journal removed; see the module docstring for the recovery after a kill.

    Args:
        items: ``(path, write)`` pairs; all paths must be in one folder.
    """
    paths = [osp.abspath(p) for p, _ in items]
    directory = osp.dirname(paths[0])
    if any(osp.dirname(p) != directory for p in paths):
        raise ValueError('atomic_write_group: all files must share a folder')
    temps: List[str] = []
    try:
        for path, write in items:
            temps.append(_write_temp(path, write))
    except BaseException:
        for t in temps:
            _remove_quietly(t)
        raise
    renames = dict(host=_host(), pid=os.getpid(),
                   renames=[[osp.basename(t), osp.basename(p)]
                            for t, p in zip(temps, paths)])
    journal = osp.join(directory,
                       f'.{osp.basename(paths[0])}{JOURNAL_SUFFIX}')
    try:
        atomic_write(journal, lambda tmp: _write_json(tmp, renames))
    except BaseException:
        for t in temps:
            _remove_quietly(t)
        raise
    _apply_journal(journal)


def _write_json(path: str, obj) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f)


def _apply_journal(journal: str) -> List[str]:
    """Complete the renames of ``journal`` (idempotent); returns the
    destinations it renamed."""
    directory = osp.dirname(journal)
    with open(journal, encoding='utf-8') as f:
        renames = json.load(f)['renames']
    done = []
    for tmp, dest in renames:
        src = osp.join(directory, osp.basename(tmp))
        try:
            os.replace(src, osp.join(directory, osp.basename(dest)))
            done.append(dest)
        except FileNotFoundError:  # renamed already
            pass
    _fsync_dir(directory)
    _remove_quietly(journal)
    _fsync_dir(directory)
    return done


def _journal_owner_alive(journal: str) -> bool:
    with open(journal, encoding='utf-8') as f:
        owner = json.load(f)
    return owner.get('host') == _host() and _pid_alive(
        int(owner.get('pid', -1))) and int(owner['pid']) != os.getpid()


def recover_groups(directory: str) -> List[str]:
    """Complete every group write interrupted in ``directory`` (journals of
    processes that no longer run; a live writer's journal is left to it).

    Returns:
        list[str]: destination names completed (empty if nothing was left).
    """
    done: List[str] = []
    if not osp.isdir(directory):
        return done
    for name in sorted(os.listdir(directory)):
        if name.startswith('.') and name.endswith(JOURNAL_SUFFIX):
            path = osp.join(directory, name)
            try:
                if _journal_owner_alive(path):
                    continue  # its writer is renaming right now
                done.extend(_apply_journal(path))
            except FileNotFoundError:
                pass
            except (OSError, ValueError, TypeError, KeyError):
                # An unreadable journal was never completed by its writer
                # (it is written atomically): the group was not committed.
                _remove_quietly(path)
    return done


def tidy(directory: str) -> None:
    """:func:`recover_groups` then :func:`remove_stale_temporaries` (in this
    order: a pending group's temporaries are its data)."""
    recover_groups(directory)
    remove_stale_temporaries(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove temporaries left in ``directory`` by killed processes.

    Only files named by this module, written on this host by a process that
    no longer exists, are removed; temporaries of live processes or other
    hosts are left alone.

    Returns:
        list[str]: the names removed.
    """
    removed: List[str] = []
    if not osp.isdir(directory):
        return removed
    host = _host()
    for name in os.listdir(directory):
        if not (name.startswith('.') and name.endswith(TMP_SUFFIX)):
            continue
        parts = name[:-len(TMP_SUFFIX)].split('.')
        # '' . <basename parts...> . host . pid . random
        if len(parts) < 5 or parts[-3] != host or not parts[-2].isdigit():
            continue
        pid = int(parts[-2])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.remove(osp.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


# ------------------------------------------------------ outputs vs inputs
def _identity(path: str):
    """``(st_dev, st_ino)`` of an existing file, else its real path (symlinks
    of every parent resolved)."""
    try:
        st = os.stat(path)
        return ('inode', st.st_dev, st.st_ino)
    except OSError:
        return ('path', osp.realpath(path))


def check_output_paths(inputs: Sequence[Tuple[str, str]],
                       outputs: Sequence[str],
                       error: type = ToolError) -> None:
    """Refuse any output that is (by file identity, through symlinks and
    hard links) one of the inputs or another output, and outputs that exist
    as folders. The one check every tool runs before it writes anything.

    Args:
        inputs: ``(path, what)`` of every file read.
        outputs: every file to be written.
        error: the :class:`ToolError` subclass raised.
    """
    seen = {}
    for path, what in inputs:
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
