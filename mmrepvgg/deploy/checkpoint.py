"""Safe checkpoint I/O (docs/safe_loading.md): :func:`load_checkpoint`
checks the zip archive (members stored, sizes consistent, CRCs right,
``data.pkl`` bounded), then :mod:`mmrepvgg.deploy.unpickle` reads it.
:func:`safe_loading` and :func:`register_safe_globals` route mmengine's
loads of local files through it; nothing is registered at import.
"""
import contextlib
import os
import os.path as osp
import threading
import zipfile
from typing import Any, BinaryIO, Iterator

import torch

from mmrepvgg.deploy.unpickle import Refused, unpickle
from mmrepvgg.utils.cli import ToolError, error_message
from mmrepvgg.utils.fileio import atomic_write

#: Largest ``data.pkl`` read (tensor data lives in other members).
MAX_PICKLE_BYTES = 256 << 20
_UNSAFE_HINT = 'pass --unsafe-load only if you trust this file'


class CheckpointError(ToolError, RuntimeError):
    """A checkpoint file that cannot be read or written."""


_ZIP_MAGIC = b'PK\x03\x04'
_EMPTY_ZIP_MAGIC = b'PK\x05\x06'
_NPY_MAGIC = b'\x93NUMPY'
_CHUNK = 1 << 20


# torch's legacy format pickles MAGIC_NUMBER (LONG1) after the header.
_LEGACY_MAGIC = b'\x8a\x0a' + torch.serialization.MAGIC_NUMBER.to_bytes(
    10, 'little')

def _not_torch(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f'{path}: not a valid checkpoint: {what}, not a PyTorch checkpoint '
        '(expected a file written by torch.save)')


def _sniff(path: str, head: bytes) -> str:
    """'zip' or 'legacy' for torch.save's formats, else CheckpointError."""
    if head.startswith(_ZIP_MAGIC):
        return 'zip'
    if head.startswith(b'\x80') and _LEGACY_MAGIC in head[:32]:
        return 'legacy'
    if head.startswith(_EMPTY_ZIP_MAGIC):
        raise _not_torch(path, 'an empty zip archive')
    if head.startswith(_NPY_MAGIC):
        raise _not_torch(path, 'a NumPy .npy file')
    if (len(head) > 9 and head[8:10] in (b'{"', b'{}')
            and int.from_bytes(head[:8], 'little') < (1 << 32)):
        raise _not_torch(path, 'a safetensors file')
    raise _not_torch(path, 'unknown content (neither a zip archive nor '
                     'torch\'s legacy format)')


def _check_archive(path: str, f: BinaryIO) -> zipfile.ZipFile:
    """The open archive, once every member is streamed and checked."""
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f'{path}: truncated or corrupt checkpoint '
                              f'(zip archive unreadable: {e})') from None
    names = archive.namelist()
    pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pickles) != 1:
        if names and all(n.endswith('.npy') for n in names):
            raise _not_torch(path, 'a NumPy .npz archive')
        raise _not_torch(path, 'a zip archive without data.pkl' if not
                         pickles else 'a zip archive with several data.pkl')
    if any(n.endswith('/constants.pkl') for n in names):
        raise CheckpointError(
            f'{path}: a TorchScript archive (torch.jit.save), not a '
            'checkpoint: load it with torch.jit.load')
    size = os.fstat(f.fileno()).st_size
    if sum(i.compress_size for i in archive.infolist()) > size:
        # Overlapping members would make every read below N times the file.
        raise CheckpointError(
            f'{path}: corrupt archive: its members declare more bytes than '
            f'the file holds ({size}); members overlap')
    for info in archive.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f'{path}: member {info.filename} is compressed; torch.save '
                'stores members uncompressed (a crafted or re-packed file)')
        if info.file_size != info.compress_size:
            raise CheckpointError(
                f'{path}: corrupt archive: stored member {info.filename} '
                f'declares {info.file_size} bytes but holds '
                f'{info.compress_size}')
        if info.filename == pickles[0] and info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f'{path}: {info.filename} declares {info.file_size} bytes, '
                f'more than the {MAX_PICKLE_BYTES} a checkpoint needs')
        try:
            with archive.open(info) as member:
                while member.read(_CHUNK):
                    pass
        except zipfile.BadZipFile as e:
            if 'CRC' in str(e):
                raise CheckpointError(
                    f'{path}: corrupt archive: CRC mismatch in '
                    f'{info.filename}') from None
            raise CheckpointError(
                f'{path}: truncated or corrupt checkpoint (member '
                f'{info.filename}: {e})') from None
        except (OSError, EOFError, ValueError, RuntimeError,
                NotImplementedError) as e:
            raise CheckpointError(
                f'{path}: truncated or corrupt checkpoint (member '
                f'{info.filename}: {type(e).__name__}: {e})') from None
    return archive


