"""tools/deployment/quantize.py on the toy dataset (random weights: no
training):
outputs, reports, refusals; the library is tested in
tests/export/test_quantization.py."""
import json
import os.path as osp

import numpy as np
import pytest
import torch
from _toolkit import TOY_CONFIG, load_tool

pytest.importorskip('onnxruntime')

from mmrepvgg.export import quantize as qz  # noqa: E402
from mmrepvgg.export.graph import op_histogram  # noqa: E402

quantize_tool = load_tool('quantize')


@pytest.fixture(scope='module')
def random_toy_ckpt(tmp_path_factory):
    """A training-form checkpoint of the toy detector with random weights
    and BN statistics."""
    from mmrepvgg.apis.convert import build_model, load_config
    from mmrepvgg.testing import randomize_
    model = build_model(load_config(TOY_CONFIG))
    randomize_(model, seed=0)
    path = tmp_path_factory.mktemp('ckpt') / 'toy_random.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


def _run(argv, capsys):
    code = quantize_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tool_backbone_only(toy_workspace, random_toy_ckpt, tmp_path,
                            capsys, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from mmrepvgg.utils.fileio import TMP_SUFFIX, _host
    monkeypatch.chdir(toy_workspace)
    # Intermediate files go to a private folder of the temporary folder;
    # one that a SIGKILLed run left there is removed.
    tmp = tmp_path / 'tmp'
    proc = subprocess.Popen([sys.executable, '-c', ''])
    proc.wait()
    stale = tmp / f'.mmrepvgg-quantize.{_host()}.{proc.pid}.x{TMP_SUFFIX}'
    (stale / 'tmpabcd').mkdir(parents=True)
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp))
    out_dir = tmp_path / 'out'
    out = out_dir / 'bb_int8.onnx'
    fp32 = out_dir / 'bb_fp32.onnx'
    layers = out_dir / 'layers.json'
    code, stdout, err = _run([TOY_CONFIG, random_toy_ckpt, out,
                              '--backbone-only', '--calib-images', '6',
                              '--verify-images', '3', '--save-fp32', fp32,
                              '--layers-json', layers, '--bench', '2',
                              '--weight-type', 'uint8', '--threads', '1'],
                             capsys)
    assert code == 0, err
    assert out.is_file() and fp32.is_file()
    assert sorted(p.name for p in out_dir.iterdir()) == [
        'bb_fp32.onnx', 'bb_int8.onnx', 'layers.json']
    assert list(tmp.iterdir()) == []
    assert 'calibration    : 6 of 16 train images' in stdout
    assert 'INT8 vs FP32 on 3 val images' in stdout
    feats = [ln for ln in stdout.splitlines()
             if ln.strip().startswith('output') and 'SQNR' in ln]
    assert len(feats) == 3  # out_indices (1, 2, 3)
    assert 'QLinearConv' in stdout and 'INT8/FP32' in stdout
    assert 'u8 weights per channel' in stdout  # --weight-type uint8
    rows = json.loads(layers.read_text())
    assert rows[0]['layer'] == 'stem.conv_reparam'
    assert all(r['sqnr_db'] > 10 for r in rows)
    # the written graph runs, and is INT8
    ops = op_histogram(str(out))
    assert ops['QuantizeLinear'] >= 1 and ops['DequantizeLinear'] >= 1
    from mmrepvgg.export.runtime import make_session
    sess = make_session(str(out), 1)
    (feat, *_) = sess.run(None, {'input': np.zeros((1, 3, 64, 64),
                                                   np.float32)})
    assert feat.shape[0] == 1


def test_tool_end_to_end_detector(toy_trained, tmp_path, capsys,
                                  monkeypatch):
    """The end-to-end graph: convs quantized, post-processing float, same
    inputs and outputs as the FP32 graph."""
    import onnx
    monkeypatch.chdir(toy_trained['ws'])
    out, fp32 = tmp_path / 'det_int8.onnx', tmp_path / 'det_fp32.onnx'
    code, stdout, err = _run([TOY_CONFIG, toy_trained['ckpt'], out,
                              '--calib-images', '4', '--verify-images', '2',
                              '--save-fp32', fp32, '--threads', '1'], capsys)
    assert code == 0, err
    q, f = onnx.load(str(out)), onnx.load(str(fp32))
    assert [o.name for o in q.graph.output] == ['dets', 'labels']
    assert [i.name for i in q.graph.input] == [i.name for i in f.graph.input]
    meta_q = {p.key: p.value for p in q.metadata_props}
    assert {p.key for p in f.metadata_props} <= set(meta_q)  # settings kept
    assert 'MinMax' in json.loads(meta_q[qz.QUANT_METADATA_KEY])['config']
    n_convs = op_histogram(f)['Conv']
    ops = qz.optimized_op_types(str(out))
    assert ops['QLinearConv'] == n_convs and 'Conv' not in ops
    # the post-processing runs in float: no QDQ pair feeds the NMS or TopK
    producers = {t: n for n in q.graph.node for t in n.output}
    for node in q.graph.node:
        if node.op_type in ('NonMaxSuppression', 'TopK', 'Sigmoid'):
            assert all(getattr(producers.get(t), 'op_type', '') !=
                       'DequantizeLinear' or node.op_type == 'Sigmoid'
                       for t in node.input)
            assert all(n.op_type != 'QuantizeLinear'
                       for n in q.graph.node if node.output[0] in n.input)
    assert f'{n_convs} of {n_convs} convs run as QLinearConv' in stdout
    assert 'post-processing: score_thr' in stdout
    assert stdout.count('boundary raw') == 6  # cls + reg x 3 levels
    assert 'detections:' in stdout and 'matched by INT8' in stdout
    from mmrepvgg.export.runtime import make_session
    dets, labels = make_session(str(out), 1).run(
        None, {'input': np.zeros((1, 3, 128, 128), np.float32)})
    assert dets.shape[2] == 5 and labels.shape == dets.shape[:2]


