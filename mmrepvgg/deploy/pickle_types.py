"""What a checkpoint's pickle may build, for :mod:`mmrepvgg.deploy.unpickle`:
each allowed global maps to a token, a value (torch dtypes), a storage type
or a function that checks its arguments and builds a fresh object. Objects
that numpy and mmengine complete with a ``BUILD`` are :class:`Pending` until
the interpreter builds them from the checked state.
"""
import collections
import math
import pickle
import re
import reprlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

#: Elements of a tuple used as a dict key.
MAX_KEY_ITEMS = 64
_MAX_DIMS = 64


class Refused(pickle.UnpicklingError):
    """A pickle construct outside what torch, numpy and mmengine write;
    ``trust``: legitimate elsewhere (an object array, a custom class), so
    ``--unsafe-load`` may be the way out for a trusted file."""

    def __init__(self, what: str, trust: bool = False) -> None:
        super().__init__(what)
        self.trust = trust


_SCALARS = (type(None), bool, int, float, str, bytes)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def short(v: Any) -> str:
    """A bounded ``repr`` for a message (a 256 MB string or a million-deep
    tuple stays one short line)."""
    return _REPR.repr(v)


class Token:
    """An allowed global, only meaningful to this interpreter; calling it
    runs ``fn``, which checks the arguments and builds a fresh object."""
    __slots__ = ('name', 'fn')

    def __init__(self, name: str, fn: Optional[Callable] = None) -> None:
        self.name = name
        self.fn = fn

    def __repr__(self) -> str:
        return f'<{self.name}>'

    def reduce(self, args: tuple) -> Any:
        if self.fn is None:
            raise Refused(f'{self.name} cannot be called')
        return self.fn(*args)


class StorageType(Token):
    __slots__ = ('dtype', )

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        super().__init__(name)
        self.dtype = dtype


#: Tensor views may cover at most this many times the bytes of the records
#: (plus the slack), so that no stride-0 view makes a reader allocate more.
VIEW_FACTOR = 4
VIEW_SLACK_BYTES = 1 << 20


class Storage:
    """A storage record of the archive as a flat tensor; ``budget``: the
    load's shared one-element list of the bytes views may still cover."""
    __slots__ = ('data', 'budget')

    def __init__(self, data: torch.Tensor, budget: List[int]) -> None:
        self.data = data
        self.budget = budget
        budget[0] += VIEW_FACTOR * data.numel() * data.element_size()


class Pending:
    """An object waiting for the ``BUILD`` that gives its state."""
    __slots__ = ('build', 'what', 'memo_keys')

    def __init__(self, what: str, build: Callable[[Any], Any]) -> None:
        self.what = what
        self.build = build
        self.memo_keys: List[int] = []


def int_in_range(v: Any, what: str, low: int = 0, high: int = 1 << 62) -> int:
    if type(v) is not int or not low <= v <= high:
        raise Refused(f'{what}: expected an int in [{low}, {high}], got '
                      f'{type(v).__name__}')
    return v


def _ints(v: Any, what: str) -> Tuple[int, ...]:
    if type(v) not in (tuple, torch.Size) or len(v) > _MAX_DIMS:
        raise Refused(f'{what}: expected a tuple of at most {_MAX_DIMS} ints')
    return tuple(int_in_range(d, what) for d in v)


def check_key(key: Any) -> None:
    """Dict keys are hashed: only scalars and flat tuples of scalars."""
    if type(key) in _SCALARS:
        return
    if type(key) is tuple and len(key) <= MAX_KEY_ITEMS and all(
            type(k) in _SCALARS for k in key):
        return
    raise Refused(f'dict key of type {type(key).__name__} (only scalars and '
                  'flat tuples of scalars)')


class Statistic(Token):
    """``getattr(HistoryBuffer, name)``: only a HistoryBuffer state's
    ``statistics_methods`` dict may hold it."""
    __slots__ = ()


def check_item(v: Any) -> Any:
    if isinstance(v, (Token, Storage, Pending)) and type(v) is not Statistic:
        raise Refused(f'{short(v)} used as a value')
    return v


