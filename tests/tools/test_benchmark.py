"""tools/benchmark.py: a tiny in-process run, the reference builder, the
memory method and bad options (no speed assertion)."""
import itertools
import json

import pytest
import torch
import torch.nn as nn
from _toolkit import load_tool

from mmrepvgg.apis import benchmark as bm
from mmrepvgg.testing import relative_error

bench_tool = load_tool('benchmark')

TINY = dict(num_blocks=(1, 2, 1, 1), width_factor=(0.25, 0.25, 0.25, 0.25))
TINY_JSON = json.dumps(dict(TINY, name='tiny'))


def _run(argv, capsys):
    code = bench_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_run_writes_table_and_plot(tmp_path, capsys):
    out_dir = tmp_path / 'bench'
    argv = ['--archs', TINY_JSON, '--sizes', '32', '--batch-sizes', '1',
            '--repeats', '3', '--warmup', '1', '--threads', '1',
            '--out-dir', out_dir]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        'benchmark.json', 'benchmark.md', 'benchmark.png']
    assert (out_dir / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = (out_dir / 'benchmark.md').read_text()
    header = '| ' + ' | '.join(bm.COLUMNS) + ' |'
    for col in ('training ms', 'deploy ms', 'reference ms', 'deploy img/s',
                'deploy/reference', 'training/deploy', 'params training',
                'params deploy', 'peak MiB training', 'peak MiB deploy'):
        assert col in header
    assert header in md and header in out  # file and stdout
    assert 'python tools/benchmark.py --archs' in md  # the command line
    assert f'torch: {torch.__version__}' in md
    row = [ln for ln in md.splitlines() if ln.startswith('| tiny |')]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip('|').split('|')]
    assert len(cells) == len(bm.COLUMNS)
    assert cells[1:3] == ['32x32', '1']
    assert all(float(c.replace(',', '')) > 0 for c in cells[3:13])
    # the training form has the extra branch parameters
    assert int(cells[11].replace(',', '')) > int(cells[12].replace(',', ''))
    # one PASS/MISS line per row for deploy/reference, N/A for the A0 target
    assert sum(ln.startswith(('PASS deploy/reference', 'MISS deploy/'
                              'reference')) for ln in out.splitlines()) == 1
    assert 'N/A  training/deploy >= 1.3' in out
    rows = json.loads((out_dir / 'benchmark.json').read_text())
    assert len(rows[0]['times_ms']['deploy']) == 3
    assert rows[0]['rel_err_deploy_reference'] <= 1e-6


def test_threads_restored(tmp_path, capsys):
    before = torch.get_num_threads()
    code, _, err = _run(['--archs', TINY_JSON, '--sizes', '16',
                         '--batch-sizes', '1', '--repeats', '1', '--warmup',
                         '0', '--threads', '1', '--out-dir', tmp_path],
                        capsys)
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


def test_paired_ratio():
    assert bm.paired_ratio([2, 20, 4], [1, 10, 4]) == 2


@pytest.mark.parametrize('argv,expect', [
    (['--half'], '--half needs --device cuda'),
    (['--device', 'cuda:0'] if not torch.cuda.is_available() else
     ['--device', 'tpu'], '--device'),
    (['--archs', 'X9'], "unknown arch 'X9'"),
    (['--archs', '{"num_blocks": [1]}'], 'missing keys'),
    (['--archs', '{bad json'], 'invalid JSON'),
    (['--sizes', '0'], '--sizes'),
    (['--repeats', '0'], '--repeats must be >= 1'),
    (['--batch-sizes', '0'], '--batch-sizes'),
])
def test_bad_options_exit_1_with_one_line(argv, expect, tmp_path, capsys):
    out_dir = tmp_path / 'out'
    base = ['--archs', TINY_JSON, '--sizes', '16', '--batch-sizes', '1',
            '--repeats', '1', '--warmup', '0']
    code, out, err = _run(base + argv + ['--out-dir', out_dir], capsys)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert expect in lines[0]
    assert not out_dir.exists()


def test_balanced_schedule_and_interleaving():
    forms = ('training', 'deploy', 'reference')
    schedule = bm.balanced_schedule(forms)
    assert sorted(schedule) == sorted(itertools.permutations(forms))
    seq = [n for order in schedule for n in order]
    pairs = [(seq[i - 1], seq[i]) for i in range(len(seq))]  # cyclic
    assert all(a != b for a, b in pairs)
    assert {pairs.count((a, b)) for a in forms for b in forms if a != b} \
        == {3}
    calls = []
    fns = {k: (lambda x, k=k: calls.append(k)) for k in forms}
    times = bm.time_interleaved(fns, torch.zeros(1), repeats=7, warmup=2)
    assert {k: len(v) for k, v in times.items()} == dict.fromkeys(forms, 7)
    # warm-up rounds, then the timed rounds from the schedule's start
    expect = [n for i in range(2) for n in schedule[i]]
    expect += [n for i in range(7) for n in schedule[i % 6]]
    assert calls == expect