@pytest.mark.parametrize('case', [
    'missing_ckpt', 'not_onnx', 'calib0', 'min_sqnr', 'no_dataset',
    'output_is_ckpt'])
def test_tool_bad_inputs_one_line_no_file(case, toy_workspace,
                                          random_toy_ckpt, tmp_path, capsys,
                                          monkeypatch):
    monkeypatch.chdir(toy_workspace)
    out = tmp_path / 'out.onnx'
    ckpt = random_toy_ckpt
    extra = ['--backbone-only', '--calib-images', '2', '--verify-images',
             '1', '--threads', '1']
    expect = {
        'missing_ckpt': 'missing.pth',
        'not_onnx': 'must be a .onnx file',
        'calib0': '--calib-images must be >= 1',
        'min_sqnr': '--min-sqnr 200',
        'no_dataset': 'cannot read the train images',
        'output_is_ckpt': 'refusing to overwrite the CHECKPOINT',
    }[case]
    if case == 'missing_ckpt':
        ckpt = tmp_path / 'missing.pth'
    elif case == 'not_onnx':
        out = tmp_path / 'out.pth'
    elif case == 'calib0':
        extra += ['--calib-images', '0']
    elif case == 'min_sqnr':
        extra += ['--min-sqnr', '200']
    elif case == 'no_dataset':
        monkeypatch.chdir(tmp_path)  # data/toy is not here
    elif case == 'output_is_ckpt':
        import shutil
        out = ckpt = tmp_path / 'same.onnx'
        shutil.copyfile(random_toy_ckpt, ckpt)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run([TOY_CONFIG, ckpt, out] + extra, capsys)
    assert code == 1, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == 'output_is_ckpt':
        assert out.read_bytes() == random_toy_ckpt.read_bytes()
    else:
        assert not osp.exists(out)


@pytest.fixture
def hostile_ws(toy_workspace, random_toy_ckpt, tmp_path, monkeypatch):
    """A private copy of the toy data (cwd), a config and a checkpoint in
    it: files a wrong output path could destroy."""
    import shutil
    ws = tmp_path / 'ws'
    shutil.copytree(toy_workspace / 'data', ws / 'data')
    config = ws / 'cfg.py'
    config.write_text(f"_base_ = '{TOY_CONFIG}'\n")
    ckpt = ws / 'ckpt.onnx'  # a checkpoint may have any name
    shutil.copyfile(random_toy_ckpt, ckpt)
    (ws / 'rows.json').mkdir()
    monkeypatch.chdir(ws)
    return dict(ws=ws, config=config, ckpt=ckpt,
                ann=ws / 'data' / 'toy' / 'annotations' / 'train.json')


