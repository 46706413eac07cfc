"""tools/train.py refuses bad input with one line before the runner starts
(issue 9, items 7 and 10)."""
import pytest

from _toolkit import TOY_CONFIG, load_tool


def _train_main(argv, capsys):
    try:
        code = load_tool('train').main([str(a) for a in argv])
    except SystemExit as e:  # argument errors
        code = e.code
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize('case, code, expect', [
    ('syntax', 1, 'cannot load config (SyntaxError'),
    ('missing-base', 1, 'cannot load config'),
    ('no-config', 1, 'config file'),
    ('cfg-option-no-equal', 2, "--cfg-options: 'oops' is not key=value"),
    ('cfg-option-brackets', 2, '--cfg-options: '),
    ('cfg-option-merge', 1, '--cfg-options: cannot set '
     'train_cfg.max_epochs.x=1'),
    ('load-from', 1, 'no such checkpoint file'),
    ('load-from-truncated', 1, 'corrupt checkpoint'),
    ('auto-scale-lr', 1, '--auto-scale-lr needs'),
    ('unknown-flag', 2, 'unrecognized arguments: --bogus'),
])
def test_bad_input_is_one_line_and_writes_nothing(
        case, code, expect, tmp_path, capsys):
    config = TOY_CONFIG
    extra = []
    if case == 'syntax':
        config = tmp_path / 'bad.py'
        config.write_text('model = dict(type=\n')
    elif case == 'missing-base':
        config = tmp_path / 'base.py'
        config.write_text("_base_ = './nowhere.py'\nmodel = dict()\n")
    elif case == 'no-config':
        config = tmp_path / 'absent.py'
    elif case == 'cfg-option-no-equal':
        extra = ['--cfg-options', 'oops']
    elif case == 'cfg-option-brackets':
        extra = ['--cfg-options', 'a=[1,(2]']
    elif case == 'cfg-option-merge':
        extra = ['--cfg-options', 'train_cfg.max_epochs.x=1']
    elif case == 'load-from':
        extra = ['--cfg-options', f'load_from={tmp_path / "none.pth"}']
    elif case == 'load-from-truncated':
        (tmp_path / 'cut.pth').write_bytes(b'PK\x03\x04' + b'\0' * 64)
        extra = ['--cfg-options', f'load_from={tmp_path / "cut.pth"}']
    elif case == 'auto-scale-lr':
        extra = ['--auto-scale-lr', '--cfg-options',
                 'auto_scale_lr.base_batch_size=0']
    elif case == 'unknown-flag':
        extra = ['--bogus']
    wd = tmp_path / 'work'
    got, lines = _train_main([config, '--work-dir', wd] + extra, capsys)
    assert got == code, lines
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    assert expect in lines[0], lines
    if case.startswith('load-from'):
        assert lines[0].startswith('error: load_from: '), lines
    assert not wd.exists()
