"""tools/benchmark.py and mmrepvgg.benchmark: tiny in-process runs, the
reference builder, the equivalence check and bad options (no speed
assertion; the timing method is tested in tests/utils/test_timing.py)."""
import json
import os

import pytest
import torch
import torch.nn as nn
from _toolkit import load_tool

from mmrepvgg import benchmark as bm
from mmrepvgg.testing import relative_error

bench_tool = load_tool('benchmark')

TINY = dict(num_blocks=(1, 2, 1, 1), width_factor=(0.25, 0.25, 0.25, 0.25))
TINY_JSON = json.dumps(dict(TINY, name='tiny'))
PT_FORMS = ['training', 'deploy', 'reference']


def _run(argv, capsys):
    code = bench_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _cells(md, label='tiny'):
    rows = [ln for ln in md.splitlines() if ln.startswith(f'| {label} |')]
    return [[c.strip() for c in r.strip('|').split('|')] for r in rows]


def test_tiny_run_writes_table_and_plot(tmp_path, capsys):
    out_dir = tmp_path / 'bench'
    argv = ['--archs', TINY_JSON, '--sizes', '32', '--batch-sizes', '1',
            '--forms'] + PT_FORMS + [
            '--repeats', '3', '--warmup', '1', '--threads', '1',
            '--out-dir', out_dir]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        'benchmark.json', 'benchmark.md', 'benchmark.png']
    assert (out_dir / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = (out_dir / 'benchmark.md').read_text()
    rows = json.loads((out_dir / 'benchmark.json').read_text())
    cols = bm.columns(rows)
    assert cols == ['arch', 'input', 'batch', 'training ms', 'deploy ms',
                    'reference ms', 'deploy img/s', 'deploy/reference',
                    'training/deploy', 'params training', 'params deploy',
                    'peak MiB training', 'peak MiB deploy', 'rounds used']
    header = '| ' + ' | '.join(cols) + ' |'
    assert header in md and header in out  # file and stdout
    assert 'python tools/benchmark.py --archs' in md  # the command line
    assert f'torch: {torch.__version__}' in md
    assert 'settle calls: 1' in md and 'order: balanced' in md
    (cells, ) = [c for c in _cells(md) if len(c) == len(cols)]
    assert cells[1:3] == ['32x32', '1']
    assert all(float(c.replace(',', '')) > 0 for c in cells[3:11])
    # the training form has the extra branch parameters
    assert int(cells[9].replace(',', '')) > int(cells[10].replace(',', ''))
    assert cells[-1].split()[0].endswith('/3')
    # one PASS/MISS line per row for deploy/reference, N/A for the A0 target
    assert sum(ln.startswith(('PASS deploy/reference', 'MISS deploy/'
                              'reference')) for ln in out.splitlines()) == 1
    assert 'N/A  training/deploy >= 1.3' in out
    assert len(rows[0]['times_ms']['deploy']) == 3
    acc = rows[0]['accuracy']
    assert set(acc) == {'deploy', 'reference'}
    for a in acc.values():  # float32-noise verdicts, both numbers kept
        assert a['passed'] and a['error'] <= 4 * max(a['noise'], 1.2e-7)
    assert rows[0]['rounds']['total'] == 3


def test_onnxruntime_and_bf16_forms(tmp_path, capsys, monkeypatch):
    import tempfile
    pytest.importorskip('onnxruntime')
    # the graphs go to a private scratch folder, removed afterwards (and by
    # the next run after a SIGKILL: tests/utils/test_fileio.py)
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    scratch, real = [], bm.run_benchmark

    def run_benchmark(*args, **kwargs):
        scratch.append(tempfile.gettempdir())
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, 'run_benchmark', run_benchmark)
    out_dir = tmp_path / 'bench'
    forms = ['deploy', 'ort-fp32', 'ort-int8']
    if bm.options.cpu_has_bf16():
        forms.append('deploy-bf16')
    code, out, err = _run(['--archs', TINY_JSON, '--sizes', '32',
                           '--batch-sizes', '1', '2', '--forms'] + forms +
                          ['--repeats', '2', '--warmup', '1', '--threads',
                           '1', '--out-dir', out_dir], capsys)
    assert code == 0, err
    rows = json.loads((out_dir / 'benchmark.json').read_text())
    assert len(rows) == 2
    for r in rows:
        assert set(r['latency_ms']) == set(forms)
        assert 'ort-int8/ort-fp32' in r['ratios']
        assert 'ort-fp32/deploy' in r['ratios']
        assert r['peak_bytes']['ort-int8'] is None  # not measured
        # ort-fp32 judged by the float32 noise, INT8 reported as SQNR
        assert r['accuracy']['ort-fp32']['passed']
        assert 10 < r['accuracy']['ort-int8']['sqnr_db'] < 80
        if 'deploy-bf16' in forms:
            assert 'deploy-bf16/deploy' in r['ratios']
            assert 20 < r['accuracy']['deploy-bf16']['sqnr_db'] < 80
        # every conv of the INT8 graph runs as an integer conv
        ops = r['int8_graph']['optimized_ops']
        n_convs = 1 + sum(TINY['num_blocks'])  # stem + blocks
        assert ops.get('QLinearConv', 0) == n_convs and 'Conv' not in ops
    md = (out_dir / 'benchmark.md').read_text()
    assert 'ort-int8 ms' in md and 'ort-int8/ort-fp32' in md
    assert '## Accuracy of the forms' in md and 'QLinearConv' in md
    (folder, ) = scratch
    assert os.path.basename(folder).startswith('.mmrepvgg-benchmark.')
    assert os.path.dirname(folder) == str(tmp_path / 'tmp')
    assert list((tmp_path / 'tmp').iterdir()) == []