def _rebuild_tensor(storage: Any,
                    offset: Any,
                    size: Any,
                    stride: Any,
                    requires_grad: Any = False,
                    hooks: Any = None,
                    metadata: Any = None) -> torch.Tensor:
    what = 'torch tensor'
    if not isinstance(storage, Storage):
        raise Refused(f'{what}: data must be a storage record of the archive')
    offset = int_in_range(offset, f'{what} offset')
    size, stride = _ints(size, f'{what} size'), _ints(stride, f'{what} stride')
    if len(size) != len(stride):
        raise Refused(f'{what}: {len(size)} sizes but {len(stride)} strides')
    if type(requires_grad) is not bool or hooks or metadata:
        raise Refused(f'{what}: backward hooks or metadata attached')
    base = storage.data
    if 0 not in size:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= base.numel():
            raise Refused(f'{what}: view of size {list(size)} at offset '
                          f'{offset} exceeds its storage of {base.numel()} '
                          'elements')
    elif offset > base.numel():
        raise Refused(f'{what}: offset {offset} beyond its storage')
    nbytes = math.prod(size) * base.element_size()
    storage.budget[0] -= nbytes
    if storage.budget[0] < 0:
        raise Refused(f'{what}: views of size {list(size)} cover more than '
                      f'{VIEW_FACTOR} times the data of the archive '
                      '(stride-0 or overlapping views)', True)
    t = torch.empty((0, ), dtype=base.dtype)
    t.set_(base.untyped_storage(), offset, size, stride)
    if requires_grad:
        if not (t.is_floating_point() or t.is_complex()):
            raise Refused(f'{what}: requires_grad on a {t.dtype} tensor')
        t.requires_grad_(True)
    return t


def _rebuild_parameter(data: Any, requires_grad: Any,
                       hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or type(requires_grad) is not bool \
            or hooks:
        raise Refused('torch Parameter: expected (tensor, bool, no hooks)')
    return torch.nn.Parameter(data, requires_grad)


def _device(name: Any, index: Any = None) -> torch.device:
    if type(name) is not str or not re.fullmatch(r'[a-z]{1,16}(:\d{1,4})?',
                                                 name) or index is not None:
        raise Refused(f'torch.device({short(name)}): not a device name')
    return torch.device(name)


def _encode(text: Any, encoding: Any = None) -> bytes:
    """``_codecs.encode(s, 'latin1')``: how protocol 2 writes bytes."""
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
        raise Refused('_codecs.encode: only (str, "latin1") is allowed')
    return text.encode('latin1')


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args:
        raise Refused('collections.OrderedDict: only OrderedDict() is '
                      'allowed (items follow as SETITEMS)')
    return collections.OrderedDict()


def build_ordered_dict(d: collections.OrderedDict, state: Any) -> None:
    """torch state dicts carry ``_metadata`` (an OrderedDict) as an
    attribute; nothing else may be set."""
    if type(state) is not dict or set(state) - {'_metadata'} or not all(
            type(v) in (dict, collections.OrderedDict)
            for v in state.values()):
        raise Refused('OrderedDict state: only a _metadata dict is allowed')
    for key, value in state.items():
        setattr(d, key, value)


_DTYPE_NAMES = ('float32', 'float', 'float64', 'double', 'float16', 'half',
                'bfloat16', 'uint8', 'int8', 'int16', 'short', 'int32',
                'int', 'int64', 'long', 'bool', 'complex64', 'cfloat',
                'complex128', 'cdouble')
_STORAGES = dict(
    DoubleStorage=torch.float64, FloatStorage=torch.float32,
    HalfStorage=torch.float16, BFloat16Storage=torch.bfloat16,
    LongStorage=torch.int64, IntStorage=torch.int32, ShortStorage=torch.int16,
    CharStorage=torch.int8, ByteStorage=torch.uint8, BoolStorage=torch.bool,
    ComplexFloatStorage=torch.complex64, ComplexDoubleStorage=torch.complex128)

#: Plain numeric dtypes as numpy's ``dtype.__reduce__`` names them.
_NP_CODES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2',
             'f4', 'f8', 'c8', 'c16')