def _load_zip(path: str, archive: zipfile.ZipFile) -> Any:
    pickle_name = next(n for n in archive.namelist()
                       if n == 'data.pkl' or n.endswith('/data.pkl'))
    prefix = pickle_name[:-len('data.pkl')]
    order = f'{prefix}byteorder'
    if order in archive.namelist() and archive.read(order) != b'little':
        raise CheckpointError(f'{path}: a big-endian checkpoint; only '
                              'little-endian ones are read')

    def storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        # A fresh flat tensor of the record <prefix>data/<key>, numel long.
        name = f'{prefix}data/{key}'
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise Refused(f'storage {key} has no record {name}') from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.file_size != numel * itemsize:
            raise Refused(f'storage {key} declares {numel} x {itemsize} bytes '
                          f'but its record holds {info.file_size}')
        data = torch.empty(info.file_size, dtype=torch.uint8)
        with archive.open(info) as member:
            if info.file_size and member.readinto(
                    memoryview(data.numpy())) != info.file_size:
                raise Refused(f'storage {key}: record {name} is short')
        return data.view(dtype)

    try:
        return unpickle(archive.read(pickle_name), storage)
    except Refused as e:
        if e.trust:
            raise CheckpointError(
                f'{path}: refused to unpickle {e}: not on the safe '
                f'allowlist; {_UNSAFE_HINT}') from None
        raise CheckpointError(
            f'{path}: refused to unpickle: {e} (not how torch, numpy or '
            'mmengine write checkpoints: the file is crafted or '
            'corrupt)') from None
    except (ValueError, TypeError, RuntimeError, OverflowError,
            MemoryError, IndexError, KeyError, EOFError) as e:
        raise CheckpointError(
            f'{path}: not a valid checkpoint, truncated or corrupt '
            f'({error_message(e)})') from None


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for key in obj:
            obj[key] = _to_device(obj[key], device)
    elif type(obj) is list:
        obj[:] = [_to_device(v, device) for v in obj]
    elif type(obj) is tuple:
        return tuple(_to_device(v, device) for v in obj)
    return obj


def load_checkpoint(path: str,
                    map_location: Any = 'cpu',
                    unsafe: bool = False) -> Any:
    """Load a file written by ``torch.save`` safely, onto ``map_location``
    (None, 'cpu' or a device), or raise :class:`CheckpointError`. ``unsafe``:
    ``torch.load(weights_only=False)`` for trusted files only (the archive
    checks still apply; torch's legacy format loads only so).
    """
    path = os.fspath(path)
    if not osp.exists(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    if not osp.isfile(path):
        raise CheckpointError(f'{path}: not a file (expected a checkpoint '
                              'file written by torch.save)')
    if not (map_location is None or isinstance(map_location,
                                               (str, torch.device))):
        raise CheckpointError(f'{path}: map_location must be a device, got '
                              f'{type(map_location).__name__}')
    device = torch.device('cpu' if map_location in (None, 'default') else
                          map_location)
    try:
        f = open(path, 'rb')
    except OSError as e:
        raise CheckpointError(f'{path}: cannot read checkpoint '
                              f'({e.strerror or e})') from None
    with f:
        # One open file for the checks and the load: what is checked is
        # what is loaded, even if the path is replaced meanwhile.
        head = f.read(64)
        if not head:
            raise CheckpointError(f'{path}: empty file, not a checkpoint')
        kind = _sniff(path, head)
        f.seek(0)
        if kind == 'legacy' and not unsafe:
            raise CheckpointError(
                f'{path}: torch\'s legacy (pre-1.6) format is not read '
                'safely: re-save it with torch.save, or ' + _UNSAFE_HINT)
        if unsafe:
            if kind == 'zip':
                _check_archive(path, f).close()
                f.seek(0)
            try:
                return torch.load(f, map_location=map_location,
                                  weights_only=False)
            except Exception as e:  # any error of a trusted file's pickle
                raise CheckpointError(f'{path}: cannot be loaded '
                                      f'({error_message(e)})') from None
        with _check_archive(path, f) as archive:
            obj = _load_zip(path, archive)
    return obj if device.type == 'cpu' else _to_device(obj, device)


_LOCK = threading.RLock()
_DEPTH = 0
_PERMANENT = False
_SAVED: Any = None
_UNSAFE = [False]


def _mmengine_local_loader(filename: str, map_location: Any = None) -> Any:
    # 'default' and callables map to the CPU: mmengine copies the weights
    # into the model and the optimizer moves its state itself.
    if not isinstance(map_location, (str, torch.device)):
        map_location = 'cpu'
    return load_checkpoint(osp.expanduser(filename), map_location,
                           unsafe=_UNSAFE[0])


def _route(on: bool) -> None:
    global _SAVED
    from mmengine.runner.checkpoint import CheckpointLoader
    if on:
        _SAVED = CheckpointLoader._schemes.get('')
        CheckpointLoader._schemes[''] = _mmengine_local_loader
    elif _SAVED is not None:
        CheckpointLoader._schemes[''] = _SAVED


def register_safe_globals() -> None:
    """Route mmengine's loads of local checkpoints through
    :func:`load_checkpoint` for the rest of the process (idempotent)."""
    global _PERMANENT
    with _LOCK:
        if not _PERMANENT and _DEPTH == 0:
            _route(True)
        _PERMANENT = True


@contextlib.contextmanager
def safe_loading(unsafe: bool = False) -> Iterator[None]:
    """Route mmengine's loads of local checkpoints through
    :func:`load_checkpoint` while the block runs; re-entrant (the outermost
    block decides ``unsafe``), thread-safe, but process-wide."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            _UNSAFE[0] = unsafe
            if not _PERMANENT:
                _route(True)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _UNSAFE[0] = False
                if not _PERMANENT:
                    _route(False)


def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically; a failed write
    (disk full, quota) raises :class:`CheckpointError` and leaves ``path``
    as it was."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except OSError as e:
        raise CheckpointError(
            f'{path}: cannot write checkpoint ({e.strerror or e})') from None
    except RuntimeError as e:
        msg = str(e)
        if ('unexpected pos' in msg or 'PytorchStreamWriter' in msg
                or 'file write failed' in msg):
            raise CheckpointError(
                f'{path}: cannot write checkpoint: the write failed part-way '
                '(disk full, quota or file size limit?)') from None
        raise