def test_threads_restored(tmp_path, capsys):
    before = torch.get_num_threads()
    code, _, err = _run(['--archs', TINY_JSON, '--sizes', '16',
                         '--batch-sizes', '1', '--forms', 'deploy',
                         'reference', '--repeats', '1', '--warmup', '0',
                         '--threads', '1', '--out-dir', tmp_path], capsys)
    assert code == 0, err
    assert torch.get_num_threads() == before


@pytest.mark.parametrize('arch', [
    TINY,
    dict(TINY, group_layer_map={2: 2, 4: 2}),
    dict(TINY, se_cfg=dict(ratio=4)),
])
def test_reference_equals_deploy(arch):
    forms = bm.build_forms(arch)
    ref = forms['reference']
    # only plain modules: Conv2d, activations, SE from plain modules
    kinds = {type(m) for m in ref.modules()} - {
        bm.PlainReference, nn.ModuleList, nn.Sequential}
    assert nn.Conv2d in kinds and nn.ReLU in kinds
    assert not any('RepVGG' in k.__name__ or 'BatchNorm' in k.__name__
                   for k in kinds)
    assert bm.count_params(ref) == bm.count_params(forms['deploy'])
    ref_ptrs = {p.data_ptr() for p in ref.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in forms['deploy'].parameters()}
    x = torch.randn(2, 3, 48, 40)
    with torch.inference_mode():
        outs_d, outs_r = forms['deploy'](x), ref(x)
        outs_t = forms['training'](x)
    assert len(outs_d) == len(outs_r) == 4
    for d, r, t in zip(outs_d, outs_r, outs_t):
        assert d.shape == r.shape
        assert relative_error(d, r) <= 1e-6
        assert relative_error(t, d) <= 1e-4
    assert bm.max_relative_error(forms['deploy'], ref, x) <= 1e-6
    truth, noise_ref = bm.reference.float32_noise(forms['training'], x)
    for name in ('deploy', 'reference'):
        with torch.inference_mode():
            cand = bm.reference.flatten_outputs(forms[name](x))
        v = bm.reference.judge_form('tiny', name, truth, noise_ref, cand)
        assert v['passed'] and v['num_outputs'] == 4