_NDARRAY = Token('numpy.ndarray')


def _np_dtype(dt: Any, what: str) -> np.dtype:
    if isinstance(dt, Pending):
        raise Refused(f'{what}: dtype used before its state was set')
    if not isinstance(dt, np.dtype):
        raise Refused(f'{what}: expected a numpy dtype')
    if dt.names is not None or dt.subdtype is not None or \
            dt.metadata is not None or \
            f'{dt.kind}{dt.itemsize}' not in _NP_CODES:
        raise Refused(f'{what}: dtype {dt} is not a plain numeric dtype',
                      True)
    return dt


def _np_bytes(data: Any, dt: np.dtype, count: int, what: str) -> bytes:
    # Only bytes: no bytearray, memoryview or array that could alias.
    if type(data) is not bytes:
        raise Refused(f'{what}: data must be a bytes object as numpy '
                      f'pickles it, got {type(data).__name__}')
    if len(data) != count * dt.itemsize:
        raise Refused(f'{what}: {len(data)} bytes of data, expected '
                      f'{count * dt.itemsize}')
    if dt.kind == 'b' and data.translate(None, b'\x00\x01'):
        raise Refused(f'{what}: bool data other than 0/1')
    return data


def _np_reconstruct(subtype: Any, shape: Any, typecode: Any) -> Pending:
    if subtype is not _NDARRAY or shape != (0, ) or typecode != b'b':
        raise Refused('numpy _reconstruct: only numpy\'s '
                      '_reconstruct(ndarray, (0,), b"b") (plain arrays, no '
                      'subclasses)', True)

    def build(state: Any) -> np.ndarray:
        what = 'numpy array'
        if type(state) is not tuple or len(state) != 5 or state[0] != 1:
            raise Refused(f'{what}: state must be numpy\'s 5-tuple')
        _, shape, dtype, fortran, data = state
        shape = _ints(shape, f'{what} shape')
        if fortran not in (0, 1) or type(fortran) not in (bool, int):
            raise Refused(f'{what}: is_fortran must be a bool')
        dt = _np_dtype(dtype, what)
        count = int(np.prod(shape, dtype=object)) if shape else 1
        data = _np_bytes(data, dt, count, what)
        # numpy's own state setter, on a fresh array and a private copy of
        # the data: loads exactly as numpy would, aliasing nothing.
        arr = np.ndarray.__new__(np.ndarray, (0, ), np.uint8)
        private = bytes(memoryview(data))  # bytes(data) would be data itself
        arr.__setstate__((1, shape, dt, bool(fortran), private))
        return arr

    return Pending('numpy array', build)


def _np_dtype_new(code: Any, align: Any = False, copy: Any = True) -> Pending:
    if type(code) is not str or code not in _NP_CODES:
        raise Refused(f'numpy.dtype({short(code)}): only plain numeric dtypes',
                      True)
    if align is not False or type(copy) is not bool:
        raise Refused(f'numpy.dtype({short(code)}, {short(align)}, '
                      f'{short(copy)}): only numpy\'s own (code, False, '
                      'True) arguments')

    def build(state: Any) -> np.dtype:
        if type(state) is not tuple or len(state) != 8 or any(
                type(x) not in (int, str, type(None)) for x in state):
            raise Refused(f'numpy dtype {short(code)}: state must be numpy\'s '
                          '8-tuple')
        if state[1] not in ('<', '>', '|', '='):
            raise Refused(f'numpy dtype {short(code)}: byte order '
                          f'{short(state[1])}')
        dt = np.dtype(code)
        if state[1] in ('<', '>'):
            dt = dt.newbyteorder(state[1])
        expected = dt.__reduce__()[2]
        # Only the byte order may vary from the plain dtype's state.
        if state[0] != expected[0] or state[2:] != expected[2:]:
            raise Refused(f'numpy dtype {short(code)}: state {short(state)} '
                          'is not that of a plain dtype')
        return dt

    return Pending('numpy dtype', build)


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    dt = _np_dtype(dtype, 'numpy scalar')
    return np.frombuffer(_np_bytes(data, dt, 1, 'numpy scalar'), dtype=dt)[0]


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise Refused('builtins.bytes: only bytes() (empty) is allowed')
    return b''


