"""tools/analysis_tools/benchmark.py, in process: tiny runs, the files
written, bad options
(no speed assertion). The package is tested in tests/benchmark, the timing
method in tests/utils/test_timing.py."""
import json
import os

import pytest
import torch
from _toolkit import load_tool

from mmrepvgg.benchmark import report
from mmrepvgg.benchmark import run as bench

bench_tool = load_tool('benchmark')

TINY = dict(num_blocks=(1, 2, 1, 1), width_factor=(0.25, 0.25, 0.25, 0.25),
            group_layer_map=None, se_cfg=None)
TINY_ARCH = 'tiny'  # registered for these tests (fixture below)
PT_FORMS = ['training', 'deploy', 'reference']


@pytest.fixture(autouse=True)
def tiny_arch(monkeypatch):
    from mmrepvgg.models.backbones.repvgg import ARCH_SETTINGS
    monkeypatch.setitem(ARCH_SETTINGS, 'tiny', TINY)


def _run(argv, capsys):
    code = bench_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _cells(md, label='tiny'):
    rows = [ln for ln in md.splitlines() if ln.startswith(f'| {label} |')]
    return [[c.strip() for c in r.strip('|').split('|')] for r in rows]


def test_tiny_run_writes_table_and_json(tmp_path, capsys):
    out_dir = tmp_path / 'bench'
    argv = ['--archs', TINY_ARCH, '--sizes', '32', '--batch-sizes', '1',
            '--forms'] + PT_FORMS + [
            '--repeats', '3', '--warmup', '1', '--threads', '1',
            '--out-dir', out_dir]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        'benchmark.json', 'benchmark.md']
    md = (out_dir / 'benchmark.md').read_text()
    rows = json.loads((out_dir / 'benchmark.json').read_text())
    cols = [c.strip() for c in report.format_table(rows).splitlines()[0]
            .strip('|').split('|')]
    assert cols == ['arch', 'input', 'batch', 'training ms', 'deploy ms',
                    'reference ms', 'deploy/reference', 'training/deploy',
                    'params training', 'params deploy', 'rounds used']
    header = '| ' + ' | '.join(cols) + ' |'
    assert header in md and header in out  # file and stdout
    # the command line
    assert 'python tools/analysis_tools/benchmark.py --archs' in md
    assert f'torch: {torch.__version__}' in md
    assert 'settle calls: 1' in md
    (cells, ) = [c for c in _cells(md) if len(c) == len(cols)]
    assert cells[1:3] == ['32x32', '1']
    assert all(float(c.replace(',', '')) > 0 for c in cells[3:10])
    # the training form has the extra branch parameters
    assert int(cells[8].replace(',', '')) > int(cells[9].replace(',', ''))
    assert cells[-1].split()[0].endswith('/3')
    # one PASS/MISS line per row for deploy/reference, N/A for the A0 target
    assert sum(ln.startswith(('- PASS deploy/reference', '- MISS deploy/'
                              'reference')) for ln in out.splitlines()) == 1
    assert 'N/A  training/deploy >= 1.3' in out
    assert len(rows[0]['times_ms']['deploy']) == 3
    acc = rows[0]['accuracy']
    assert set(acc) == {'deploy', 'reference'}
    for a in acc.values():  # float32-noise verdicts, both numbers kept
        assert a['passed'] and a['error'] <= 4 * max(a['noise'], 1.2e-7)
    assert rows[0]['rounds']['total'] == 3


