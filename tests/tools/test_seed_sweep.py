"""tools/analysis_tools/seed_sweep.py: seeds trained once, results recorded
and reused, a
changed config or options refused, the metric of the newest run only."""
import json
import math
import os
import os.path as osp
import sys

import pytest

from _toolkit import ROOT, TOY_CONFIG, load_tool, run_tool
from mmrepvgg.apis.sweep import final_metric, format_table, summarize
from mmrepvgg.utils.cli import ToolError

QA_CONFIG = osp.join(ROOT, 'configs', 'toy',
                     'retinanet_qarepvgg-tiny_qarepvgg-fpn_toy.py')


def _log_run(work_dir, stamp, records):
    d = osp.join(work_dir, stamp, 'vis_data')
    os.makedirs(d, exist_ok=True)
    with open(osp.join(d, 'scalars.json'), 'w') as f:
        for r in records:
            f.write((json.dumps(r) if isinstance(r, dict) else r) + '\n')


def test_final_metric_reads_the_newest_run_only(tmp_path):
    w = str(tmp_path)
    with pytest.raises(ToolError, match='no mmengine run'):
        final_metric(w)
    _log_run(w, '20261101_100000', [{'loss': 1.0}, {'coco/bbox_mAP': 0.5}])
    assert final_metric(w) == 0.5
    # the last value of the newest run; a line cut by a kill is skipped
    _log_run(w, '20261101_110000', [{'coco/bbox_mAP': 0.1}, '',
                                    {'coco/bbox_mAP': 0.625}, '{"coco/bb'])
    assert final_metric(w) == 0.625
    # a newer run without the metric is an error, not the older value
    _log_run(w, '20261101_120000', [{'loss': 0.3}])
    with pytest.raises(ToolError, match='20261101_120000.*no coco/bbox_mAP'):
        final_metric(w)
    _log_run(w, '20261101_130000', ['{"coco/bbox_mAP": NaN}'])
    with pytest.raises(ToolError, match='is nan'):
        final_metric(w)


def test_summary_and_table():
    s = summarize([0.5, 0.7])
    assert s['n'] == 2 and math.isclose(s['mean'], 0.6)
    assert math.isclose(s['std'], math.sqrt(0.02))  # sample std (n - 1)
    assert math.isclose(s['sem'], 0.1)
    assert summarize([0.4])['std'] == 0
    with pytest.raises(ValueError):
        summarize([])
    table = format_table({'a': {0: 0.5, 1: 0.7}, 'b': {0: 0.6, 1: 0.6}},
                         {'a': 'x/a.py', 'b': 'x/b.py'}, 'coco/bbox_mAP')
    lines = table.splitlines()
    assert lines[0].startswith('| run | config | seed 0 | seed 1 | mean')
    assert lines[2] == '| a | a.py | 0.500 | 0.700 | 0.600 +- 0.141 |  |'
    assert lines[3] == ('| b | b.py | 0.600 | 0.600 | 0.600 +- 0.000 | '
                        '+0.000 +- 0.100 |')


def _fake_train(calls):
    """A ``train`` that logs a metric depending on label and seed."""

    def train(run, seed):
        calls.append((run.label, seed, list(run.train_args(seed))))
        value = 0.5 + 0.1 * seed + (0.01 if run.label == 'qa' else 0)
        _log_run(run.work_dir(seed), '20261123_000000',
                 [{'coco/bbox_mAP': value}])

    return train


def test_sweep_trains_each_seed_once_and_reuses_results(
        tmp_path, capsys, monkeypatch):
    tool = load_tool('seed_sweep')
    calls = []
    monkeypatch.setattr(tool, 'train', _fake_train(calls))
    work = str(tmp_path / 'sweep')
    argv = ['--seeds', '0', '1', '--work-dir', work,
            '--run', 'repvgg', TOY_CONFIG,
            '--run', 'qa', QA_CONFIG, 'model.neck.block_cfg.post_norm_init=1']
    assert tool.main(argv) == 0
    assert [c[:2] for c in calls] == [('repvgg', 0), ('repvgg', 1),
                                      ('qa', 0), ('qa', 1)]
    # the seed goes first, the run's own options after it
    assert calls[2][2] == [QA_CONFIG, '--work-dir', osp.join(work, 'qa',
                                                             'seed0'),
                           '--cfg-options', 'randomness.seed=0',
                           'model.neck.block_cfg.post_norm_init=1']
    table = capsys.readouterr().out  # the table alone: progress on stderr
    assert table.startswith('| run |')
    assert '| qa | retinanet_qarepvgg-tiny_qarepvgg-fpn_toy.py | 0.510 | ' \
           '0.610 | 0.560 +- 0.071 | +0.010 +- 0.071 |' in table
    record = json.load(open(osp.join(work, 'qa', 'seed1',
                                     'sweep_result.json')))
    assert record['seed'] == 1 and record['value'] == pytest.approx(0.61)
    assert record['options'] == ['model.neck.block_cfg.post_norm_init=1']

    # rerun with one more seed: only that one trains
    calls.clear()
    assert tool.main(argv[:3] + ['2'] + argv[3:]) == 0
    assert [c[:2] for c in calls] == [('repvgg', 2), ('qa', 2)]
    assert '(recorded)' in capsys.readouterr().err


