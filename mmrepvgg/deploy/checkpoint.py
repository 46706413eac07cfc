"""Safe checkpoint I/O.

torch >= 2.6 loads with ``weights_only=True`` by default, which refuses the
objects mmengine's runner pickles into its checkpoints: ``HistoryBuffer`` in
``message_hub``, numpy arrays and scalars in ``meta``. This module allowlists
exactly those, without trusting numpy's own unpickling code:

- numpy's reconstruction globals (``numpy._core.multiarray._reconstruct``,
  ``numpy.dtype``, ``numpy._core.multiarray.scalar``; also under the numpy 1
  names ``numpy.core.multiarray.*``) are mapped to wrappers of this module.
  They accept exactly the arguments numpy's own pickles use and return
  *placeholders*; the one ``BUILD`` that follows in numpy's pickle format
  validates the state (plain numeric dtype, ``bytes`` data of exactly the
  right size) and puts a *fresh, private* array / dtype in the placeholder's
  place on the unpickler's stack and memo. No numpy type is ever a ``BUILD``
  target, so ``ndarray.__setstate__`` / ``dtype.__setstate__`` never run on
  an object a pickle can reach: no array can alias another's memory or the
  pickle's bytes, no shared dtype can be mutated. (This relies on torch's
  weights-only unpickler running BUILD from ``Unpickler.load`` on its
  ``stack``/``memo``; should a torch version change that, numpy objects
  are refused - fail closed - and tests/deploy/test_safe_unpickle.py says
  so.)
- ``numpy.ndarray`` is an inert token: it can only be the first argument of
  the ``_reconstruct`` wrapper (calling or instantiating it is refused).
- ``mmengine.logging.HistoryBuffer``, and ``builtins.getattr`` replaced by a
  stand-in that only resolves ``getattr(HistoryBuffer, 'min' | 'max' |
  'mean' | 'current')`` (how mmengine pickles its statistics methods).

Scope: nothing is registered at import. :func:`load_checkpoint` uses the
allowlist for its own ``torch.load``; :func:`safe_loading` is a (re-entrant)
context manager that allowlists it while a block runs, for loads made by
other code (mmengine's runner: ``load_from``, ``resume``).
:func:`register_safe_globals` registers it process-wide, for programs that
ask for it.
"""
import contextlib
import os
import os.path as osp
import pickle
import re
import sys
import threading
import zipfile
from typing import Any, BinaryIO, Iterator, List, Optional, Tuple

import torch

from mmrepvgg.utils.cli import ToolError
from mmrepvgg.utils.fileio import atomic_write

__all__ = [
    'CheckpointError', 'atomic_write', 'load_checkpoint',
    'register_safe_globals', 'safe_globals', 'safe_loading', 'save_checkpoint'
]


class CheckpointError(ToolError, RuntimeError):
    """A checkpoint file that cannot be read or written (the message names
    the file and what was expected)."""


# ----------------------------------------------------------------- refusals
#: Prefix of the unpickling errors raised by this module, so that
#: :func:`load_checkpoint` can tell them from torch's own ones.
_MARK = '[mmrepvgg] '


class _Refused(pickle.UnpicklingError):
    """A pickle construct outside what numpy/mmengine pickles produce."""

    def __init__(self, what: str, trust_hint: bool = False) -> None:
        # ``trust_hint``: the construct is legitimate but not allowlisted
        # (e.g. an object array), so --unsafe-load may be the way out.
        tag = 'allowlist' if trust_hint else 'malformed'
        super().__init__(f'{_MARK}{tag}: {what}')


#: Key for the private constructors below. A pickle can only push
#: allowlisted globals and plain data, never this object.
_KEY = object()


def _check_key(cls: Any, key: Any) -> None:
    if key is not _KEY:
        # ``cls`` is the token itself when a pickle runs NEWOBJ on it.
        name = getattr(cls, 'name', None) or getattr(cls, '__name__', '?')
        raise _Refused(f'{name} cannot be created by a pickle')


# ------------------------------------------------------- numpy: what we allow
#: Plain numeric dtypes, as numpy's ``dtype.__reduce__`` names them
#: (``np.dtype('f8', False, True)``). No object, string, void, structured,
#: sub-array, datetime or metadata-carrying dtype.
_DTYPE_CODES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2',
                'f4', 'f8', 'c8', 'c16')
