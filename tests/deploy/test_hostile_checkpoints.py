"""Hostile checkpoints of issue 19: each crashed, hung, leaked memory or
changed global state under torch's weights-only unpickler with an
allowlist. The restricted unpickler refuses each in one line, fast."""
import collections
import pickle
import struct
import zipfile
import zlib

import numpy as np
import pytest
import torch

from mmrepvgg.deploy import CheckpointError, load_checkpoint, safe_loading
from test_safe_unpickle import PickleWriter, write_checkpoint


def _refused(path, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and '\n' not in msg, msg
    return msg


def test_tuple_key_nested_a_million_deep_is_refused(tmp_path):
    """CPython's tuple hashing recursed a million frames deep: SIGSEGV."""
    pkl = b'\x80\x02}' + b')' + b'\x85' * 1_000_000 + b'Ns.'
    _refused(write_checkpoint(tmp_path / 'deep.pth', pkl),
             'dict key of type tuple')


def _dag(levels):
    node = ()
    for _ in range(levels):
        node = (node, node)
    return node


def test_tuple_dag_key_is_refused_without_hashing_it(tmp_path):
    """99 levels of (t, t): 2^99 hash steps, a hang."""
    ops = pickle.dumps(_dag(99), protocol=2)[2:-1]
    pkl = b'\x80\x02}' + ops + b'Ns.'
    _refused(write_checkpoint(tmp_path / 'dag.pth', pkl),
             'dict key of type tuple')


def test_dag_value_is_refused(tmp_path):
    """As a value, the same DAG would hang any later traversal."""
    pkl = pickle.dumps({'meta': [_dag(90)]}, protocol=2)
    _refused(write_checkpoint(tmp_path / 'dag.pth', pkl),
             'more than .* objects unfolded')


def test_cycles_and_deep_nesting_are_refused(tmp_path):
    cycle = b'\x80\x02]q\x00h\x00a.'
    _refused(write_checkpoint(tmp_path / 'c.pth', cycle), 'contains itself')
    deep = b'\x80\x02' + b']' * 5000 + b'a' * 4999 + b'.'
    _refused(write_checkpoint(tmp_path / 'd.pth', deep), 'nesting deeper')


@pytest.mark.parametrize('module,name', [
    ('torch', 'ByteTensor'), ('torch', 'FloatTensor'),
    ('torch', 'UntypedStorage'), ('torch.storage', 'TypedStorage'),
    ('torch', 'FloatStorage'), ('__builtin__', 'bytearray'),
    ('torch._tensor', '_rebuild_from_type_v2'), ('torch', 'empty'),
])
def test_no_constructor_allocates_from_a_size_in_the_pickle(
        tmp_path, module, name):
    """torch.ByteTensor(n) & co. handed out uninitialised process memory,
    which convert_deploy copied into its output."""
    w = PickleWriter().dict().str('meta').glob(module, name)
    pkl = w.int(1 << 20).tuple1().reduce().setitem().stop()
    _refused(write_checkpoint(tmp_path / 'alloc.pth', pkl),
             f'refused to unpickle|{name}')


def test_history_buffer_state_cannot_change_the_class(tmp_path):
    """BUILD on HistoryBuffer ran its __setstate__, which rewrote the
    class-wide statistics table: afterwards 'mean' returned the max."""
    from mmengine.logging import HistoryBuffer
    before = dict(HistoryBuffer._statistics_methods)
    w = PickleWriter().glob('mmengine.logging.history_buffer',
                            'HistoryBuffer').op(b')').newobj()
    w.dict().str('max_length').int(10).setitem()
    for name in ('_log_history', '_count_history'):
        w.str(name).reconstruct().array_state((1, ), b'\0' * 8, 'f8', '<')
        w.build().setitem()
    w.str('statistics_methods').dict().str('mean')
    w.glob('__builtin__', 'getattr').glob(
        'mmengine.logging.history_buffer', 'HistoryBuffer').str('max')
    w.op(b'\x86').reduce().setitem().setitem().build()
    _refused(write_checkpoint(tmp_path / 'hb.pth', w.stop()),
             'HistoryBuffer state: only the built-in statistics methods')
    assert HistoryBuffer._statistics_methods == before
    buf = HistoryBuffer([1.0, 3.0], [1, 1])
    assert buf.statistics('mean') == 2.0


def _zip_with(path, members, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, 'w', compression=compress) as z:
        for name, data in members.items():
            z.writestr(f'archive/{name}', data)
    return str(path)


def test_compressed_members_are_refused_before_inflating(tmp_path):
    """A small zip whose data.pkl inflates to gigabytes."""
    path = _zip_with(tmp_path / 'bomb.pth',
                     {'data.pkl': b'\x80\x02N.' + b'\0' * (8 << 20)},
                     zipfile.ZIP_DEFLATED)
    assert (tmp_path / 'bomb.pth').stat().st_size < 100_000
    _refused(path, 'member archive/data.pkl is compressed')


def _tensor_pickle(numel, size, offset=0, stride=1):
    w = PickleWriter().glob('torch._utils', '_rebuild_tensor_v2').mark()
    w.mark().str('storage').glob('torch', 'FloatStorage').str('0')
    w.str('cpu').int(numel).tuple().op(b'Q')
    w.int(offset).values((size, )).values((stride, )).false()
    w.glob('collections', 'OrderedDict').op(b')').reduce()
    return w.tuple().reduce().stop()


@pytest.mark.parametrize('numel,record,size,offset,match', [
    (4, 16, 8, 0, 'exceeds its storage'),
    (4, 16, 2, 3, 'exceeds its storage'),
    (1 << 30, 16, 1, 0, 'declares 1073741824 x 4 bytes'),
    (4, 8, 4, 0, 'declares 4 x 4 bytes but its record holds 8'),
])
def test_tensors_stay_inside_their_archive_records(
        tmp_path, numel, record, size, offset, match):
    path = _zip_with(tmp_path / 't.pth', {
        'data.pkl': _tensor_pickle(numel, size, offset),
        'data/0': b'\0' * record})
    _refused(path, match)


def test_stride_0_views_cannot_cover_more_than_the_archive(tmp_path):
    """A 16-byte record viewed as 2^30 floats (stride 0): loading allocates
    nothing, but the first reader (isfinite, sum) would allocate 4 GiB or
    hang."""
    path = _zip_with(tmp_path / 't.pth', {
        'data.pkl': _tensor_pickle(4, 1 << 30, stride=0),
        'data/0': b'\0' * 16})
    assert 'only if you trust this file' in _refused(path, 'cover more than')


def _stored_member(name: bytes, data: bytes, declared: int) -> bytes:
    """A local header + data of a stored zip member (for crafted archives)."""
    return struct.pack('<IHHHHHIIIHH', 0x04034b50, 20, 0, 0, 0, 0,
                       zlib.crc32(data), declared, declared, len(name),
                       0) + name + data


def _crafted_zip(path, members) -> str:
    """``members``: ``(name, offset of its local header, crc, size)`` over
    ``body``, the archive's bytes before the central directory."""
    body, entries = members
    cd = b''.join(
        struct.pack('<IHHHHHHIIIHHHHHII', 0x02014b50, 20, 20, 0, 0, 0, 0,
                    crc, size, size, len(name), 0, 0, 0, 0, 0, off) + name
        for name, off, crc, size in entries)
    eocd = struct.pack('<IHHHHIIH', 0x06054b50, 0, 0, len(entries),
                       len(entries), len(cd), len(body), 0)
    path.write_bytes(body + cd + eocd)
    return str(path)


def test_overlapping_members_are_refused_before_reading(tmp_path):
    """Each member's data spans the members after it ("quoted overlap"):
    reading all of them reads the file N times (1 GB from 10 MB)."""
    pkl = b'\x80\x02N.'
    body = _stored_member(b'archive/data.pkl', pkl, len(pkl))
    entries = [(b'archive/data.pkl', 0, zlib.crc32(pkl), len(pkl))]
    tail, names = b'\1' * 65536, [b'archive/data/%d' % i for i in range(8)]
    headers = []
    for name in reversed(names):  # member i holds members i+1.. + kernel
        h = _stored_member(name, b'', 0)
        h = _stored_member(name, tail, len(tail))[:len(h)]
        headers.insert(0, (name, h, zlib.crc32(tail), len(tail)))
        tail = h + tail
    off = len(body)
    for name, h, crc, size in headers:
        entries.append((name, off, crc, size))
        off += len(h)
    path = _crafted_zip(tmp_path / 'overlap.pth', (body + tail, entries))
    _refused(path, 'members overlap')


def test_a_declared_size_beyond_the_stored_bytes_is_refused(tmp_path):
    """A stored member whose central record declares 3.75 GiB over 16 real
    bytes: the storage was allocated at the declared size before reading."""
    pkl, data = _tensor_pickle(4, 4), b'\0' * 16
    body = _stored_member(b'archive/data.pkl', pkl, len(pkl))
    entries = [(b'archive/data.pkl', 0, zlib.crc32(pkl), len(pkl)),
               (b'archive/data/0', len(body), zlib.crc32(data), 16)]
    body += _stored_member(b'archive/data/0', data, 16)
    path = _crafted_zip(tmp_path / 'lie.pth', (body, entries))
    raw = bytearray((tmp_path / 'lie.pth').read_bytes())
    cd = raw.rfind(b'PK\x01\x02')  # the last central record: data/0
    struct.pack_into('<I', raw, cd + 24, 0xF0000000)  # its file_size
    (tmp_path / 'lie.pth').write_bytes(bytes(raw))
    _refused(path, 'declares 4026531840 bytes but holds 16')


def test_refusals_quote_the_pickle_briefly(tmp_path):
    """A refusal quotes what it refused: a 32 MB device name made a 32 MB
    "one line"."""
    w = PickleWriter().glob('torch', 'device').mark().str('x' * (32 << 20))
    path = write_checkpoint(tmp_path / 'd.pth', w.tuple().reduce().stop())
    assert len(_refused(path, 'not a device name')) < 400


def test_a_well_formed_tensor_pickle_loads(tmp_path):
    """The same hand-written pickle, within bounds, loads (so the refusals
    above are about the bounds)."""
    path = _zip_with(tmp_path / 't.pth', {
        'data.pkl': _tensor_pickle(4, 2, 1),
        'data/0': np.arange(4, dtype='<f4').tobytes()})
    assert torch.equal(load_checkpoint(path), torch.tensor([1.0, 2.0]))


def test_torch_objects_round_trip(tmp_path):
    conv = torch.nn.Conv2d(2, 3, 3)
    view = torch.arange(12.).view(3, 4)[:, 1]
    obj = dict(sd=conv.state_dict(), p=torch.nn.Parameter(torch.ones(2)),
               view=view, dtype=torch.bfloat16, size=torch.Size([2, 3]),
               dev=torch.device('cpu'), b=b'\x00\xff', key={(1, 'a'): 2},
               half=torch.ones(3, dtype=torch.bfloat16), big=2**70)
    path = str(tmp_path / 'ok.pth')
    torch.save(obj, path)
    got = load_checkpoint(path)
    assert type(got['sd']) is collections.OrderedDict
    assert got['sd']._metadata == conv.state_dict()._metadata
    assert all(torch.equal(got['sd'][k], v)
               for k, v in conv.state_dict().items())
    assert type(got['p']) is torch.nn.Parameter and got['p'].requires_grad
    assert torch.equal(got['view'], view) and got['view'].stride() == (4, )
    assert torch.equal(got['half'], obj['half'])
    for key in ('dtype', 'size', 'dev', 'b', 'key', 'big'):
        assert got[key] == obj[key] and type(got[key]) is type(obj[key])


def test_mmengine_loads_go_through_the_safe_loader(tmp_path):
    """Inside safe_loading() mmengine's own loader (resume, load_from,
    Pretrained) refuses a hostile file in one line; outside, mmengine's
    loader is back as it was."""
    from mmengine.runner.checkpoint import CheckpointLoader
    before = CheckpointLoader._schemes['']
    w = PickleWriter().dict().str('meta').glob('torch', 'ByteTensor')
    path = write_checkpoint(tmp_path / 'evil.pth',
                            w.int(64).tuple1().reduce().setitem().stop())
    with safe_loading():
        with pytest.raises(CheckpointError, match='torch.ByteTensor'):
            CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert CheckpointLoader._schemes[''] is before