def test_onnxruntime_forms(tmp_path, capsys, monkeypatch):
    import tempfile
    pytest.importorskip('onnxruntime')
    # the graphs go to a private scratch folder, removed afterwards (and by
    # the next run after a SIGKILL: tests/utils/test_fileio.py)
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
    scratch, real = [], bench.run_benchmark

    def run_benchmark(*args, **kwargs):
        scratch.append(tempfile.gettempdir())
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, 'run_benchmark', run_benchmark)
    out_dir = tmp_path / 'bench'
    forms = ['deploy', 'ort-fp32', 'ort-int8']
    code, out, err = _run(['--archs', TINY_ARCH, '--sizes', '32',
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
        # ort-fp32 judged by the float32 noise, INT8 reported as SQNR
        assert r['accuracy']['ort-fp32']['passed']
        assert 10 < r['accuracy']['ort-int8']['sqnr_db'] < 80
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
    code, _, err = _run(['--archs', TINY_ARCH, '--sizes', '16',
                         '--batch-sizes', '1', '--forms', 'deploy',
                         'reference', '--repeats', '1', '--warmup', '0',
                         '--threads', '1', '--out-dir', tmp_path], capsys)
    assert code == 0, err
    assert torch.get_num_threads() == before


@pytest.mark.parametrize('argv,expect', [
    # bounds on every size an option declares, refused before any work
    (['--sizes', '4096', '--batch-sizes', '1', '1024'],
     '--batch-sizes x --sizes: 17179869184 pixels in one batch'),
    (['--detector-images', '2'], '--detector-images needs --detector'),
])
def test_bad_options_exit_1_with_one_line(argv, expect, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    base = ['--archs', TINY_ARCH, '--sizes', '16', '--batch-sizes', '1',
            '--forms', 'deploy', 'reference', '--repeats', '1', '--warmup',
            '0']
    code, out, err = _run(base + argv + ['--out-dir', out_dir], capsys)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0]
    assert not out_dir.exists()


@pytest.mark.parametrize('sub', ['', 'sub'])
def test_out_dir_on_a_file_is_one_line_before_timing(sub, tmp_path, capsys,
                                                     monkeypatch):
    """--out-dir naming a file raised FileExistsError after the run."""
    blocker = tmp_path / 'results'
    blocker.write_text('keep')
    monkeypatch.setattr(bench, 'run_benchmark', lambda *a, **k: 1 / 0)
    code, _, err = _run(['--archs', TINY_ARCH, '--sizes', '16',
                         '--out-dir', blocker / sub], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --out-dir '), err
    assert 'exists and is not a folder' in lines[0]
    assert blocker.read_text() == 'keep'


def test_output_file_that_is_a_folder_is_refused(tmp_path, capsys,
                                                 monkeypatch):
    (tmp_path / 'benchmark.json').mkdir()
    monkeypatch.setattr(bench, 'run_benchmark', lambda *a, **k: 1 / 0)
    code, _, err = _run(['--archs', TINY_ARCH, '--sizes', '16',
                         '--out-dir', tmp_path], capsys)
    assert code == 1 and err.count('\n') == 1
    assert 'benchmark.json: is a folder' in err


@pytest.mark.parametrize('argv,expect', [
    (['--batch-sizes', 'x'], "argument --batch-sizes: 'x' is not an integer"),
    (['--nope'], 'unrecognized arguments: --nope'),
    (['--sizes', '0'], "argument --sizes: '0' is not a size"),
    (['--sizes', '8000'], 'sides in 1..4096'),
    (['--sizes', '16x5000'], 'sides in 1..4096'),
    (['--repeats', '0'], "argument --repeats: '0' is not an integer >= 1"),
    (['--settle', '-1'], "argument --settle: '-1' is not an integer >= 0"),
    (['--threads', '0'], "argument --threads: '0' is not an integer >= 1"),
    (['--batch-sizes', '0'], "--batch-sizes: '0' is not an integer in "
     '1..1024'),
    (['--batch-sizes', '100000'], 'not an integer in 1..1024'),
    (['--forms', 'deploy', 'tensorrt'],
     "argument --forms: invalid choice: 'tensorrt'"),
    (['--detector-images', '0'], 'argument --detector-images'),
    (['--archs', 'X9'], "argument --archs: invalid choice: 'X9'"),
])
def test_usage_errors_are_one_line(argv, expect, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_tool.main(argv + ['--out-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count('\n') == 1 and err.startswith('error: '), err
    assert expect in err
    assert not (tmp_path / 'out').exists()


def test_detector_part_every_form_with_its_map(toy_trained, tmp_path,
                                               capsys, monkeypatch):
    """--detector: the toy detector end to end beside the backbone rows,
    every form (PyTorch, ONNX FP32/INT8 on onnxruntime and OpenVINO) with
    its mAP from the config's evaluator, and the INT8 mAP targets."""
    pytest.importorskip('onnxruntime')
    from _toolkit import TOY_CONFIG

    from mmrepvgg.export import openvino
    monkeypatch.chdir(toy_trained['ws'])
    out_dir = tmp_path / 'bench'
    code, out, err = _run(['--archs', TINY_ARCH, '--sizes', '16',
                           '--forms', 'deploy', '--repeats', '2',
                           '--warmup', '1', '--threads', '1', '--detector',
                           TOY_CONFIG, toy_trained['ckpt'],
                           '--detector-images', '2', '--out-dir', out_dir],
                          capsys)
    assert code == 0, err
    md = (out_dir / 'benchmark.md').read_text()
    assert '## Detector end to end' in md and 'mAP on 2 of 8 val' in md
    forms = ['PyTorch training', 'PyTorch deploy', 'ONNX FP32', 'ONNX INT8']
    usable = openvino.unusable_reason() is None
    if usable:
        forms += ['ONNX FP32 (OpenVINO)', 'ONNX INT8 (OpenVINO)']
    part = md.split('## Detector end to end')[1]
    cells = {c[0]: c for c in (
        [x.strip() for x in ln.strip('|').split('|')]
        for ln in part.splitlines() if ln.startswith('| ')) if c[0] != 'form'}
    assert list(cells) == forms
    for c in cells.values():
        assert 0 <= float(c[1]) <= 1 and float(c[2]) > 0
    assert md.count('detector ONNX INT8') == (2 if usable else 1)
    assert '| form | val mAP | latency ms | speed-up |' in md


def test_detector_options_refused_before_timing(tmp_path, capsys):
    from _toolkit import TOY_CONFIG
    for argv, expect in (
            (['--detector-images', '2'], '--detector-images needs '
             '--detector'),
            (['--detector', TOY_CONFIG, tmp_path / 'none.pth'],
             f'--detector: checkpoint {tmp_path / "none.pth"} does not '
             'exist')):
        code, out, err = _run(['--archs', TINY_ARCH, '--sizes', '16',
                               '--out-dir', tmp_path / 'b'] + argv, capsys)
        assert code == 1 and err.count('\n') == 1 and expect in err, err
        assert not (tmp_path / 'b').exists()
