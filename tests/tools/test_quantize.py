"""INT8 quantization: mmrepvgg.export.quantize on tiny graphs, and
tools/quantize.py on the toy dataset (random weights: no training)."""
import json
import math
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from _toolkit import TOY_CONFIG, load_tool

pytest.importorskip('onnxruntime')

from mmrepvgg.export import quantize as qz  # noqa: E402
from mmrepvgg.export.graph import op_histogram  # noqa: E402

quantize_tool = load_tool('quantize')

TINY = dict(num_blocks=(1, 2, 1, 1), width_factor=(0.25, 0.25, 0.25, 0.25))


def _tiny_backbone(seed=0):
    from mmrepvgg.benchmark import build_forms
    return build_forms(TINY, seed=seed)['deploy']


def _calib(n, hw=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, hw, hw, generator=g).numpy() for _ in range(n)]


@pytest.fixture(scope='module')
def tiny_graphs(tmp_path_factory):
    """FP32 and default INT8 graphs of a tiny random deploy backbone."""
    d = tmp_path_factory.mktemp('tiny')
    fp32, int8 = str(d / 'fp32.onnx'), str(d / 'int8.onnx')
    qz.export_module(_tiny_backbone(), torch.zeros(1, 3, 32, 32), fp32)
    info = qz.quantize_onnx(fp32, int8, _calib(8))
    return dict(fp32=fp32, int8=int8, info=info)


def test_sqnr_db():
    x = np.array([3.0, -4.0])  # signal power 25
    assert qz.sqnr_db(x, x) == math.inf
    assert qz.sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert qz.sqnr_db(np.zeros(2), np.ones(2)) == -math.inf
    assert math.isnan(qz.sqnr_db(x, np.array([np.nan, 1.0])))
    with pytest.raises(ValueError, match='shapes differ'):
        qz.sqnr_db(x, np.ones(3))