#: numpy's array pickle state: ``(version, shape, dtype, is_fortran, data)``.
_ARRAY_STATE_VERSION = 1
#: numpy's dtype pickle state for plain dtypes: ``(version, byteorder,
#: subarray, names, fields, elsize, alignment, flags)``.
_DTYPE_STATE_VERSION = 3
_MAX_DIMS = 64


def _np():
    import numpy as np
    return np


def _allowed_dtype(dt: Any, what: str) -> Any:
    """numpy's own dtype object equal to ``dt`` if ``dt`` is a plain numeric
    dtype (no fields, sub-array or metadata), else :class:`_Refused`."""
    np = _np()
    if isinstance(dt, _PendingDtype):
        raise _Refused(f'{what}: dtype used before its state was set')
    if not isinstance(dt, np.dtype):
        raise _Refused(f'{what}: expected a numpy dtype, got '
                       f'{type(dt).__name__}')
    if (dt.names is not None or dt.subdtype is not None
            or dt.metadata is not None
            or f'{dt.kind}{dt.itemsize}' not in _DTYPE_CODES):
        raise _Refused(
            f'{what}: dtype {dt} is not a plain numeric dtype', True)
    return np.dtype(dt.str)


def _check_bytes(data: Any, size: int, what: str) -> None:
    # ``type(...) is bytes``: no bytearray, memoryview, array or other
    # buffer (those could be shared with, or alias, other objects).
    if type(data) is not bytes:
        raise _Refused(f'{what}: data must be a bytes object as numpy '
                       f'pickles it, got {type(data).__name__}')
    if len(data) != size:
        raise _Refused(f'{what}: {len(data)} bytes of data, expected {size}')


def _check_bool_bytes(data: bytes, dt: Any, what: str) -> None:
    if dt.kind == 'b' and data.translate(None, b'\x00\x01'):
        raise _Refused(f'{what}: bool data other than 0/1')


class _Token:
    """An inert stand-in for ``numpy.ndarray`` in pickles: it can only be
    passed to the ``_reconstruct`` wrapper, not called or instantiated."""
    __slots__ = ('name', )

    def __new__(cls, key: Any = None, name: str = '') -> '_Token':
        # NEWOBJ on the token calls ``token.__new__(token, *args)``.
        _check_key(cls, key)
        self = object.__new__(cls)
        self.name = name
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(f'{self.name} may only appear as the first argument '
                       'of numpy._core.multiarray._reconstruct')

    def __repr__(self) -> str:
        return f'<allowlist token {self.name}>'


_NDARRAY = _Token(_KEY, 'numpy.ndarray')


def _unpickler_load_code() -> Any:
    from torch import _weights_only_unpickler
    return _weights_only_unpickler.Unpickler.load.__code__


