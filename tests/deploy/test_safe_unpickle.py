"""Hostile pickles against the numpy/mmengine allowlist (issue 9, item 1).

Every pickle here is written opcode by opcode, as an attacker would, using
only globals of the allowlist, and stored as data.pkl of a torch zip
checkpoint. The allowlist must refuse each one cleanly (CheckpointError, no
crash, nothing aliased), while numpy's own pickles load exactly.
"""
import os.path as osp
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

import mmrepvgg  # noqa: F401  (must not allowlist anything by itself)
from mmrepvgg.deploy import CheckpointError, load_checkpoint, safe_loading

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RECONSTRUCT = ('numpy._core.multiarray', '_reconstruct')
SCALAR = ('numpy._core.multiarray', 'scalar')
NDARRAY = ('numpy', 'ndarray')
DTYPE = ('numpy', 'dtype')


class PickleWriter:
    """Protocol-2 opcodes, only those torch's weights-only unpickler runs."""

    def __init__(self):
        self.out = bytearray(b'\x80\x02')

    def glob(self, module, name):
        self.out += b'c' + f'{module}\n{name}\n'.encode()
        return self

    def int(self, v):
        if 0 <= v < 256:
            self.out += b'K' + bytes([v])
        else:
            self.out += b'J' + struct.pack('<i', v)
        return self

    def str(self, s):
        data = s.encode('utf-8', 'surrogatepass')
        self.out += b'X' + struct.pack('<I', len(data)) + data
        return self

    def bytes(self, data):
        """``_codecs.encode(str, 'latin1')``, how protocol 2 writes bytes."""
        self.glob('_codecs', 'encode').str(data.decode('latin1'))
        return self.str('latin1').op(b'\x86').reduce()

    def op(self, code):
        self.out += code
        return self

    def none(self):
        return self.op(b'N')

    def true(self):
        return self.op(b'\x88')

    def false(self):
        return self.op(b'\x89')

    def mark(self):
        return self.op(b'(')

    def tuple(self):
        return self.op(b't')

    def tuple1(self):
        return self.op(b'\x85')

    def tuple3(self):
        return self.op(b'\x87')

    def reduce(self):
        return self.op(b'R')

    def build(self):
        return self.op(b'b')

    def newobj(self):
        return self.op(b'\x81')

    def put(self, i):
        return self.op(b'q' + bytes([i]))

    def get(self, i):
        return self.op(b'h' + bytes([i]))

    def dict(self):
        return self.op(b'}')

    def setitem(self):
        return self.op(b's')

    def list(self):
        return self.op(b']')

    def append(self):
        return self.op(b'a')

    def stop(self):
        return bytes(self.op(b'.').out)

    # numpy's own constructs, as numpy's __reduce__ writes them
    def dtype(self, code='u1', byteorder='|', copy=True, state=None):
        self.glob(*DTYPE).str(code).false()
        (self.true() if copy else self.false()).tuple3().reduce()
        state = state or (3, byteorder, None, None, None, -1, -1, 0)
        return self.values(state).build()

    def values(self, values):
        self.mark()
        for v in values:
            if v is None:
                self.none()
            elif isinstance(v, bool):
                self.true() if v else self.false()
            elif isinstance(v, int):
                self.int(v)
            elif isinstance(v, str):
                self.str(v)
            elif isinstance(v, tuple):
                self.values(v)
            else:
                raise TypeError(v)
        return self.tuple()

    def reconstruct(self):
        """``_reconstruct(ndarray, (0,), b'b')``: the array, no state yet."""
        self.glob(*RECONSTRUCT).glob(*NDARRAY).int(0).tuple1()
        return self.bytes(b'b').tuple3().reduce()

    def array_state(self, shape, data=None, code='u1', byteorder='|',
                    memo_data=None, data_from_memo=None):
        """Push ``(1, shape, dtype, False, data)`` (data: bytes, or a memo
        entry, e.g. another array)."""
        self.mark().int(1).values(shape).dtype(code, byteorder).false()
        if data_from_memo is not None:
            self.get(data_from_memo)
        else:
            self.bytes(data)
            if memo_data is not None:
                self.put(memo_data)
        return self.tuple()


