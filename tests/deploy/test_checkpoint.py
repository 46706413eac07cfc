import os
import os.path as osp
import pickle
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

import mmrepvgg  # noqa: F401  (allowlists nothing by itself)
from mmrepvgg.deploy import (CheckpointError, atomic_write, load_checkpoint,
                             safe_loading, save_checkpoint)


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
    # mmengine's loader reads it inside safe_loading() only.
    from mmengine.runner.checkpoint import CheckpointLoader
    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    with safe_loading():
        again = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    assert np.array_equal(again['meta']['arr'], np.arange(4.0))


def test_getattr_stand_in_only_allows_history_buffer_statistics(tmp_path):
    class Reducer:
        def __reduce__(self):
            return (getattr, (dict, 'fromkeys'))

    path = str(tmp_path / 'getattr.pth')
    torch.save({'x': Reducer()}, path)
    with pytest.raises(CheckpointError, match='getattr'):
        load_checkpoint(path)


def _npz(path):
    np.savez(path, a=np.arange(3))


def _torchscript(path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))


def _safetensors_like(path):
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path.write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 4)


@pytest.mark.parametrize('content,match', [
    (None, 'no such checkpoint file'),
    (b'', 'empty file, not a checkpoint'),
    (b'this is not a checkpoint\n', 'not a valid checkpoint: unknown content'
     r'.*not a PyTorch checkpoint \(expected a file written by torch.save\)'),
    (bytes(range(256)) * 16, 'unknown content.*not a PyTorch checkpoint'),
    (np.save, 'a NumPy .npy file, not a PyTorch checkpoint'),
    (_npz, 'a NumPy .npz archive, not a PyTorch checkpoint'),
    (b'PK\x05\x06' + bytes(18), 'an empty zip archive, not a PyTorch'),
    (_safetensors_like, 'a safetensors file, not a PyTorch checkpoint'),
    (_torchscript, r'a TorchScript archive \(torch.jit.save\)'),
    ('dir', 'not a file'),
])
def test_bad_files_name_the_file_and_what_was_expected(
        tmp_path, content, match):
    """Random bytes, NumPy files... are "not a PyTorch checkpoint", never a
    refused global with an --unsafe-load hint (issue 9, item 11)."""
    path = tmp_path / 'bad.pth'
    if content == 'dir':
        path.mkdir()
    elif content is np.save:
        with open(path, 'wb') as f:
            np.save(f, np.arange(3))
    elif callable(content):
        content(path)
        if not path.exists():  # np.savez appends .npz
            os.rename(str(path) + '.npz', path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(str(path))
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and '\n' not in msg
    assert 'unsafe-load' not in msg and 'allowlist' not in msg


def test_zip_without_data_pkl_is_not_a_checkpoint(tmp_path):
    path = tmp_path / 'other.zip'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('readme.txt', 'hello')
    with pytest.raises(CheckpointError,
                       match='a zip archive without data.pkl, not a PyTorch'):
        load_checkpoint(str(path))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / 'cut.pth'
    torch.save({'state_dict': {'w': torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(str(path))


def _member_data_offset(path, member):
    """Offset in the file of ``member``'s data (after its local header)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, 'rb') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), '<u2')
    return info.header_offset + 30 + int(name_len) + int(extra_len), info


def test_crc_mismatch_is_refused(tmp_path):
    """torch does not check the zip CRCs: 64 flipped bytes in a tensor's
    data record load silently with a changed weight. load_checkpoint
    refuses the file, naming the member (issue 9, item 6)."""
    path = tmp_path / 'flipped.pth'
    weight = torch.arange(64, dtype=torch.float32)
    torch.save({'state_dict': {'w': weight}}, path)
    with zipfile.ZipFile(path) as z:
        member = next(n for n in z.namelist() if n.endswith('/data/0'))
    offset, info = _member_data_offset(path, member)
    assert info.file_size == weight.numel() * 4
    data = bytearray(path.read_bytes())
    data[offset + 64:offset + 128] = bytes(b ^ 0xFF
                                           for b in data[offset + 64:
                                                         offset + 128])
    path.write_bytes(bytes(data))
    # torch alone loads the corrupt weight without a word
    changed = torch.load(path, weights_only=True)['state_dict']['w']
    assert not torch.equal(changed, weight)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(path))
    assert str(e.value) == f'{path}: corrupt archive: CRC mismatch in {member}'
    with pytest.raises(CheckpointError, match='CRC mismatch'):
        load_checkpoint(str(path), unsafe=True)  # no way around the check


def test_crc_mismatch_in_data_pkl_is_refused(tmp_path):
    path = tmp_path / 'flipped.pth'
    torch.save({'state_dict': {'w': torch.ones(3)}, 'name': 'abcdefgh'}, path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'abcdefgh', b'abcdefgX', 1))
    with pytest.raises(CheckpointError,
                       match=r'corrupt archive: CRC mismatch in .*/data.pkl$'):
        load_checkpoint(str(path))


def test_legacy_format_only_with_unsafe_load(tmp_path):
    """torch's legacy (non-zip) format has no checksums and no storage
    records to bound its sizes: refused, unless the file is trusted."""
    path = tmp_path / 'legacy.pth'
    torch.save({'state_dict': {'w': torch.arange(4.0)}, 'np': np.arange(2)},
               path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .* format is not "
                       "read safely: re-save it with torch.save"):
        load_checkpoint(str(path))
    obj = load_checkpoint(str(path), unsafe=True)
    assert torch.equal(obj['state_dict']['w'], torch.arange(4.0))
    assert np.array_equal(obj['np'], np.arange(2))


def test_pickle_protocol_other_than_torch_saves_is_refused(tmp_path):
    path = tmp_path / 'proto4.pth'
    torch.save({'w': torch.ones(1)}, path, pickle_protocol=4)
    with pytest.raises(CheckpointError,
                       match='pickle protocol 4: torch.save writes 2'):
        load_checkpoint(str(path))
    assert load_checkpoint(str(path), unsafe=True)['w'].item() == 1


def test_sparse_tensors_only_with_unsafe_load(tmp_path):
    """No detector checkpoint holds sparse tensors; torch skips checking
    their indices, so they are not read from untrusted files."""
    path = tmp_path / 'sparse.pth'
    torch.save({'w': torch.eye(3).to_sparse()}, path)
    with pytest.raises(CheckpointError, match='_rebuild_sparse_tensor'):
        load_checkpoint(str(path))
    assert torch.equal(load_checkpoint(str(path), unsafe=True)['w']
                       .to_dense(), torch.eye(3))


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


def test_size_limited_write_is_one_clear_error(tmp_path):
    """A write cut by a file size limit (or a full disk) is reported as
    such, not as torch's "unexpected pos"; the old file is left intact."""
    out = tmp_path / 'out.pth'
    save_checkpoint({'w': torch.ones(1)}, str(out))
    code = textwrap.dedent(f'''
        import resource, torch
        from mmrepvgg.deploy import CheckpointError, save_checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            save_checkpoint({{'w': torch.zeros(1 << 16)}}, {str(out)!r})
        except CheckpointError as e:
            print(e)
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == (
        f'{out}: cannot write checkpoint: the write failed part-way (disk '
        'full, quota or file size limit?)')
    assert [p.name for p in tmp_path.iterdir()] == ['out.pth']
    assert load_checkpoint(str(out))['w'].item() == 1


# ------------------------------------------------- mmengine's own checkpoints
class _ToyDataset(torch.utils.data.Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.full((2, ), float(i)),
                    labels=torch.tensor(float(i)))


def _toy_runner(work_dir, max_epochs, name, **kwargs):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(2, 1)

        def forward(self, inputs, labels=None, mode='tensor'):
            out = self.fc(inputs).squeeze(-1)
            if mode == 'loss':
                return dict(loss=((out - labels)**2).mean())
            return out

    return Runner(
        model=Toy(), work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=_ToyDataset(), batch_size=4,
            sampler=dict(type='DefaultSampler', shuffle=False),
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1)),
        randomness=dict(seed=0), experiment_name=name,
        **kwargs)


def test_runner_checkpoint_loads_and_resumes_in_safe_loading(tmp_path):
    """A checkpoint written by mmengine's Runner (HistoryBuffers, numpy
    arrays and scalars, getattr(HistoryBuffer, ...)) loads with
    load_checkpoint, and mmengine's own loads (resume) work inside
    safe_loading() with weights_only=True kept, and not outside it."""
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import CheckpointLoader
    _toy_runner(tmp_path, 1, 'toy_train').train()
    path = str(tmp_path / 'epoch_1.pth')
    ckpt = load_checkpoint(path)
    scalars = ckpt['message_hub']['log_scalars']
    assert scalars and all(
        isinstance(v, HistoryBuffer) and type(v._log_history) is np.ndarray
        for v in scalars.values())
    loss = scalars['train/loss']
    assert loss.current() == loss._log_history[-1]
    assert isinstance(ckpt['meta'], dict) and 'state_dict' in ckpt

    with pytest.raises(pickle.UnpicklingError):
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
    runner = _toy_runner(tmp_path, 2, 'toy_refused', resume=True,
                         load_from=path)
    with pytest.raises(pickle.UnpicklingError):
        runner.train()
    runner = _toy_runner(tmp_path, 2, 'toy_resumed', resume=True,
                         load_from=path)
    with safe_loading():
        runner.train()
    assert runner.epoch == 2
    resumed = load_checkpoint(str(tmp_path / 'epoch_2.pth'))
    assert len(resumed['message_hub']['log_scalars']['train/loss']
               ._log_history) == 4