class _Pending:
    """A placeholder returned by a numpy wrapper, waiting for its state.

    numpy's pickle format is ``REDUCE`` (placeholder created here), memoize,
    ``BUILD`` (state). torch's weights-only unpickler runs ``BUILD`` as
    ``stack[-1].__setstate__(state)`` for allowlisted types (and for nothing
    else): :meth:`__setstate__` validates the state once, builds the real
    object, and puts it in the placeholder's place on the unpickler's stack
    and memo, so the loaded structure holds plain numpy objects. The caller
    must be that unpickler's ``load`` (checked); a second ``BUILD`` is
    refused.
    """
    __slots__ = ('_args', '_done')
    _what = 'object'

    def __new__(cls, key: Any = None, args: Tuple = ()) -> '_Pending':
        _check_key(cls, key)
        self = object.__new__(cls)
        self._args = args
        self._done = False
        return self

    def _build(self, state: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __setstate__(self, state: Any) -> None:
        if self._done:
            raise _Refused(f'second BUILD on a numpy {self._what}')
        self._done = True
        caller = sys._getframe(1)
        unpickler = caller.f_locals.get('self') if (
            caller.f_code is _unpickler_load_code()) else None
        stack = getattr(unpickler, 'stack', None)
        memo = getattr(unpickler, 'memo', None)
        if (not isinstance(stack, list) or not stack or stack[-1] is not self
                or not isinstance(memo, dict)):
            raise _Refused(f'numpy {self._what} state set outside the '
                           'weights-only unpickler\'s BUILD')
        value = self._build(state)
        stack[-1] = value
        # numpy's format memoizes the placeholder right before its state, so
        # it is among the last memo entries (a few for the state's parts).
        for n, key in enumerate(reversed(memo)):
            if memo[key] is self:
                memo[key] = value
                break
            if n >= 256:
                break

    def __reduce__(self) -> Any:
        raise TypeError(f'cannot pickle an unfinished numpy {self._what}')

    def __repr__(self) -> str:
        return f'<unfinished numpy {self._what}>'


class _PendingArray(_Pending):
    __slots__ = ()
    _what = 'array'

    def _build(self, state: Any) -> Any:
        np = _np()
        what = 'numpy array'
        if type(state) is not tuple or len(state) != 5:
            raise _Refused(f'{what}: state must be numpy\'s 5-tuple')
        version, shape, dtype, is_fortran, data = state
        if type(version) is not int or version != _ARRAY_STATE_VERSION:
            raise _Refused(f'{what}: state version {version!r}, expected '
                           f'{_ARRAY_STATE_VERSION}')
        if (type(shape) is not tuple or len(shape) > _MAX_DIMS
                or any(type(d) is not int or d < 0 for d in shape)):
            raise _Refused(f'{what}: shape must be a tuple of at most '
                           f'{_MAX_DIMS} non-negative ints')
        if type(is_fortran) not in (bool, int) or is_fortran not in (0, 1):
            raise _Refused(f'{what}: is_fortran must be a bool')
        dt = _allowed_dtype(dtype, what)
        count = 1
        for d in shape:
            count *= d
        _check_bytes(data, count * dt.itemsize, what)
        _check_bool_bytes(data, dt, what)
        # A fresh array numpy itself fills from a private copy of the data
        # (numpy keeps large bytes objects as the array's base).
        arr = np.ndarray.__new__(np.ndarray, (0, ), np.uint8)
        arr.__setstate__((version, shape, dt, bool(is_fortran),
                          bytes(memoryview(data))))
        return arr


class _PendingDtype(_Pending):
    __slots__ = ()
    _what = 'dtype'

    def _build(self, state: Any) -> Any:
        np = _np()
        code = self._args[0]
        what = f'numpy dtype {code!r}'
        if type(state) is not tuple or len(state) != 8 or any(
                type(x) not in (int, str, type(None)) for x in state):
            raise _Refused(f'{what}: state must be numpy\'s 8-tuple')
        byteorder = state[1]
        if byteorder not in ('<', '>', '|', '='):
            raise _Refused(f'{what}: byte order {byteorder!r}')
        dt = np.dtype(code)
        if byteorder in ('<', '>'):
            dt = dt.newbyteorder(byteorder)
        expected = dt.__reduce__()[2]
        # Only the byte order may vary; sizes, fields, names, sub-array and
        # flags must be exactly those of the plain dtype.
        if state[0] != _DTYPE_STATE_VERSION or state[2:] != expected[2:]:
            raise _Refused(f'{what}: state {state!r} is not that of a plain '
                           f'dtype ({expected!r})')
        return dt


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
    """Stand-in for ``numpy._core.multiarray._reconstruct`` while unpickling.

    numpy pickles every array as ``_reconstruct(ndarray, (0,), b'b')`` plus
    one ``BUILD``; only that call is accepted.
    """
    if (subtype is not _NDARRAY or type(shape) is not tuple
            or len(shape) != 1 or type(shape[0]) is not int or shape[0] != 0
            or type(typecode) is not bytes or typecode != b'b'):
        raise _Refused('numpy._core.multiarray._reconstruct: only numpy\'s '
                       '_reconstruct(numpy.ndarray, (0,), b\'b\') is allowed '
                       '(plain arrays, no subclasses)')
    return _PendingArray(_KEY)


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> _PendingDtype:
    """Stand-in for ``numpy.dtype`` while unpickling: plain numeric dtypes
    as numpy pickles them, ``dtype('f8', False, True)`` plus one ``BUILD``.
    The pickle's state only selects the byte order of a dtype numpy creates;
    no dtype object (numpy's shared ones included) is ever modified."""
    if type(obj) is not str or obj not in _DTYPE_CODES:
        raise _Refused(f'numpy.dtype({obj!r}): only plain numeric dtypes '
                       f'({", ".join(_DTYPE_CODES)}) are allowed', True)
    if align is not False or type(copy) is not bool:
        raise _Refused(f'numpy.dtype({obj!r}, {align!r}, {copy!r}): only '
                       'numpy\'s own (code, False, True) arguments')
    return _PendingDtype(_KEY, (obj, ))


def _scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for ``numpy._core.multiarray.scalar``: a numpy scalar of a
    plain numeric dtype from exactly ``itemsize`` bytes (copied)."""
    np = _np()
    what = 'numpy scalar'
    dt = _allowed_dtype(dtype, what)
    _check_bytes(data, dt.itemsize, what)
    _check_bool_bytes(data, dt, what)
    return np.frombuffer(data, dtype=dt, count=1)[0]


def _empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``builtins.bytes``: protocol 2 pickles ``b''`` (the data
    of an empty array) as ``bytes()``; nothing else is accepted."""
    if args:
        raise _Refused('builtins.bytes: only bytes() (empty) is allowed')
    return b''


# ------------------------------------------------------------ mmengine's part
#: HistoryBuffer's built-in statistics methods.
_HISTORY_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_getattr(obj: Any, name: Any) -> Any:
    """Stand-in for ``builtins.getattr`` while unpickling.

    mmengine pickles ``HistoryBuffer``'s statistics methods as
    ``getattr(HistoryBuffer, 'min')`` (protocol 2 names methods that way).
    Only that is allowed: the class itself and its four built-in statistics,
    so the allowlisted name cannot reach any other attribute.
    """
    from mmengine.logging import HistoryBuffer
    if (obj is HistoryBuffer and type(name) is str
            and name in _HISTORY_STATISTICS):
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'Unsupported global: GLOBAL builtins.getattr on '
        f'{obj!r}.{name!r} (only HistoryBuffer statistics methods are '
        'allowed)')


