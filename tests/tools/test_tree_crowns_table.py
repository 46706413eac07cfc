"""tools/analysis_tools/tree_crowns_table.py: what can be checked without
the nine trainings it reads (issue 17)."""
import pytest

from _toolkit import ROOT, load_tool

TOOL = load_tool('tree_crowns_table')


def test_runs_share_everything_but_the_backbone_and_count_alike():
    labels = [label for label, _ in TOOL.RUNS]
    assert labels == ['RepVGG-A0', 'QARepVGG-A0', 'ResNet-18']
    a0 = TOOL.complexity(TOOL.RUNS[0][1])
    r18 = TOOL.complexity(TOOL.RUNS[2][1])
    assert a0[0] > a0[1] > 0  # fusion removes the 1x1 and identity branches
    assert r18[0] == r18[1]  # no multi-branch blocks: its own deploy form
    assert a0[3] == r18[3] == (416, 416)  # 400 px tiles, padded to 32
    assert 0 < a0[2] < r18[2]


def test_untrained_seed_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = TOOL.main(['--work-dir', str(tmp_path), '--seeds', '0'])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1, err
    want = tmp_path / 'RepVGG-A0' / 'seed0' / 'epoch_24.pth'
    assert err[0].startswith(f'error: {want}: not trained'), err
    assert 'seed_sweep.py' in err[0]
    assert not (tmp_path / 'RepVGG-A0' / 'seed0' / 'deploy').exists()


@pytest.mark.parametrize('options', [['--seeds'], ['--repeats', 'x']])
def test_bad_options_are_one_line(options, capsys):
    with pytest.raises(SystemExit) as e:
        TOOL.main(options)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
