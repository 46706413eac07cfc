"""tools/test.py: strict checkpoint loading and one-line errors (issue 9,
items 7, 9, 10, 13)."""
import glob
import inspect
import os
import os.path as osp
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from _toolkit import ROOT, TOOLS, TOY_CONFIG, load_tool, run_tool


@pytest.fixture(scope='module')
def deployed(toy_trained, tmp_path_factory):
    """The toy checkpoint converted by convert_deploy.py: OUT.pth + OUT.py."""
    out = tmp_path_factory.mktemp('deployed') / 'toy_deploy.pth'
    code = load_tool('convert_deploy').main(
        [TOY_CONFIG, str(toy_trained['ckpt']), str(out)])
    assert code == 0 and out.is_file() and out.with_suffix('.py').is_file()
    return out


def _test_main(argv, capsys):
    """Run tools/test.py's main in-process; ``(code, stderr lines)``."""
    try:
        code = load_tool('test').main([str(a) for a in argv])
    except SystemExit as e:  # argument errors
        code = e.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _assert_one_error(code, lines, *parts, exit_code=1):
    assert code == exit_code, lines
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    for part in parts:
        assert str(part) in lines[0], lines


def test_deploy_checkpoint_with_training_config_is_refused(
        deployed, tmp_path, capsys):
    code, lines = _test_main([TOY_CONFIG, deployed, '--work-dir',
                              tmp_path / 'w'], capsys)
    _assert_one_error(code, lines, 'this is a deploy checkpoint', deployed,
                      deployed.with_suffix('.py'))
    assert not (tmp_path / 'w').exists()  # refused before the runner


def test_training_checkpoint_with_deploy_config_is_refused(
        toy_trained, deployed, capsys):
    code, lines = _test_main(
        [deployed.with_suffix('.py'), toy_trained['ckpt']], capsys)
    _assert_one_error(code, lines, 'this is a training checkpoint',
                      toy_trained['ckpt'], 'tools/convert_deploy.py')


def _wrong_model(src, dst):
    from mmrepvgg.deploy import load_checkpoint
    sd = dict(load_checkpoint(str(src))['state_dict'])
    sd.pop('bbox_head.retina_cls.weight')
    sd['bbox_head.extra.weight'] = torch.zeros(3)
    sd['backbone.stem.branch_3x3.conv.weight'] = torch.zeros(1, 1, 3, 3)
    torch.save({'state_dict': sd}, dst)


def test_checkpoint_of_another_model_is_refused(toy_trained, tmp_path,
                                                capsys):
    wrong = tmp_path / 'wrong.pth'
    _wrong_model(toy_trained['ckpt'], wrong)
    code, lines = _test_main([TOY_CONFIG, wrong], capsys)
    _assert_one_error(code, lines, wrong, 'does not match config',
                      'missing keys: bbox_head.retina_cls.weight',
                      'unexpected keys: bbox_head.extra.weight',
                      'shape mismatch: backbone.stem.branch_3x3.conv.weight',
                      '--non-strict')


class _System:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


@pytest.mark.parametrize('kind', ['truncated', 'random', 'empty', 'missing',
                                  'malicious', 'directory'])