# ---------------------------------------------------------------- allowlist
# Names under which the placeholder types are registered: torch's BUILD
# needs their types in the allowlist, but a GLOBAL opcode reads a name up to
# a newline, so a pickle can never name (and push) these classes.
_UNNAMEABLE = 'mmrepvgg.deploy.checkpoint.\n'

_ALLOWLIST: Optional[List[Any]] = None
_ALLOWLIST_LOCK = threading.RLock()


def _numpy_entries() -> List[Any]:
    out: List[Any] = [
        (_NDARRAY, 'numpy.ndarray'),
        (_dtype, 'numpy.dtype'),
        (_PendingArray, _UNNAMEABLE + '_PendingArray'),
        (_PendingDtype, _UNNAMEABLE + '_PendingDtype'),
    ]
    # Protocol 2 writes b'' as __builtin__.bytes() (torch maps the name).
    out += [(_empty_bytes, 'builtins.bytes'),
            (_empty_bytes, '__builtin__.bytes')]
    # numpy 2 pickles name numpy._core, numpy 1 ones numpy.core.
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        out.append((_reconstruct, f'{module}._reconstruct'))
        out.append((_scalar, f'{module}.scalar'))
    return out


def _mmengine_entries() -> List[Any]:
    try:
        from mmengine.logging import HistoryBuffer
    except ImportError:  # mmengine absent: nothing of it to allow
        return []
    # Protocol-2 pickles name it __builtin__.getattr (torch maps it too).
    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
            (_history_buffer_getattr, '__builtin__.getattr')]


def safe_globals() -> List[Any]:
    """The allowlist entries mmengine checkpoints need (see module doc), in
    the form ``torch.serialization.add_safe_globals`` takes.

    Always the same entries (torch removes entries by equality, so adding
    and removing must use equal ones); a new list each call.
    """
    global _ALLOWLIST
    with _ALLOWLIST_LOCK:
        if _ALLOWLIST is None:
            _ALLOWLIST = _numpy_entries() + _mmengine_entries()
        return list(_ALLOWLIST)


_DEPTH = 0
_PERMANENT = False
_ACTIVE: Optional[Any] = None