class _ConvThenPost(nn.Module):
    """Conv -> ReLU -> Conv, then float post-processing: sigmoid, top-k."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        s = y.sigmoid().flatten(1)
        return s.topk(5, dim=1)[0]


def test_region_leaves_postprocessing_in_float(tmp_path):
    import onnx
    fp32, int8 = str(tmp_path / 'fp32.onnx'), str(tmp_path / 'int8.onnx')
    torch.onnx.export(_ConvThenPost().eval(), (torch.randn(1, 3, 16, 16), ),
                      fp32, dynamo=False, opset_version=17,
                      input_names=['input'], output_names=['top'])
    model = onnx.load(fp32)
    region, excluded = qz.quantizable_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sorted(ops[n] for n in region) == ['Conv', 'Conv', 'Relu']
    assert {'Sigmoid', 'TopK'} <= {ops[n] for n in excluded}
    (boundary, ) = qz.boundary_tensors(model, region)
    conv_b = [n for n in model.graph.node if n.op_type == 'Conv'][1]
    assert boundary == conv_b.output[0]  # the last conv's raw output
    info = qz.quantize_onnx(fp32, int8, _calib(4, hw=16))
    q = onnx.load(int8)
    # float post-processing: no QDQ pair after the sigmoid
    sig = [n for n in q.graph.node if n.op_type == 'Sigmoid'][0]
    assert [n.op_type for n in q.graph.node if sig.output[0] in n.input] \
        != ['QuantizeLinear']
    assert info['excluded_ops']['TopK'] == 1
    errs = qz.compare_sessions(fp32, int8, _calib(3, hw=16, seed=5),
                               extra_tensors=info['boundary'])
    assert list(errs) == ['top', boundary]
    assert errs[boundary]['kind'] == 'boundary'
    assert errs[boundary]['sqnr_db'] > 20 and errs['top']['samples'] == 3


def test_backbone_runs_as_integer_convs(tiny_graphs):
    info = tiny_graphs['info']
    n_convs = 1 + sum(TINY['num_blocks'])
    assert info['ops']['Conv'] == n_convs and info['excluded'] == 0
    assert info['calibration'] == 8
    ops = qz.optimized_op_types(tiny_graphs['int8'])
    assert ops['QLinearConv'] == n_convs and 'Conv' not in ops
    errs = qz.compare_sessions(tiny_graphs['fp32'], tiny_graphs['int8'],
                               _calib(4, seed=9))
    assert list(errs) == ['feat0', 'feat1', 'feat2', 'feat3']
    for e in errs.values():
        assert 18 < e['sqnr_db'] < 60 and 0 < e['rel_err'] < 0.3


def test_layer_errors(tiny_graphs):
    rows = qz.layer_errors(tiny_graphs['fp32'], tiny_graphs['int8'],
                           _calib(3, seed=9))
    assert [r['layer'] for r in rows] == [
        'stem.conv_reparam', 'stage_1.0.conv_reparam',
        'stage_2.0.conv_reparam', 'stage_2.1.conv_reparam',
        'stage_3.0.conv_reparam', 'stage_4.0.conv_reparam']
    for r in rows:
        # a layer's own activation rounding is finer than the accumulated
        # error; 8-bit weights per channel give 25-50 dB
        assert r['act_sqnr_db'] > r['sqnr_db'] - 1
        assert 20 < r['weight_sqnr_db'] < 60
        assert r['w_peak_over_mean'] > 1
    assert rows[-1]['sqnr_db'] < rows[0]['sqnr_db']  # error accumulates
    table = qz.format_layer_table({'A': rows, 'B': rows[:-1]})
    lines = table.splitlines()
    assert lines[0].startswith('| layer | A SQNR dB | A act dB |')
    assert len(lines) == 2 + len(rows) and lines[-1].endswith('n/a |')


def test_layer_errors_agree_with_onnxruntime_debug(tiny_graphs):
    """The accumulated SQNR equals onnxruntime's qdq_loss_debug
    ``xmodel_err`` (weights come from its ``create_weight_matching``)."""
    from onnxruntime.quantization import qdq_loss_debug as dbg
    inputs = _calib(2, seed=9)
    rows = qz.layer_errors(tiny_graphs['fp32'], tiny_graphs['int8'], inputs)
    acts = {}
    for key in ('fp32', 'int8'):
        aug = tiny_graphs[key] + '.aug.onnx'
        dbg.modify_model_output_intermediate_tensors(tiny_graphs[key], aug)
        acts[key] = dbg.collect_activations(aug, [dict(input=x)
                                                  for x in inputs])
    errors = dbg.compute_activation_error(
        dbg.create_activation_matching(acts['int8'], acts['fp32']))
    import onnx
    fp32 = onnx.load(tiny_graphs['fp32']).graph
    after = {n.input[0]: n.output[0] for n in fp32.node
             if n.op_type == 'Relu'}
    convs = {n.name: after.get(n.output[0], n.output[0]) for n in fp32.node
             if n.op_type == 'Conv'}
    for r in rows:
        assert r['sqnr_db'] == pytest.approx(
            errors[convs[r['node']]]['xmodel_err'], abs=0.01)


def test_weight_outlier_shows_in_its_layer(tiny_graphs, tmp_path):
    """Large diagonal centre taps in one conv (what fusing an identity
    branch with a large BN scale does) lower that layer's weight SQNR and
    raise its max|w|/mean|w|, and only there."""
    backbone = _tiny_backbone()
    conv = backbone.stage_2[1].conv_reparam
    with torch.no_grad():
        idx = torch.arange(conv.out_channels)
        conv.weight[idx, idx, 1, 1] = 20 * conv.weight.abs().max()
    fp32, int8 = str(tmp_path / 'fp32.onnx'), str(tmp_path / 'int8.onnx')
    qz.export_module(backbone, torch.zeros(1, 3, 32, 32), fp32)
    qz.quantize_onnx(fp32, int8, _calib(8))
    before = qz.layer_errors(tiny_graphs['fp32'], tiny_graphs['int8'],
                             _calib(2))
    after = qz.layer_errors(fp32, int8, _calib(2))
    for b, a in zip(before, after):
        if a['layer'] == 'stage_2.1.conv_reparam':
            assert a['w_peak_over_mean'] > 2 * b['w_peak_over_mean']
            assert a['weight_sqnr_db'] < b['weight_sqnr_db'] - 3
        else:
            assert a['weight_sqnr_db'] == pytest.approx(b['weight_sqnr_db'])


@pytest.mark.parametrize('kwargs,match', [
    (dict(quant_format='QInt'), '--format'),
    (dict(activation_type='int4'), 'activation_type'),
    (dict(calibrate_method='KL'), '--calibration'),
    (dict(percentile=10), '--percentile'),
])
def test_bad_quant_config(kwargs, match):
    with pytest.raises(qz.QuantizeError, match=match):
        qz.QuantConfig(**kwargs).validate()


@pytest.mark.parametrize('config', [
    qz.QuantConfig(activation_type='int8'),
    qz.QuantConfig(calibrate_method='Percentile', per_channel=False),
    qz.QuantConfig(quant_format='QOperator'),
])
def test_alternative_settings_run(config, tiny_graphs, tmp_path):
    out = str(tmp_path / 'alt.onnx')
    qz.quantize_onnx(tiny_graphs['fp32'], out, _calib(4), config)
    errs = qz.compare_sessions(tiny_graphs['fp32'], out, _calib(2, seed=9))
    assert all(e['sqnr_db'] > 10 for e in errs.values())


def test_pick_indices():
    assert qz.pick_indices(5, None) == [0, 1, 2, 3, 4]
    assert qz.pick_indices(5, 9) == [0, 1, 2, 3, 4]
    assert qz.pick_indices(100, 3) == [0, 50, 99]
    with pytest.raises(qz.QuantizeError):
        qz.pick_indices(5, 0)


# ----------------------------------------------------------------- the tool
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
                              '--threads', '1'], capsys)
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


def test_entropy_calibration_is_not_minmax(tiny_graphs, tmp_path):
    """onnxruntime's own Entropy defaults reduce to MinMax; ours searches
    thresholds over 2048 bins, so some activation range gets clipped."""
    import onnx
    from onnx import numpy_helper

    def act_scales(path):
        return {t.name: float(numpy_helper.to_array(t).max())
                for t in onnx.load(path).graph.initializer
                if t.name.endswith('_scale') and 'weight' not in t.name
                and 'bias' not in t.name}

    out = str(tmp_path / 'entropy.onnx')
    qz.quantize_onnx(tiny_graphs['fp32'], out, _calib(8),
                     qz.QuantConfig(calibrate_method='Entropy'))
    minmax, entropy = act_scales(tiny_graphs['int8']), act_scales(out)
    assert minmax.keys() == entropy.keys()
    assert any(entropy[k] < 0.99 * minmax[k] for k in minmax)
    assert all(entropy[k] <= minmax[k] * 1.001 for k in minmax)


def test_layers_against_bad_spec(toy_workspace, random_toy_ckpt, tmp_path,
                                 capsys, monkeypatch):
    monkeypatch.chdir(toy_workspace)
    bad = tmp_path / 'bad.json'
    bad.write_text('{"a": 1}')
    for spec, expect in ((f'{bad}', 'expected LABEL=PATH.json'),
                         (f'X={bad}', 'not a --layers-json file'),
                         (f'X={tmp_path / "none.json"}', 'cannot read it')):
        code, _, err = _run([TOY_CONFIG, random_toy_ckpt,
                             tmp_path / 'o.onnx', '--backbone-only',
                             '--layers-against', spec], capsys)
        assert code == 1 and expect in err and err.count('\n') == 1
        assert not (tmp_path / 'o.onnx').exists()


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
    against = ws / 'against.json'
    against.write_text(json.dumps([{'layer': 'stem', 'sqnr_db': 30.0}]))
    (ws / 'rows.json').mkdir()
    monkeypatch.chdir(ws)
    return dict(ws=ws, config=config, ckpt=ckpt, against=against,
                ann=ws / 'data' / 'toy' / 'annotations' / 'train.json')


@pytest.mark.parametrize('case, expect', [
    ('layers_json_config', '--layers-json'),
    ('layers_json_ckpt', '--layers-json'),
    ('layers_json_out', '--layers-json'),
    ('save_fp32_ckpt', 'refusing to overwrite the CHECKPOINT'),
    ('layers_json_annotations', 'refusing to overwrite the train annotation'),
    ('layers_json_against', 'refusing to overwrite the --layers-against'),
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
        layers_json_against=['--layers-json', hostile_ws['against'],
                             '--layers-against',
                             f'A={hostile_ws["against"]}'],
        layers_json_dir=['--layers-json', ws / 'rows.json'],
        out_is_config_link=[])[case]
    if case == 'out_is_config_link':
        out = ws / 'link.onnx'
        os.link(hostile_ws['config'], out)
        argv[2] = out
    files = [hostile_ws[k] for k in ('config', 'ckpt', 'against', 'ann')]
    before = [f.read_bytes() for f in files]
    code, _, err = _run(argv + extra, capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert [f.read_bytes() for f in files] == before
    assert not (ws / 'out').exists()
    assert (ws / 'rows.json').is_dir()


@pytest.mark.parametrize('rows', [
    [{'layer': 1}],
    [{'layer': 'stem', 'sqnr_db': 'high'}],
    [{'layer': 'stem', 'w_peak_over_mean': [1]}],
    [['stem']],
])
def test_tampered_layers_against_is_refused_before_writing(
        rows, toy_workspace, random_toy_ckpt, tmp_path, capsys, monkeypatch):
    """Rows that printed fine before the run but broke the table after
    OUTPUT was written (exit 1 with the file already there)."""
    monkeypatch.chdir(toy_workspace)
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(rows))
    out = tmp_path / 'o.onnx'
    code, _, err = _run([TOY_CONFIG, random_toy_ckpt, out, '--backbone-only',
                         '--calib-images', '2', '--verify-images', '1',
                         '--threads', '1', '--layers-against', f'X={bad}'],
                        capsys)
    assert code == 1 and err.count('\n') == 1, err
    assert f'--layers-against {bad}: not a --layers-json file' in err
    assert not out.exists()


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