_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_statistic(obj: Any, name: Any) -> 'Statistic':
    """``getattr(HistoryBuffer, 'min' | 'max' | 'current' | 'mean')``, how
    mmengine pickles its statistics methods."""
    if obj is not HISTORY or name not in _STATISTICS:
        raise Refused(f'getattr({short(obj)}, {short(name)}): only '
                      'HistoryBuffer statistics are allowed', True)
    return Statistic(f'HistoryBuffer.{name}')


def _history_buffer(*args: Any) -> Pending:
    if args:
        raise Refused('HistoryBuffer: unexpected constructor arguments')

    def build(state: Any) -> Any:
        from mmengine.logging import HistoryBuffer
        what = 'HistoryBuffer state'
        keys = {'max_length', '_log_history', '_count_history'}
        if type(state) is not dict or not keys <= set(state) or \
                set(state) - keys - {'statistics_methods'}:
            raise Refused(f'{what}: unexpected keys')
        methods = state.get('statistics_methods', {})
        if type(methods) is not dict or any(
                type(m) is not Statistic or m.name != f'HistoryBuffer.{k}'
                for k, m in methods.items()):
            raise Refused(f'{what}: only the built-in statistics methods')
        max_length = int_in_range(state['max_length'], f'{what} max_length', 1)
        logs, counts = state['_log_history'], state['_count_history']
        if not (isinstance(logs, np.ndarray) and isinstance(
                counts, np.ndarray) and logs.ndim == counts.ndim == 1
                and len(logs) == len(counts) <= max_length):
            raise Refused(f'{what}: histories must be two 1-d arrays of one '
                          'length')
        buf = HistoryBuffer(max_length=max_length)
        buf._log_history, buf._count_history = logs, counts
        return buf

    return Pending('HistoryBuffer', build)


HISTORY = Token('mmengine HistoryBuffer', _history_buffer)


def allowed_globals() -> Dict[Tuple[str, str], Any]:
    out: Dict[Tuple[str, str], Any] = {
        ('collections', 'OrderedDict'): Token('OrderedDict', _ordered_dict),
        ('torch._utils', '_rebuild_tensor_v2'): Token(
            'tensor', _rebuild_tensor),
        ('torch._utils', '_rebuild_parameter'): Token(
            'Parameter', _rebuild_parameter),
        ('torch', 'Size'): Token(
            'torch.Size', lambda dims: torch.Size(_ints(dims, 'torch.Size'))),
        ('torch', 'device'): Token('torch.device', _device),
        ('torch', 'UntypedStorage'): StorageType('UntypedStorage',
                                                 torch.uint8),
        ('_codecs', 'encode'): Token('_codecs.encode', _encode),
        ('numpy', 'ndarray'): _NDARRAY,
        ('numpy', 'dtype'): Token('numpy.dtype', _np_dtype_new),
    }
    for name in _DTYPE_NAMES:
        out['torch', name] = getattr(torch, name)
    for name, dtype in _STORAGES.items():
        out['torch', name] = StorageType(name, dtype)
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        out[module, '_reconstruct'] = Token('numpy _reconstruct',
                                            _np_reconstruct)
        out[module, 'scalar'] = Token('numpy scalar', _np_scalar)
    for module in ('builtins', '__builtin__'):
        out[module, 'bytes'] = Token('bytes', _empty_bytes)
        out[module, 'getattr'] = Token('getattr', _history_statistic)
    for module in ('mmengine.logging.history_buffer', 'mmengine.logging'):
        out[module, 'HistoryBuffer'] = HISTORY
    return out