def register_safe_globals() -> None:
    """Allowlist :func:`safe_globals` process-wide, for every
    ``torch.load(weights_only=True)`` of this process, from now on.

    Not done by ``import mmrepvgg``: only programs that ask for it (e.g.
    mmdet's own tools with ``--resume``) call it. Idempotent; a no-op on
    torch without ``add_safe_globals`` (< 2.4).
    """
    global _PERMANENT
    if not hasattr(torch.serialization, 'add_safe_globals'):
        return
    with _ALLOWLIST_LOCK:
        if not _PERMANENT:
            torch.serialization.add_safe_globals(safe_globals())
            _PERMANENT = True


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Allowlist :func:`safe_globals` while the block runs.

    Every ``torch.load(weights_only=True)`` inside the block (mmengine's
    ``load_from`` and ``resume`` included) accepts mmengine checkpoints;
    nothing else is allowed. Re-entrant (nested blocks and
    :func:`load_checkpoint` inside one keep the allowlist until the
    outermost block ends) and thread-safe, but, like torch's allowlist
    itself, process-wide while active. Entries registered for good by
    :func:`register_safe_globals` stay (use it rather than passing
    :func:`safe_globals` to torch yourself: the block's end would remove
    those equal entries).

    Example::

        with safe_loading():
            runner.train()
    """
    global _DEPTH, _ACTIVE
    if not hasattr(torch.serialization, 'safe_globals'):  # torch < 2.5
        yield
        return
    with _ALLOWLIST_LOCK:
        if _DEPTH == 0 and not _PERMANENT:
            _ACTIVE = torch.serialization.safe_globals(safe_globals())
            _ACTIVE.__enter__()
        _DEPTH += 1
    try:
        yield
    finally:
        with _ALLOWLIST_LOCK:
            _DEPTH -= 1
            if _DEPTH == 0 and _ACTIVE is not None:
                active, _ACTIVE = _ACTIVE, None
                if not _PERMANENT:
                    active.__exit__(None, None, None)


# ------------------------------------------------------------ file formats
_ZIP_MAGIC = b'PK\x03\x04'
_EMPTY_ZIP_MAGIC = b'PK\x05\x06'
_NPY_MAGIC = b'\x93NUMPY'
_CHUNK = 1 << 20


def _legacy_magic() -> bytes:
    # torch.save(..., _use_new_zipfile_serialization=False) starts with the
    # pickled MAGIC_NUMBER (a LONG1 opcode) right after the protocol header.
    magic = torch.serialization.MAGIC_NUMBER
    return b'\x8a\x0a' + magic.to_bytes(10, 'little')


def _not_torch(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f'{path}: not a valid checkpoint: {what}, not a PyTorch checkpoint '
        '(expected a file written by torch.save)')


def _sniff(path: str, head: bytes) -> str:
    """'zip' or 'legacy' for torch.save's formats, else CheckpointError."""
    if head.startswith(_ZIP_MAGIC):
        return 'zip'
    if head.startswith(b'\x80') and _legacy_magic() in head[:32]:
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


def _check_archive(path: str, f: BinaryIO) -> None:
    """Refuse a zip that is truncated, is not a torch archive, or fails a
    CRC (torch's reader does not check them). Streams every member once."""
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f'{path}: truncated or corrupt checkpoint '
                              f'(zip archive unreadable: {e})') from None
    with archive:
        names = archive.namelist()
        if not any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
            if names and all(n.endswith('.npy') for n in names):
                raise _not_torch(path, 'a NumPy .npz archive')
            raise _not_torch(path, 'a zip archive without data.pkl')
        if any(n.endswith('/constants.pkl') for n in names):
            raise CheckpointError(
                f'{path}: a TorchScript archive (torch.jit.save), not a '
                'checkpoint: load it with torch.jit.load')
        for info in archive.infolist():
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


