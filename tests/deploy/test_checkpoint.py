import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch

import mmrepvgg  # noqa: F401  (registers the safe globals)
from mmrepvgg.deploy import (CheckpointError, atomic_write, load_checkpoint,
                             save_checkpoint)


class _Evil:
    """Unpickling this runs a shell command (if the loader allows it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def write_malicious_checkpoint(path, marker):
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'meta': _Evil(marker)},
               path)


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    write_malicious_checkpoint(path, marker)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    assert 'system' in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()
    # mmengine's own loader (torch.load with the default weights_only=True)
    # is protected too.
    from mmengine.runner import CheckpointLoader
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert not marker.exists()


def test_numpy_and_history_buffer_load_with_weights_only(tmp_path):
    from mmengine.logging import HistoryBuffer, MessageHub
    hub = MessageHub.get_instance('mmrepvgg-test')
    for v in (1.0, 2.5, 3.0):
        hub.update_scalar('train/loss', v)
    hub.update_info('np_scalar', np.float64(0.5))
    obj = dict(meta=dict(seed=np.int64(3), arr=np.arange(4.0),
                         dtype=np.dtype('float32')),
               message_hub=hub.state_dict(),
               state_dict={'w': torch.ones(2)})
    path = str(tmp_path / 'ok.pth')
    torch.save(obj, path)
    loaded = load_checkpoint(path)
    assert loaded['meta']['seed'] == 3
    assert np.array_equal(loaded['meta']['arr'], np.arange(4.0))
    buf = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer) and buf.mean() == pytest.approx(
        6.5 / 3)
    assert buf.min() == 1.0 and buf.max() == 3.0 and buf.current() == 3.0
    # plain torch.load (as mmengine calls it) works too, weights_only kept.
    torch.load(path, weights_only=True)


def test_getattr_stand_in_only_allows_history_buffer_statistics(tmp_path):
    class Reducer:
        def __reduce__(self):
            return (getattr, (dict, 'fromkeys'))

    path = str(tmp_path / 'getattr.pth')
    torch.save({'x': Reducer()}, path)
    with pytest.raises(CheckpointError, match='getattr'):
        load_checkpoint(path)


@pytest.mark.parametrize('content,match', [
    (None, 'no such checkpoint'),
    (b'', 'empty file'),
    (b'this is not a checkpoint\n', 'not a valid checkpoint'),
])
def test_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / 'bad.pth'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(str(path))
    assert str(path) in str(e.value)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / 'cut.pth'
    torch.save({'state_dict': {'w': torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(str(path))


def test_unsafe_load_is_explicit(tmp_path):
    class Custom:
        pass

    path = str(tmp_path / 'custom.pth')
    torch.save({'obj': 1, 'cls': Custom.__name__, 'f': _plain_function},
               path)
    with pytest.raises(CheckpointError, match='_plain_function'):
        load_checkpoint(path)
    assert load_checkpoint(path, unsafe=True)['f'] is _plain_function


def _plain_function():
    return 1


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    out = tmp_path / 'out.pth'

    def failing(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError):
        atomic_write(str(out), failing)
    assert list(tmp_path.iterdir()) == []
    save_checkpoint({'a': torch.ones(1)}, str(out))
    assert [p.name for p in tmp_path.iterdir()] == ['out.pth']
    assert osp.getsize(out) > 0


def test_atomic_write_gives_normal_permissions(tmp_path):
    out = tmp_path / 'perm.pth'
    save_checkpoint({'a': torch.ones(1)}, str(out))
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)