def test_equivalence_failure_names_both_errors():
    forms = bm.build_forms(TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # a wrong bias in one fused conv
        forms['deploy'].stage_2[0].conv_reparam.bias.add_(0.05)
    truth, ref = bm.reference.float32_noise(forms['training'], x)
    with torch.inference_mode():
        cand = bm.reference.flatten_outputs(forms['deploy'](x))
    with pytest.raises(bm.BenchmarkError) as e:
        bm.reference.judge_form('tiny 32x32', 'deploy', truth, ref, cand)
    msg = str(e.value)
    assert 'tiny 32x32' in msg and 'deploy model error vs float64 truth' in msg
    assert "training model's own float32 error" in msg


def test_reference_refuses_training_form():
    from mmrepvgg.models import RepVGG
    with pytest.raises(ValueError, match='not in deploy form'):
        bm.build_reference(RepVGG(arch=TINY))


def test_peak_memory_counts_the_activations():
    assert bm.peak_from_memory_events([(0, 10), (2, -10), (1, 5),
                                       (3, 4)]) == 15
    conv = nn.Conv2d(3, 8, 3, padding=1).eval()
    x = torch.randn(1, 3, 64, 64)
    peak = bm.peak_activation_bytes(conv, x)
    assert peak >= 8 * 64 * 64 * 4  # at least its output
    assert peak < 100 * 2**20


@pytest.mark.parametrize('argv,expect', [
    (['--half'], '--half (form deploy-fp16) needs --device cuda'),
    (['--device', 'cuda:0'] if not torch.cuda.is_available() else
     ['--device', 'tpu'], '--device'),
    (['--archs', 'X9'], "unknown arch 'X9'"),
    (['--archs', '{"num_blocks": [1]}'], 'missing keys'),
    (['--archs', '{bad json'], 'invalid JSON'),
    (['--sizes', '0'], '--sizes'),
    (['--repeats', '0'], '--repeats must be >= 1'),
    (['--settle', '-1'], '--settle must be >= 0'),
    (['--tolerance', '0'], '--tolerance must be > 0'),
    (['--batch-sizes', '0'], '--batch-sizes'),
    (['--forms', 'deploy', 'tensorrt'], "unknown form(s) ['tensorrt']"),
    # bounds on every size an option declares, refused before any work
    (['--sizes', '8000'], "--sizes: '8000': each side must be at most 4096"),
    (['--sizes', '16x5000'], 'at most 4096'),
    (['--batch-sizes', '100000'], '--batch-sizes must be >= 1 and <= 1024'),
    (['--archs', json.dumps(dict(num_blocks=[10**8, 1, 1, 1],
                                 width_factor=[1, 1, 1, 1]))],
     '--archs: custom0: num_blocks must be a list of integers >= 1, at most '
     '256 blocks'),
    (['--archs', json.dumps(dict(num_blocks=[1, 1, 1, 1],
                                 width_factor=[1e6, 1, 1, 1]))],
     'width_factor must be a list of numbers in (0, 16]'),
    (['--archs', json.dumps(dict(num_blocks=[60, 60, 60, 60],
                                 width_factor=[16, 16, 16, 16]))],
     'parameters; at most 1000000000'),
    (['--archs', json.dumps(dict(num_blocks=[1, 1, 1, 1], width_factor=[
        1, 1, 1, 1], group_layer_map={'1': 7}))], '--archs: custom0: '),
    (['--archs', json.dumps(dict(num_blocks=5, width_factor=[1]))],
     '--archs: custom0: '),
    (['--archs', '{"num_blocks": ' + '[' * 100000], '--archs: invalid JSON'),
])
def test_bad_options_exit_1_with_one_line(argv, expect, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    base = ['--archs', TINY_JSON, '--sizes', '16', '--batch-sizes', '1',
            '--forms', 'deploy', 'reference', '--repeats', '1', '--warmup',
            '0']
    code, out, err = _run(base + argv + ['--out-dir', out_dir], capsys)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0]
    assert not out_dir.exists()


def test_detector_forms_summary(toy_workspace, monkeypatch):
    """The demo's summary helpers: a bfloat16 toy detector predicts like
    the float32 one (boxes in float32), forms are timed together."""
    from _toolkit import TOY_CONFIG

    from mmrepvgg.apis.convert import build_model, load_config
    from mmrepvgg.benchmark import detector as det
    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.testing import randomize_
    monkeypatch.chdir(toy_workspace)
    cfg = load_config(TOY_CONFIG)
    model = build_model(cfg)
    randomize_(model, seed=0)
    model = switch_to_deploy(model.eval(), inplace=False, verbose=False)
    m16 = det.to_bf16_detector(model)
    assert next(m16.backbone.parameters()).dtype == torch.bfloat16
    assert next(model.backbone.parameters()).dtype == torch.float32
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        raw32 = model.bbox_head(model.extract_feat(x))
        raw16 = m16.bbox_head(m16.extract_feat(x))
    for a, b in zip(raw32[0] + raw32[1], raw16[0] + raw16[1]):
        assert b.dtype == torch.float32
        assert relative_error(a, b) < 0.1  # bfloat16: 8-bit mantissa
    metrics = det.evaluate_model(cfg, m16)
    assert 0 <= metrics['coco/bbox_mAP'] <= 1
    table = det.format_summary([
        dict(form='PyTorch training', map=0.5, latency_ms=10.0, speedup=1.0),
        dict(form='ONNX INT8', map=None, latency_ms=2.5, speedup=4.0)],
        title='input 1x3x128x128')
    assert table.splitlines() == [
        'input 1x3x128x128', '| form | toy-val mAP | latency ms | speed-up |',
        '|---|---:|---:|---:|', '| PyTorch training | 0.500 | 10.00 | 1.00x |',
        '| ONNX INT8 | n/a | 2.50 | 4.00x |']


def test_order_effects_are_reported():
    from mmrepvgg.utils.timing import balanced_schedule, predecessor_effect
    orders = balanced_schedule(['a', 'b', 'c'])  # 'b' 20% slower after 'a'
    times = {'a': [], 'b': [], 'c': []}
    for o in orders:
        for i, f in enumerate(o):
            times[f].append(1.2 if f == 'b' and i and o[i - 1] == 'a'
                            else 1.0)
    eff = predecessor_effect(times, orders)
    lines = bm.report.format_order_effects([dict(
        arch='x', height=8, width=8, batch=1, settle=0, order_effect=eff)])
    assert lines == ['x 8x8 batch 1 (settle 0): b after a 1.200, '
                     'c after b 1.000, c after a 1.000']


def test_side_by_side_picture(toy_workspace, tmp_path):
    import pickle

    import cv2

    from mmrepvgg.benchmark.detector import side_by_side
    images = sorted((toy_workspace / 'data' / 'toy' / 'val').iterdir())[:3]
    h, w = cv2.imread(str(images[0])).shape[:2]

    def dump(path, shift):
        res = [dict(img_path=str(p), pred_instances=dict(
            bboxes=torch.tensor([[4.0 + shift, 4.0, 40.0, 40.0]]),
            scores=torch.tensor([0.9]), labels=torch.tensor([1])))
            for p in images]
        with open(path, 'wb') as f:
            pickle.dump(res, f)

    dump(tmp_path / 'a.pkl', 0)
    dump(tmp_path / 'b.pkl', 3)
    out = tmp_path / 'side.png'
    assert side_by_side({'deploy': tmp_path / 'a.pkl',
                         'INT8': tmp_path / 'b.pkl'}, str(out),
                        ('square', 'circle', 'triangle'), num_images=2,
                        scale=2) == str(out)
    pic = cv2.imread(str(out))
    assert pic.shape == (2 * (2 * h + 24), 2 * 2 * w, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'a.pkl', 'b.pkl', 'side.png']


@pytest.mark.parametrize('sub', ['', 'sub'])
def test_out_dir_on_a_file_is_one_line_before_timing(sub, tmp_path, capsys,
                                                     monkeypatch):
    """--out-dir naming a file raised FileExistsError after the run."""
    blocker = tmp_path / 'results'
    blocker.write_text('keep')
    monkeypatch.setattr(bm, 'run_benchmark', lambda *a, **k: 1 / 0)
    code, _, err = _run(['--archs', TINY_JSON, '--sizes', '16',
                         '--out-dir', blocker / sub], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --out-dir '), err
    assert 'exists and is not a folder' in lines[0]
    assert blocker.read_text() == 'keep'


def test_output_file_that_is_a_folder_is_refused(tmp_path, capsys,
                                                 monkeypatch):
    (tmp_path / 'benchmark.png').mkdir()
    monkeypatch.setattr(bm, 'run_benchmark', lambda *a, **k: 1 / 0)
    code, _, err = _run(['--archs', TINY_JSON, '--sizes', '16',
                         '--out-dir', tmp_path], capsys)
    assert code == 1 and err.count('\n') == 1
    assert 'benchmark.png: is a folder' in err


@pytest.mark.parametrize('argv', [['--batch-sizes', 'x'], ['--order', 'up'],
                                  ['--nope']])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_tool.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count('\n') == 1 and err.startswith('error: '), err
