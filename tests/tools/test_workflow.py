"""End to end on CPU: train -> resume -> convert -> test both forms."""
import os.path as osp
import pickle
import sys

import numpy as np
import torch

from _toolkit import TOOLS, TOY_CONFIG, run_tool, toy_train_options


def _test(ws, config, ckpt, out, extra=()):
    proc = run_tool([sys.executable, osp.join(TOOLS, 'test.py'), str(config),
                     str(ckpt), '--out', str(out), '--work-dir',
                     str(ws / 'work_dirs' / osp.basename(str(out)))] +
                    list(extra), cwd=ws)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, 'rb') as f:
        return pickle.load(f), proc.stdout + proc.stderr


def _assert_same_detections(a, b):
    assert len(a) == len(b) > 0
    n = 0
    for ra, rb in zip(a, b):
        pa, pb = ra['pred_instances'], rb['pred_instances']
        assert np.array_equal(np.asarray(pa['labels']),
                              np.asarray(pb['labels']))
        np.testing.assert_allclose(np.asarray(pa['bboxes']),
                                   np.asarray(pb['bboxes']), atol=1e-3)
        np.testing.assert_allclose(np.asarray(pa['scores']),
                                   np.asarray(pb['scores']), atol=1e-5)
        n += len(pa['labels'])
    assert n > 0, 'no detection to compare'


def test_train_resume_convert_test(toy_trained):
    ws, wd = toy_trained['ws'], toy_trained['work_dir']
    # resume from the saved checkpoint (mmengine loads it with
    # weights_only=True thanks to the allowlist) and train one more epoch.
    proc = run_tool([sys.executable, osp.join(TOOLS, 'train.py'), TOY_CONFIG,
                     '--work-dir', str(wd), '--resume',
                     str(toy_trained['ckpt'])] + toy_train_options(2), cwd=ws)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert 'resumed epoch: 1' in out
    ckpt = wd / 'epoch_2.pth'
    assert ckpt.is_file()

    deploy = ws / 'deploy' / 'toy_deploy.pth'
    proc = run_tool([sys.executable, osp.join(TOOLS, 'convert_deploy.py'),
                     TOY_CONFIG, str(ckpt), str(deploy)],
                    cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'blocks converted : 10' in proc.stdout
    deploy_cfg = deploy.with_suffix('.py')
    assert deploy.is_file() and deploy_cfg.is_file()
    assert 'deploy=True' in deploy_cfg.read_text()
    meta = torch.load(deploy, weights_only=True)['meta']['mmrepvgg']
    assert meta['deploy'] and meta['blocks_converted'] == 10

    det_train, _ = _test(ws, TOY_CONFIG, ckpt, ws / 'train.pkl')
    det_deploy, _ = _test(ws, deploy_cfg, deploy, ws / 'deploy.pkl')
    _assert_same_detections(det_train, det_deploy)
    det_switch, log = _test(ws, TOY_CONFIG, ckpt, ws / 'switch.pkl',
                            ['--deploy'])
    assert 'converted 10 block(s)' in log
    _assert_same_detections(det_train, det_switch)


def test_dist_train_two_processes_gloo(toy_trained):
    ws = toy_trained['ws']
    wd = ws / 'work_dirs' / 'dist'
    port = str(29500 + (hash(str(ws)) % 1000))
    proc = run_tool(['bash', osp.join(TOOLS, 'dist_train.sh'), TOY_CONFIG,
                     '2', '--work-dir', str(wd)] + toy_train_options(1) +
                    ['env_cfg.dist_cfg.backend=gloo'], cwd=ws,
                    env_extra=dict(PYTHON=sys.executable, PORT=port))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'Distributed launcher: pytorch' in out
    assert 'Distributed training: True' in out and 'GPU number: 2' in out
    ckpt = wd / 'epoch_1.pth'
    assert ckpt.is_file()
    deploy = ws / 'dist_deploy' / 'd.pth'
    proc = run_tool([sys.executable, osp.join(TOOLS, 'convert_deploy.py'),
                     TOY_CONFIG, str(ckpt), str(deploy)],
                    cwd=ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    det, log = _test(ws, deploy.with_suffix('.py'), deploy, ws / 'dist.pkl')
    assert len(det) == 8 and 'Epoch(test)' in log


def test_real_runner_checkpoint_loads_only_through_safe_loading(
        toy_trained):
    """A checkpoint written by mmengine's runner: plain
    torch.load(weights_only=True) refuses it, also after ``import
    mmrepvgg`` (nothing process-wide is registered); inside
    ``safe_loading()`` mmengine's own loader reads it through mmrepvgg's
    restricted unpickler, message hub included."""
    ckpt = str(toy_trained['ckpt'])
    code = ('import torch, pickle, sys\n'
            'import mmrepvgg\n'
            'try:\n'
            f'    torch.load({ckpt!r}, weights_only=True)\n'
            'except pickle.UnpicklingError as e:\n'
            '    print("REFUSED", str(e).splitlines()[0]); sys.exit(0)\n'
            'print("LOADED")\n')
    proc = run_tool([sys.executable, '-c', code], cwd=toy_trained['ws'])
    assert 'REFUSED' in proc.stdout, proc.stdout + proc.stderr

    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader

    from mmrepvgg.deploy import safe_loading
    with safe_loading():
        obj = CheckpointLoader.load_checkpoint(ckpt, map_location='cpu')
    scalars = obj['message_hub']['log_scalars']
    assert scalars and all(
        isinstance(v, HistoryBuffer) for v in scalars.values())
    assert isinstance(obj['meta'], dict) and 'state_dict' in obj


def test_dist_train_refused_input_is_one_line(toy_trained, tmp_path):
    """Under torchrun, a missing --resume file is reported once (rank 0),
    without torchrun's ChildFailedError traceback; nothing is written."""
    ws = toy_trained['ws']
    port = str(29500 + (hash(str(tmp_path)) % 1000))
    missing = tmp_path / 'absent.pth'
    proc = run_tool(['bash', osp.join(TOOLS, 'dist_train.sh'), TOY_CONFIG,
                     '2', '--work-dir', str(tmp_path / 'w'), '--resume',
                     str(missing), '--cfg-options',
                     'env_cfg.dist_cfg.backend=gloo'], cwd=ws,
                    env_extra=dict(PYTHON=sys.executable, PORT=port))
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if 'error' in ln.lower()]
    assert errors == [
        f'error: --resume: {missing}: no such checkpoint file'
    ], proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'w').exists()