@pytest.mark.parametrize('change, match', [
    ('options', 'another options'),
    ('config', 'another config'),
])
def test_changed_run_is_refused_before_training(
        change, match, tmp_path, capsys, monkeypatch):
    tool = load_tool('seed_sweep')
    calls = []
    monkeypatch.setattr(tool, 'train', _fake_train(calls))
    config = tmp_path / 'toy.py'
    config.write_text(f"_base_ = '{TOY_CONFIG}'\n")
    work = str(tmp_path / 'sweep')
    base = ['--seeds', '0', '--work-dir', work, '--run', 'qa', str(config)]
    assert tool.main(base) == 0
    calls.clear()
    capsys.readouterr()
    if change == 'options':
        argv = base + ['model.neck.num_outs=3']
    else:
        config.write_text(f"_base_ = '{TOY_CONFIG}'\nmax_epochs = 12\n")
        argv = base
    # a new seed comes first, but nothing trains once any seed is refused
    assert tool.main(argv[:1] + ['1'] + argv[1:]) == 1
    assert calls == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and 'sweep_result.json' in err[0]


@pytest.mark.parametrize('argv, code, match', [
    (['--run', 'a'], 2, '--run a: needs a label and a config'),
    (['--run', 'a', TOY_CONFIG, '--run', 'a', TOY_CONFIG], 2,
     'labels must be distinct'),
    (['--seeds', '1', '1', '--run', 'a', TOY_CONFIG], 2, '--seeds'),
    (['--run', 'a', 'nowhere.py'], 1, 'config file nowhere.py does not exist'),
    (['--run', 'a/b', TOY_CONFIG], 1, "'a/b' is not a usable label"),
    (['--run', 'a', TOY_CONFIG, 'randomness.seed=3'], 1, 'set by --seeds'),
    (['--run', 'a', TOY_CONFIG, 'oops'], 1, "'oops' is not key=value"),
])
def test_bad_arguments_are_one_line(argv, code, match, tmp_path, capsys,
                                    monkeypatch):
    tool = load_tool('seed_sweep')
    monkeypatch.setattr(tool, 'train', _fake_train([]))
    try:
        got = tool.main(argv + ['--work-dir', str(tmp_path / 'w')])
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code
    assert len(err) == 1 and match in err[0], err
    assert not osp.exists(tmp_path / 'w')


def test_failed_training_names_the_run_and_log(tmp_path):
    """A real tools/train.py refusal surfaces as one line with its log."""
    work = tmp_path / 'sweep'
    tool = osp.join(ROOT, 'tools', 'analysis_tools', 'seed_sweep.py')
    proc = run_tool([sys.executable, tool,
                     '--seeds', '0', '--work-dir', str(work),
                     '--run', 'bad', TOY_CONFIG, 'train_cfg.max_epochs.x=1'],
                    cwd=str(tmp_path), timeout=300)
    # progress on stderr, then the one error line
    err = [ln for ln in proc.stderr.splitlines()
           if not ln.startswith('[sweep] ')]
    assert proc.returncode == 1, proc.stderr
    assert len(err) == 1 and err[0].startswith('error: '), err
    assert 'bad seed 0: tools/train.py exited 1: error: --cfg-options: ' \
           'cannot set train_cfg.max_epochs.x=1' in err[0]
    assert str(work / 'bad' / 'seed0' / 'sweep_train.log') in err[0]
    assert not (work / 'bad' / 'seed0' / 'sweep_result.json').exists()


@pytest.mark.parametrize('record, expect', [
    ({'value': 1e308}, 'value 1e+308 is not a finite number in [0, 1]'),
    ({'value': -3}, 'value -3 is not a finite number in [0, 1]'),
    ({'value': float('nan')}, 'value nan is not a finite number'),
    ([0.5], 'not a sweep record'),
    ('"0.5"', 'not a sweep record'),
])
def test_implausible_or_misshapen_record_is_one_line(record, expect, tmp_path,
                                                     capsys, monkeypatch):
    tool = load_tool('seed_sweep')
    calls = []
    monkeypatch.setattr(tool, 'train', _fake_train(calls))
    argv = ['--seeds', '0', '--work-dir', str(tmp_path), '--run', 'a',
            TOY_CONFIG]
    assert tool.main(argv) == 0
    path = tmp_path / 'a' / 'seed0' / 'sweep_result.json'
    if isinstance(record, dict):
        record = dict(json.loads(path.read_text()), **record)
    path.write_text(record if isinstance(record, str) else
                    json.dumps(record))
    capsys.readouterr()
    assert tool.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0] and str(path) in err[0], err
    assert len(calls) == 1


def test_logged_metric_outside_0_1_is_refused(tmp_path):
    _log_run(str(tmp_path), '20261101_100000', [{'coco/bbox_mAP': -1.0}])
    with pytest.raises(ToolError, match='-1.0, not a finite number in'):
        final_metric(str(tmp_path))