def write_checkpoint(path, pkl):
    """A torch zip checkpoint whose data.pkl is ``pkl``."""
    tmp = str(path) + '.tmp'
    torch.save({}, tmp)
    with zipfile.ZipFile(tmp) as src, zipfile.ZipFile(path, 'w') as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('/data.pkl'):
                data = pkl
            dst.writestr(info, data)
    return str(path)


def uaf_gadget(size):
    """The reported use-after-free, with numpy's real globals: A from
    ``size`` bytes; B = ndarray((size,), u1, buffer=A) views A's memory;
    BUILD on A again frees it; the result hands B out."""
    w = PickleWriter().dict()
    w.str('A').reconstruct().put(0)
    w.array_state((size, ), b'\x41' * size).build().setitem()
    w.str('B').glob(*NDARRAY).mark().values((size, )).dtype().get(0).tuple()
    w.reduce().setitem()
    w.str('A2').get(0).array_state((1, ), b'x').build().setitem()
    # Fresh allocations of the same size reuse the freed block, so B shows
    # other data (a 4 MiB block is unmapped instead: touching B crashes).
    for i in range(4):
        w.str(f'pad{i}').bytes(b'Z' * size).setitem()
    return w.stop()


def setstate_alias_gadget(size):
    """Variant: B's state names array A as its raw data."""
    w = PickleWriter().dict()
    w.str('A').reconstruct().put(0)
    w.array_state((size, ), b'\x41' * size).build().setitem()
    w.str('B').reconstruct().array_state((size, ), data_from_memo=0)
    w.build().setitem()
    w.str('A2').get(0).array_state((1, ), b'x').build().setitem()
    return w.stop()


def rebuild_gadget(size):
    """Variant: only the second BUILD on an existing array."""
    w = PickleWriter().dict()
    w.str('A').reconstruct().put(0)
    w.array_state((size, ), b'\x41' * size).build().setitem()
    w.str('A2').get(0).array_state((1, ), b'x').build().setitem()
    return w.stop()


GADGETS = dict(uaf=uaf_gadget, setstate_alias=setstate_alias_gadget,
               rebuild=rebuild_gadget)


def _naive_allowlist_code(path):
    """What ``import mmrepvgg`` registered before the fix: numpy's real
    reconstruction globals."""
    return textwrap.dedent(f'''
        import sys, numpy as np, torch
        from numpy._core import multiarray
        torch.serialization.add_safe_globals(
            [np.ndarray, np.dtype, type(np.dtype('u1')),
             (multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
             (multiarray.scalar, 'numpy._core.multiarray.scalar')])
        obj = torch.load({path!r}, weights_only=True)
        b = bytes(obj['B'])
        print('INTACT' if b == b'A' * len(b) else 'CORRUPTED')
    ''')