# ------------------------------------------------------------------ loading
def load_checkpoint(path: str,
                    map_location: Any = 'cpu',
                    unsafe: bool = False) -> Any:
    """Load a checkpoint file written by ``torch.save``, safely.

    The file must be torch's zip format (every member's CRC is checked
    first: torch does not) or its legacy format (no checksums to check).
    It is unpickled with ``weights_only=True`` and :func:`safe_globals`
    allowlisted for this call only.

    Args:
        path (str): checkpoint file.
        map_location: passed to ``torch.load``. Defaults to 'cpu'.
        unsafe (bool): unpickle arbitrary objects (``weights_only=False``).
            Only for files you trust: a malicious pickle runs code. The
            format and CRC checks still apply.

    Returns:
        The unpickled object (mmengine checkpoints: a dict).

    Raises:
        CheckpointError: naming ``path``: missing, empty, not a PyTorch
            checkpoint (random bytes, .npy/.npz, safetensors, TorchScript),
            truncated, CRC mismatch, or a pickle needing an object outside
            the allowlist (named) or not shaped as numpy/mmengine pickle
            their objects.
    """
    path = os.fspath(path)
    if not osp.exists(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    if not osp.isfile(path):
        raise CheckpointError(f'{path}: not a file (expected a checkpoint '
                              'file written by torch.save)')
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
        if _sniff(path, head) == 'zip':
            f.seek(0)
            _check_archive(path, f)
        f.seek(0)
        try:
            # torch skips checking loaded sparse tensors unless asked: an
            # index out of range would later write outside their memory.
            with safe_loading(), _check_sparse():
                return torch.load(f, map_location=map_location,
                                  weights_only=not unsafe)
        except pickle.UnpicklingError as e:
            raise _load_error(path, str(e)) from None
        except Exception as e:  # the unpickler raises many types on garbage
            msg = _first_line(str(e))
            raise CheckpointError(
                f'{path}: not a valid checkpoint, truncated or corrupt '
                f'({type(e).__name__}{": " + msg if msg else ""})') from None


def _check_sparse() -> Any:
    check = getattr(torch.sparse, 'check_sparse_tensor_invariants', None)
    return check(enable=True) if check is not None else (
        contextlib.nullcontext())


def _load_error(path: str, msg: str) -> CheckpointError:
    """The CheckpointError for an UnpicklingError of ``torch.load``."""
    hint = 'pass --unsafe-load only if you trust this file'
    if _MARK in msg:
        detail = msg.split(_MARK, 1)[1].splitlines()[0]
        tag, _, detail = detail.partition(': ')
        if tag == 'allowlist':
            return CheckpointError(
                f'{path}: refused to unpickle {detail}: not on the safe '
                f'allowlist (weights_only=True); {hint}')
        return CheckpointError(
            f'{path}: refused to unpickle: {detail} (not how numpy or '
            'mmengine pickle their objects: the file is crafted or '
            'corrupt)')
    opcode = re.search(r'Unsupported operand (\d+)', msg)
    if opcode:
        return CheckpointError(
            f'{path}: cannot be loaded with weights_only=True: pickle opcode '
            f'{int(opcode.group(1))} is not supported by torch\'s safe '
            'unpickler (pickle protocol above 2, or a corrupt file); '
            f'{hint}')
    glob = _unsupported_global(msg)
    if glob is not None:
        return CheckpointError(
            f'{path}: refused to unpickle {glob} that is not on the safe '
            f'allowlist (weights_only=True); {hint}')
    detail = _unpickler_detail(msg)
    if detail:
        return CheckpointError(
            f'{path}: refused to unpickle: {detail} (weights_only=True); '
            f'{hint}')
    return CheckpointError(
        f'{path}: not a valid checkpoint, truncated or corrupt '
        f'({_first_line(msg) or "UnpicklingError"})')


def _unpickler_detail(msg: str) -> str:
    """The weights-only unpickler's own reason, out of torch's wrapping
    ("Weights only load failed. ... WeightsUnpickler error: <reason>")."""
    marker = 'WeightsUnpickler error:'
    if marker in msg:
        msg = msg.split(marker, 1)[1]
    elif 'Weights only load failed' in msg:
        return ''
    for line in msg.splitlines():
        line = line.strip()
        if line and not line.startswith('Check the documentation'):
            return line
    return ''


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ''


def _unsupported_global(msg: str) -> Optional[str]:
    # torch: "Unsupported global: GLOBAL os.system was not an allowed global"
    for line in msg.splitlines():
        if 'GLOBAL ' in line:
            rest = line.split('GLOBAL ', 1)[1].split()
            if rest:
                return f'global {rest[0]}'
    return None


# ------------------------------------------------------------------ saving
def save_checkpoint(obj: Any, path: str) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically.

    Raises:
        CheckpointError: naming ``path`` when the write fails part-way
            (disk full, quota, file size limit); ``path`` is left as it was.
    """
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