def test_unreadable_checkpoints_are_one_line(kind, toy_trained, tmp_path,
                                             capsys):
    path = tmp_path / f'{kind}.pth'
    data = toy_trained['ckpt'].read_bytes()
    if kind == 'truncated':
        path.write_bytes(data[:len(data) // 3])
    elif kind == 'random':
        path.write_bytes(os.urandom(4096))
    elif kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'malicious':
        torch.save({'state_dict': {}, 'meta': _System()}, path)
    elif kind == 'directory':
        path.mkdir()
    code, lines = _test_main([TOY_CONFIG, path], capsys)
    _assert_one_error(code, lines, path)
    assert 'pwned' not in capsys.readouterr().out


def test_config_errors_are_one_line(toy_trained, tmp_path, capsys):
    bad = tmp_path / 'syntax.py'
    bad.write_text('model = dict(\n')
    code, lines = _test_main([bad, toy_trained['ckpt']], capsys)
    _assert_one_error(code, lines, bad, 'cannot load config')
    code, lines = _test_main([tmp_path / 'absent.py', toy_trained['ckpt']],
                             capsys)
    _assert_one_error(code, lines, 'absent.py', 'does not exist')


@pytest.mark.parametrize('option, expect', [
    ('foo', "'foo' is not key=value"),
    ('=3', 'is not key=value'),
    ('a..b=1', 'empty key component'),
    ('model.x=[1,2', 'unbalanced brackets'),
])
def test_malformed_cfg_options_exit_2_with_one_line(option, expect,
                                                    toy_trained, capsys):
    code, lines = _test_main([TOY_CONFIG, toy_trained['ckpt'],
                              '--cfg-options', option], capsys)
    _assert_one_error(code, lines, 'error: --cfg-options: ', expect,
                      exit_code=2)


def test_cfg_options_that_cannot_be_merged_are_one_line(toy_trained, capsys):
    code, lines = _test_main([TOY_CONFIG, toy_trained['ckpt'],
                              '--cfg-options', 'train_cfg.max_epochs.x=1'],
                             capsys)
    _assert_one_error(code, lines, 'error: --cfg-options: cannot set '
                      'train_cfg.max_epochs.x=1')


def test_cfg_options_action_parses_like_dict_action():
    import argparse

    from mmrepvgg.utils.cli import CfgOptionsAction
    p = argparse.ArgumentParser()
    p.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction)
    args = p.parse_args(['--cfg-options', 'a=1', 'b.c=[1,(2,3)]', 'd=x,y',
                         'e=None', 'f=True', 'g=0.5'])
    assert args.cfg_options == {'a': 1, 'b.c': [1, (2, 3)], 'd': ['x', 'y'],
                                'e': None, 'f': True, 'g': 0.5}


def test_bad_arguments_are_one_line(capsys):
    code, lines = _test_main([TOY_CONFIG], capsys)
    _assert_one_error(code, lines, 'checkpoint', exit_code=2)


def _env_without_warning_filters():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('PYTHONWARNINGS', None)
    return env


def test_no_pkg_resources_warnings_and_one_line(deployed, toy_trained):
    """Run as a user would (no PYTHONWARNINGS): the refusal is the only
    stderr line, although loading the config imports pkg_resources."""
    proc = subprocess.run(
        [sys.executable, osp.join(TOOLS, 'test.py'), TOY_CONFIG,
         str(deployed)], cwd=toy_trained['ws'], capture_output=True,
        text=True, timeout=300, env=_env_without_warning_filters())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert 'this is a deploy checkpoint' in lines[0]


def _wait_until_mapped(proc, lib: str, timeout: float = 120) -> None:
    """Return once the child has mapped ``lib`` (it is importing it): the
    child's own memory map reports the event, no fixed sleep guesses it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(f'/proc/{proc.pid}/maps') as f:
                if lib in f.read():
                    return
        except OSError:
            break
        time.sleep(0.005)
    pytest.fail(f'the child never loaded {lib} (exit {proc.poll()})')


@pytest.mark.skipif(not osp.exists('/proc/self/maps'),
                    reason='needs /proc/<pid>/maps')
def test_sigint_while_importing_exits_130_with_one_line(toy_trained):
    proc = subprocess.Popen(
        [sys.executable, osp.join(TOOLS, 'test.py'), TOY_CONFIG,
         str(toy_trained['ckpt'])], cwd=toy_trained['ws'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env_without_warning_filters())
    _wait_until_mapped(proc, 'libtorch')  # torch/mmdet are being imported
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == 'error: interrupted', err


class _Teardown:
    def __del__(self):  # runs in Python's module teardown, if ever
        import os
        import signal
        import time
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


@pytest.mark.parametrize('phase', ['before', 'during', 'after', 'atexit',
                                   'teardown'])
def test_quiet_entry_sigint(phase, tmp_path):
    """quiet.run_tool(): Ctrl-C outside the body exits 130 at once with one
    line; inside run_cli it is a KeyboardInterrupt (cleanup runs), 130; in
    the exit functions 130 too. Nothing runs after them: Ctrl-C during
    Python's teardown (SIGINT back to its default) killed tools by signal."""
    script = tmp_path / 'tool.py'
    script.write_text(f'''
import atexit, os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import runpy
quiet = os.path.join({ROOT!r}, 'mmrepvgg', 'utils', 'quiet.py')
phase = {phase!r}
{inspect.getsource(_Teardown)}
if phase == 'teardown':
    KEEP = _Teardown()
def main():
    if phase == 'atexit':
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT),
                                 time.sleep(5)))
    if phase == 'before':
        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)
    from mmrepvgg.utils.cli import run_cli
    def body():
        try:
            if phase == 'during':
                os.kill(os.getpid(), signal.SIGINT); time.sleep(5)
            return 0
        finally:
            print('cleanup ran')
    code = run_cli(body)
    if phase == 'after':
        os.kill(os.getpid(), signal.SIGINT); time.sleep(5)
    return code
runpy.run_path(quiet)['run_tool'](main)
''')
    proc = subprocess.run([sys.executable, str(script)], capture_output=True,
                          text=True, timeout=120,
                          env=_env_without_warning_filters())
    assert ('cleanup ran' in proc.stdout) == (phase != 'before')
    if phase == 'teardown':
        assert proc.returncode == 0 and not proc.stderr, proc
        return
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: interrupted'), \
        proc.stderr


def test_non_strict_loads_anyway(deployed, toy_trained, tmp_path):
    """--non-strict is mmengine's lenient load: a deploy checkpoint with the
    training config runs (to a meaningless mAP), as before."""
    out = tmp_path / 'res.pkl'
    proc = run_tool([sys.executable, osp.join(TOOLS, 'test.py'), TOY_CONFIG,
                     str(deployed), '--non-strict', '--out', str(out),
                     '--work-dir', str(tmp_path / 'w')],
                    cwd=toy_trained['ws'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, 'rb') as f:
        assert len(pickle.load(f)) == 8


@pytest.mark.parametrize(
    'tool', sorted(glob.glob(osp.join(TOOLS, '**', '*.py'), recursive=True)),
    ids=lambda p: osp.relpath(p, TOOLS))
def test_every_tool_enters_quietly(tool):
    """Every tool that uses mmrepvgg imports nothing heavy at module level and
    runs as a program through ``utils/quiet.py``'s ``run_tool`` (quiet start,
    Ctrl-C exits 130) before its ``main()`` imports torch or mmengine:
    otherwise mmengine's pkg_resources warnings reach the user."""
    import ast
    with open(tool) as f:
        tree = ast.parse(f.read())
    heavy = ('mmrepvgg', 'mmengine', 'mmdet', 'mmcv', 'torch', 'onnx')
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(
            node, ast.Import) else [node.module or ''] if isinstance(
                node, ast.ImportFrom) else []
        assert not any(n.split('.')[0] in heavy for n in names), (tool, names)
    text = ast.unparse(tree)
    if 'mmrepvgg' not in text:
        return  # stdlib/numpy/PIL only (make_toy_dataset.py)
    main_block = [n for n in tree.body if isinstance(n, ast.If)
                  and "__name__ == '__main__'" in ast.unparse(n.test)]
    assert len(main_block) == 1, tool
    body = ast.unparse(main_block[0])
    assert "'quiet.py'" in body and "['run_tool'](main" in body, body


# ------------------------------------- tools/test.py MODEL.onnx (issue 19)
def _hostile_graph(path, **kwargs):
    sys.path.insert(0, osp.join(ROOT, 'tests', 'export'))
    from _export_helpers import end2end_graph
    meta = dict(score_thr=0.05, nms_pre=1000, iou_threshold=0.5,
                class_agnostic=False, max_per_img=20, min_bbox_size=0.0,
                num_classes=3, activation='sigmoid',
                priors='AnchorGenerator', strides=[[8, 8]],
                coder='DeltaXYWHBBoxCoder', clip_border=True)
    meta.update(kwargs.pop('meta', {}))
    box = kwargs.pop('box', [10.0, 10.0, 20.0, 30.0, 0.9])
    return end2end_graph(path, [[box]], [[kwargs.pop('label', 1)]],
                         metadata=meta, **kwargs)


@pytest.mark.parametrize('case', ['nan_boxes', 'label', 'classes', 'folder',
                                  'fifo', 'out_is_config'])
def test_onnx_evaluation_refuses_with_one_line(case, toy_workspace, tmp_path,
                                               capsys, monkeypatch):
    """Wrong numbers are never scored: NaN boxes (once mAP 0.214, exit 0),
    labels outside the config's classes, a file made for 80 classes; a
    folder or FIFO is named as such (a FIFO is never opened)."""
    pytest.importorskip('onnxruntime')
    monkeypatch.chdir(toy_workspace)
    path, work = tmp_path / 'model.onnx', tmp_path / 'wd'
    out = tmp_path / 'res.pkl'
    expect, before_runner = {
        'nan_boxes': ('non-finite boxes or scores', False),
        'label': ('label 3: labels must be in [0, 3)', False),
        'classes': ('the graph detects 80 classes, the config 3', True),
        'folder': (f'ONNX file {path} is a folder', True),
        'fifo': (f'ONNX file {path} is not a regular file', True),
        'out_is_config': ('refusing to overwrite the config', True),
    }[case]
    if case == 'nan_boxes':
        _hostile_graph(path, box=[float('nan')] * 4 + [0.9])
    elif case == 'label':
        _hostile_graph(path, label=3)
    elif case == 'classes':
        _hostile_graph(path, meta=dict(num_classes=80))
    elif case == 'folder':
        path.mkdir()
    elif case == 'fifo':
        os.mkfifo(path)
    config = TOY_CONFIG
    if case == 'out_is_config':  # --out a hard link of the config
        _hostile_graph(path)
        config = tmp_path / 'config.py'
        config.write_text(open(TOY_CONFIG).read())
        os.link(config, out)
    argv = [config, path, '--work-dir', work, '--out', out]
    code, lines = _test_main(argv, capsys)
    _assert_one_error(code, lines, expect)
    if case == 'out_is_config':
        assert out.read_text() == open(TOY_CONFIG).read()
    else:
        assert str(path) in lines[0]
        assert not out.exists()
    assert work.exists() != before_runner


def test_out_over_the_checkpoint_is_refused(tmp_path, capsys):
    """--out is checked against the files read by identity: a checkpoint
    named .pkl is not overwritten by the dumped predictions."""
    ckpt = tmp_path / 'model.pkl'
    ckpt.write_bytes(b'weights')
    code, lines = _test_main([TOY_CONFIG, ckpt, '--out', ckpt], capsys)
    _assert_one_error(code, lines, f'{ckpt}: refusing to overwrite the '
                      'checkpoint')
    assert ckpt.read_bytes() == b'weights'


# ------------------------------------------ --runtime openvino (issue 18)
def test_runtime_applies_to_onnx_files_only(toy_trained, capsys):
    code, lines = _test_main([TOY_CONFIG, toy_trained['ckpt'], '--runtime',
                              'openvino'], capsys)
    _assert_one_error(code, lines, '--runtime openvino: applies to an .onnx '
                      'checkpoint', toy_trained['ckpt'])
    code, lines = _test_main([TOY_CONFIG, 'm.onnx', '--runtime', 'tvm'],
                             capsys)
    assert code == 2 and len(lines) == 1 and '--runtime' in lines[0]


def test_openvino_unusable_is_one_line(toy_workspace, tmp_path, capsys,
                                       monkeypatch):
    """A machine where OpenVINO's compile_model crashes (the probe's child
    died): tools/test.py exits 1 with one line, the runner never starts."""
    pytest.importorskip('onnxruntime')
    from mmrepvgg.export import openvino
    monkeypatch.setattr(openvino, '_verdict', {})
    monkeypatch.setattr(openvino, '_probe', lambda: 'simulated SIGFPE')
    monkeypatch.chdir(toy_workspace)
    path, work = tmp_path / 'model.onnx', tmp_path / 'wd'
    _hostile_graph(path)
    code, lines = _test_main([TOY_CONFIG, path, '--runtime', 'openvino',
                              '--work-dir', work], capsys)
    _assert_one_error(code, lines,
                      'OpenVINO is not usable here: simulated SIGFPE')
    assert not work.exists()