def _run(code):
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('size', [4096, 4 << 20])
def test_uaf_gadget_is_real_under_a_naive_allowlist(tmp_path, size):
    """Control: the gadget does corrupt memory when numpy's own globals are
    allowlisted (crash at 4 MiB, freed memory handed out at 4 KiB), so the
    refusals below are meaningful."""
    path = write_checkpoint(tmp_path / 'uaf.pth', uaf_gadget(size))
    proc = _run(_naive_allowlist_code(path))
    assert proc.returncode != 0 or 'CORRUPTED' in proc.stdout, (
        proc.returncode, proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize('name', sorted(GADGETS))
def test_gadget_4k_is_refused_cleanly(tmp_path, name):
    path = write_checkpoint(tmp_path / 'g.pth', GADGETS[name](4096))
    with pytest.raises(CheckpointError, match='refused to unpickle') as e:
        load_checkpoint(path)
    assert path in str(e.value)
    assert '\n' not in str(e.value)


def test_gadgets_4m_are_refused_in_a_subprocess(tmp_path):
    """4 MiB: a use-after-free would be a SIGSEGV; run them in a child so a
    crash fails the test instead of killing pytest."""
    paths = [write_checkpoint(tmp_path / f'{name}.pth', GADGETS[name](4 << 20))
             for name in sorted(GADGETS)]
    code = textwrap.dedent(f'''
        from mmrepvgg.deploy import CheckpointError, load_checkpoint
        for path in {paths!r}:
            try:
                load_checkpoint(path)
            except CheckpointError as e:
                print('REFUSED', e, flush=True)
            else:
                print('LOADED', path, flush=True)
    ''')
    proc = _run(code)
    assert proc.returncode == 0, (proc.returncode, proc.stdout,
                                  proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line.startswith(f'REFUSED {path}: refused to unpickle'), line


def test_plain_torch_load_refuses_the_gadget(tmp_path):
    """After ``import mmrepvgg`` nothing is allowlisted; within
    ``safe_loading()`` and after ``register_safe_globals()`` (last: it is
    process-wide, hence in a child) the allowlist still refuses it."""
    path = write_checkpoint(tmp_path / 'g.pth', uaf_gadget(4 << 20))
    code = textwrap.dedent(f'''
        import contextlib, pickle, torch, mmrepvgg

        def registered():
            mmrepvgg.register_safe_globals()
            return contextlib.nullcontext()

        for name, scope in (('plain', contextlib.nullcontext),
                            ('safe_loading', mmrepvgg.safe_loading),
                            ('registered', registered)):
            try:
                with scope():
                    torch.load({path!r}, weights_only=True)
            except pickle.UnpicklingError:
                print(name, 'REFUSED', flush=True)
            else:
                print(name, 'LOADED', flush=True)
    ''')
    proc = _run(code)
    assert proc.returncode == 0, (proc.returncode, proc.stdout,
                                  proc.stderr[-2000:])
    assert proc.stdout.splitlines() == [
        'plain REFUSED', 'safe_loading REFUSED', 'registered REFUSED']


def test_import_registers_nothing_process_wide(tmp_path):
    """Neither ``import mmrepvgg`` nor ``safe_loading()`` extends torch's
    allowlist: plain ``torch.load`` behaves as without mmrepvgg, while
    mmengine's loader reads the file inside the block only."""
    path = str(tmp_path / 'np.pth')
    torch.save({'a': np.arange(3.0)}, path)
    code = textwrap.dedent(f'''
        import pickle, torch
        import mmrepvgg
        before = set(map(repr, torch.serialization.get_safe_globals()))
        from mmengine.runner.checkpoint import CheckpointLoader
        def load(how):
            try:
                return how({path!r})['a'].tolist()
            except (pickle.UnpicklingError, RuntimeError):
                return 'REFUSED'
        print(load(lambda p: torch.load(p, weights_only=True)))
        with mmrepvgg.safe_loading():
            with mmrepvgg.safe_loading():
                pass
            print(load(CheckpointLoader.load_checkpoint))  # still on
            print(load(lambda p: torch.load(p, weights_only=True)))
        print(load(CheckpointLoader.load_checkpoint))
        assert set(map(repr, torch.serialization.get_safe_globals())) == \
            before
    ''')
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [ln for ln in proc.stdout.splitlines()
            if ' - mmengine - ' not in ln] == [
        'REFUSED', '[0.0, 1.0, 2.0]', 'REFUSED', 'REFUSED']


# ------------------------------------------------------- other hostile forms
def _refusal(tmp_path, pkl):
    path = write_checkpoint(tmp_path / 'h.pth', pkl)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(path + ': ') and '\n' not in msg
    return msg


def test_ndarray_global_cannot_be_called_or_instantiated(tmp_path):
    w = PickleWriter().glob(*NDARRAY).values((4, )).tuple1().reduce()
    assert 'numpy.ndarray cannot be called' in _refusal(tmp_path, w.stop())
    w = PickleWriter().glob(*NDARRAY).values((4, )).tuple1().newobj()
    assert 'NEWOBJ on Token' in _refusal(tmp_path, w.stop())


def test_placeholder_classes_cannot_be_named(tmp_path):
    for name in ('Pending', 'Token', 'Storage', 'allowed_globals'):
        w = PickleWriter().glob('mmrepvgg.deploy.pickle_types', name)
        msg = _refusal(tmp_path, w.op(b')').reduce().stop())
        assert f'global mmrepvgg.deploy.pickle_types.{name}' in msg


def test_second_build_on_the_placeholder_is_refused(tmp_path):
    """Memoized twice: the BUILD replaces one memo entry; a BUILD on the
    other (the finished placeholder) must not run again."""
    w = PickleWriter().reconstruct().put(0).put(1)
    w.array_state((4, ), b'abcd').build()
    w.get(0).array_state((4, ), b'efgh').build()
    msg = _refusal(tmp_path, w.stop())
    assert 'BUILD on ndarray' in msg  # the memo holds the finished array


def test_second_build_on_a_dtype_is_refused(tmp_path):
    w = PickleWriter().dtype('f8', '<').put(0)
    w.get(0).values((3, '>', None, None, None, -1, -1, 0)).build()
    msg = _refusal(tmp_path, w.stop())
    assert 'refused to unpickle: BUILD on Float64DType' in msg


@pytest.mark.parametrize('state,match', [
    ((3, '<', None, None, None, 4, -1, 0), 'not that of a plain dtype'),
    ((3, '<', None, ('x', ), None, -1, -1, 0), 'state must be'),
    ((3, '<', None, None, None, -1, 1, 0), 'not that of a plain dtype'),
    ((3, '<', None, None, None, -1, -1, 16), 'not that of a plain dtype'),
    ((3, '!', None, None, None, -1, -1, 0), 'byte order'),
    ((4, '<', None, None, None, -1, -1, 0), 'not that of a plain dtype'),
    ((3, '<', None, None, None, -1, -1), 'state must be'),
])
def test_dtype_state_beyond_a_plain_dtype_is_refused(tmp_path, state, match):
    w = PickleWriter().dtype('f8', copy=False, state=state)
    assert match in _refusal(tmp_path, w.stop())


@pytest.mark.parametrize('args,match', [
    (('O', False, True), 'only plain numeric dtypes'),
    (('U8', False, True), 'only plain numeric dtypes'),
    (('V8', False, True), 'only plain numeric dtypes'),
    (('f8', True, True), "numpy's own"),
])
def test_dtype_arguments_are_restricted(tmp_path, args, match):
    w = PickleWriter().glob(*DTYPE).values(args).reduce()
    msg = _refusal(tmp_path, w.stop())
    assert match in msg
    if args[0] == 'O':  # legitimate but not allowlisted: trust hint
        assert '--unsafe-load only if you trust' in msg


def test_builtin_dtype_singletons_are_never_mutated(tmp_path):
    """copy=False would give numpy's shared float64 dtype: the wrapper
    always builds a fresh one, and a big-endian state stays local."""
    w = PickleWriter().dict().str('d').dtype('f8', '>', copy=False)
    path = write_checkpoint(tmp_path / 'd.pth', w.setitem().stop())
    d = load_checkpoint(path)['d']
    assert d == np.dtype('>f8') and d.byteorder == '>'
    assert np.dtype('f8').byteorder == '=' and np.dtype(float).isnative


@pytest.mark.parametrize('shape,data,code,match', [
    ((4, ), b'abc', 'u1', '3 bytes of data, expected 4'),
    ((2, ), b'a' * 8, 'f8', '8 bytes of data, expected 16'),
    ((2, ), b'\x00\x02', 'b1', 'bool data other than 0/1'),
    ((4, ), 'bytearray', 'u1', 'global builtins.bytearray'),
    ((4, ), 'str', 'u1', 'must be a bytes object'),
])
def test_array_state_is_checked(tmp_path, shape, data, code, match):
    w = PickleWriter().reconstruct()
    if data == 'bytearray':
        w.mark().int(1).values(shape).dtype(code).false()
        w.glob('builtins', 'bytearray').bytes(b'abcd').tuple1().reduce()
        w.tuple()
    elif data == 'str':
        w.mark().int(1).values(shape).dtype(code).false().str('abcd').tuple()
    else:
        w.array_state(shape, data, code,
                      byteorder='<' if code == 'f8' else '|')
    assert match in _refusal(tmp_path, w.build().stop())


def test_array_shape_and_version_are_checked(tmp_path):
    for state in ((2, (4, ), None, False, None),
                  (1, (-4, ), None, False, None), (1, 4, None, False, None)):
        w = PickleWriter().reconstruct().mark().int(state[0])
        if isinstance(state[1], tuple):
            w.values(state[1])
        else:
            w.int(state[1])
        w.dtype().false().bytes(b'abcd').tuple().build()
        assert 'numpy array' in _refusal(tmp_path, w.stop())


@pytest.mark.parametrize('args', [('ndarray', (1, ), b'b'),
                                  ('ndarray', (0, ), b'f'),
                                  ('ndarray', (0, 1), b'b'),
                                  ('dtype', (0, ), b'b')])
def test_reconstruct_accepts_only_numpys_arguments(tmp_path, args):
    w = PickleWriter().glob(*RECONSTRUCT)
    w.glob(*NDARRAY) if args[0] == 'ndarray' else w.glob(*DTYPE)
    w.values(args[1]).bytes(args[2]).tuple3().reduce()
    assert "only numpy's _reconstruct" in _refusal(tmp_path, w.stop())


def test_array_and_dtype_used_unfinished_are_refused(tmp_path):
    # dtype placeholder (no BUILD) as an array's dtype
    w = PickleWriter().reconstruct().mark().int(1).values((1, ))
    w.glob(*DTYPE).values(('u1', False, True)).reduce()
    w.false().bytes(b'a').tuple().build()
    assert 'dtype used before its state was set' in _refusal(tmp_path,
                                                             w.stop())


@pytest.mark.parametrize('data,match', [
    (b'\x00' * 4, '4 bytes of data, expected 8'),
    (b'\x00' * 9, '9 bytes of data, expected 8'),
    (None, 'must be a bytes object'),
])
def test_scalar_is_checked(tmp_path, data, match):
    w = PickleWriter().glob(*SCALAR).dtype('f8', '<')
    w.none() if data is None else w.bytes(data)
    w.op(b'\x86').reduce()
    assert match in _refusal(tmp_path, w.stop())


def test_arrays_never_share_the_pickles_bytes(tmp_path):
    """One memoized bytes object (> 1000 bytes, which numpy would keep as
    the arrays' base) used as the data of two arrays and stored itself:
    three independent objects after loading."""
    size = 4096
    w = PickleWriter().dict()
    w.str('a').reconstruct().array_state((size, ), b'\x07' * size,
                                         memo_data=9).build().setitem()
    w.str('b').reconstruct().array_state((size, ), data_from_memo=9)
    w.build().setitem().str('raw').get(9).setitem()
    path = write_checkpoint(tmp_path / 's.pth', w.stop())
    obj = load_checkpoint(path)
    a, b, raw = obj['a'], obj['b'], obj['raw']
    assert type(a) is np.ndarray and type(b) is np.ndarray
    assert not np.shares_memory(a, b)
    a[:] = 1
    assert (b == 7).all() and raw == b'\x07' * size


def test_rebuild_from_type_cannot_reach_the_wrappers(tmp_path):
    """torch's allowlisted _rebuild_from_type_v2(func, type, args, state)
    calls func on its own: the placeholder it gets cannot be finished."""
    w = PickleWriter().glob('torch._tensor', '_rebuild_from_type_v2')
    w.mark().glob(*RECONSTRUCT).glob(*NDARRAY)
    w.glob(*NDARRAY).int(0).tuple1().bytes(b'b').tuple3()
    w.values((1, (1, ), None, False, None)).tuple().reduce()
    _refusal(tmp_path, w.stop())


def test_getattr_is_restricted_to_history_buffer_statistics(tmp_path):
    for module, name, attr in (
            ('mmengine.logging.history_buffer', 'HistoryBuffer', '__init__'),
            ('mmengine.logging.history_buffer', 'HistoryBuffer',
             'register_statistics'), ('collections', 'OrderedDict', 'min')):
        w = PickleWriter().glob('builtins', 'getattr').glob(module, name)
        msg = _refusal(tmp_path, w.str(attr).op(b'\x86').reduce().stop())
        assert 'only HistoryBuffer statistics are allowed' in msg


# ------------------------------------------------------- numpy's own pickles
ROUND_TRIP = dict(
    f32=np.linspace(-1, 1, 7, dtype=np.float32),
    f64=np.random.RandomState(0).randn(3, 4),
    big=np.random.RandomState(1).randn(1000),  # > 1000 bytes of data
    i64=np.arange(-5, 5, dtype=np.int64),
    u8=np.arange(256, dtype=np.uint8),
    boolean=np.array([True, False, True]),
    zero_d=np.array(2.5),
    empty=np.zeros((0, 3), dtype=np.float32),
    fortran=np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    big_endian=np.arange(4, dtype='>f8'),
    half=np.array([1.5, -2.0], dtype=np.float16),
    cplx=np.array([1 + 2j], dtype=np.complex64),
    s_f64=np.float64(0.1),
    s_f32=np.float32(-3.5),
    s_i64=np.int64(-7),
    s_bool=np.True_,
    s_u8=np.uint8(255),
    dt=np.dtype('float32'),
    dt_bool=np.dtype(bool),
)


def test_numpy_objects_round_trip_exactly(tmp_path):
    """Loaded objects equal what numpy's own unpickling gives (type, dtype,
    shape, memory order, bytes; numpy turns big-endian data native)."""
    path = str(tmp_path / 'rt.pth')
    obj = dict(ROUND_TRIP, shared=[ROUND_TRIP['f64'], ROUND_TRIP['f64']])
    torch.save(obj, path)
    loaded = load_checkpoint(path)
    for key, want in ROUND_TRIP.items():
        got, ref = loaded[key], pickle.loads(pickle.dumps(want, 2))
        assert type(got) is type(ref) is type(want), key
        if isinstance(want, np.dtype):
            assert got == want
            continue
        assert got.dtype == ref.dtype and got.shape == want.shape, key
        assert np.asarray(got).tobytes('A') == np.asarray(ref).tobytes('A')
        assert np.array_equal(got, want), key
        if isinstance(want, np.ndarray):
            assert got.flags.f_contiguous == want.flags.f_contiguous
            assert got.flags.c_contiguous == want.flags.c_contiguous
            assert got.flags.writeable
    a, b = loaded['shared']
    assert a is b and np.array_equal(a, ROUND_TRIP['f64'])


def test_numpy_pickles_of_numpy_1_names_load(tmp_path):
    """numpy 1 writes numpy.core.multiarray; the same wrappers serve it."""
    w = PickleWriter().glob('numpy.core.multiarray', '_reconstruct')
    w.glob(*NDARRAY).int(0).tuple1().bytes(b'b').tuple3().reduce()
    w.array_state((3, ), b'\x01\x02\x03').build()
    path = write_checkpoint(tmp_path / 'np1.pth', w.stop())
    assert load_checkpoint(path).tolist() == [1, 2, 3]


def test_safe_loading_is_reentrant_and_scoped():
    from mmengine.runner.checkpoint import CheckpointLoader
    before = CheckpointLoader._schemes['']
    with safe_loading():
        inside = CheckpointLoader._schemes['']
        assert inside is not before
        with safe_loading():
            assert CheckpointLoader._schemes[''] is inside
        assert CheckpointLoader._schemes[''] is inside
    assert CheckpointLoader._schemes[''] is before