@pytest.mark.parametrize('case, expect', [
    ('layers_json_config', '--layers-json'),
    ('layers_json_ckpt', '--layers-json'),
    ('layers_json_out', '--layers-json'),
    ('save_fp32_ckpt', 'refusing to overwrite the CHECKPOINT'),
    ('layers_json_annotations', 'refusing to overwrite the train annotation'),
    ('layers_json_dir', 'is a folder'),
    ('out_is_config_link', 'refusing to overwrite the CONFIG'),
])
def test_outputs_never_overwrite_inputs(case, expect, hostile_ws, capsys):
    """Every output against every input and each other, before any work:
    each of these destroyed the file (or failed after OUTPUT was written)."""
    import os
    ws = hostile_ws['ws']
    out = ws / 'out' / 'int8.onnx'
    argv = [hostile_ws['config'], hostile_ws['ckpt'], out, '--backbone-only',
            '--calib-images', '2', '--verify-images', '1', '--threads', '1']
    extra = dict(
        layers_json_config=['--layers-json', hostile_ws['config']],
        layers_json_ckpt=['--layers-json', hostile_ws['ckpt']],
        layers_json_out=['--layers-json', out],
        save_fp32_ckpt=['--save-fp32', hostile_ws['ckpt']],
        layers_json_annotations=['--layers-json', hostile_ws['ann']],
        layers_json_dir=['--layers-json', ws / 'rows.json'],
        out_is_config_link=[])[case]
    if case == 'out_is_config_link':
        out = ws / 'link.onnx'
        os.link(hostile_ws['config'], out)
        argv[2] = out
    files = [hostile_ws[k] for k in ('config', 'ckpt', 'ann')]
    before = [f.read_bytes() for f in files]
    code, _, err = _run(argv + extra, capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert [f.read_bytes() for f in files] == before
    assert not (ws / 'out').exists()
    assert (ws / 'rows.json').is_dir()


@pytest.mark.parametrize('argv, expect', [
    (['--cfg-options', 'foo'], "--cfg-options: 'foo' is not key=value"),
    (['--calib-images', 'many'], "--calib-images: invalid int value"),
    ([], 'the following arguments are required'),
])
def test_usage_errors_are_one_line(argv, expect, capsys):
    base = [TOY_CONFIG, 'c.pth', 'o.onnx'] if argv else [TOY_CONFIG]
    with pytest.raises(SystemExit) as e:
        quantize_tool.main(base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count('\n') == 1 and err.startswith('error: '), err
    assert expect in err


# ----------------------------------------------- --backend nncf (issue 18)
def test_nncf_accuracy_control_end_to_end(toy_trained, tmp_path, capsys,
                                          monkeypatch):
    """NNCF with accuracy control scored by the mmdet evaluation: a QDQ
    file with the FP32 graph's inputs, outputs and metadata, verified like
    onnxruntime's, that tools/test.py evaluates on both runtimes."""
    pytest.importorskip('nncf')
    import onnx
    monkeypatch.chdir(toy_trained['ws'])
    out, fp32 = tmp_path / 'nncf_int8.onnx', tmp_path / 'fp32.onnx'
    code, stdout, err = _run([TOY_CONFIG, toy_trained['ckpt'], out,
                              '--backend', 'nncf', '--max-drop', '0.05',
                              '--calib-images', '4', '--verify-images', '2',
                              '--save-fp32', fp32, '--threads', '1'], capsys)
    assert code == 0, err
    q, f = onnx.load(str(out)), onnx.load(str(fp32))
    assert [o.name for o in q.graph.output] == ['dets', 'labels']
    assert [i.name for i in q.graph.input] == [i.name for i in f.graph.input]
    ops = op_histogram(q)
    assert ops['QuantizeLinear'] >= 1 and ops['DequantizeLinear'] >= 1
    meta = {p.key: p.value for p in q.metadata_props}
    assert {p.key for p in f.metadata_props} <= set(meta)
    config = json.loads(meta[qz.QUANT_METADATA_KEY])['config']
    assert 'NNCF' in config and 'max mAP drop 0.05 on 2 val images' in config
    assert 'quantization   : nncf: NNCF' in stdout
    line = next(ln for ln in stdout.splitlines() if 'accuracy ctrl' in ln)
    assert 'bbox mAP on 2 of 8 val images: FP32' in line
    drop = float(line.split('(drop ')[1].split(',')[0])
    assert drop <= 0.05
    assert stdout.count('boundary raw') == 6
    assert 'detections:' in stdout and 'run as QLinearConv' in stdout
    runtimes = ['onnxruntime']
    from mmrepvgg.export import openvino
    if openvino.unusable_reason() is None:
        runtimes.append('openvino')
    test_tool = load_tool('test')
    for r in runtimes:
        assert test_tool.main([TOY_CONFIG, str(out), '--runtime', r,
                               '--work-dir', str(tmp_path / r)]) == 0
        assert f'ONNX {out}: run by {r}' in capsys.readouterr().out


@pytest.mark.parametrize('argv, expect', [
    (['--max-drop', '0.01'], '--max-drop: needs --backend nncf'),
    (['--backend', 'nncf', '--weight-type', 'uint8'],
     'applies to --backend onnxruntime'),
    (['--backend', 'nncf', '--max-drop', '-1'], '--max-drop must be >= 0'),
    (['--backend', 'nncf', '--max-drop', '0.01', '--backbone-only'],
     'not with --backbone-only'),
])
def test_backend_options_refused_before_work(argv, expect, random_toy_ckpt,
                                             tmp_path, capsys):
    out = tmp_path / 'o.onnx'
    code, _, err = _run([TOY_CONFIG, random_toy_ckpt, out] + argv, capsys)
    assert code == 1 and err.count('\n') == 1, err
    assert err.startswith('error: ') and expect in err
    assert list(tmp_path.iterdir()) == []
