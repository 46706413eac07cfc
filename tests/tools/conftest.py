import os.path as osp
import sys

import pytest
from _toolkit import (TOOLS, TOY_CONFIG, run_tool, tool_path,
                      toy_train_options)


@pytest.fixture(scope='session')
def toy_workspace(tmp_path_factory):
    """A folder holding data/toy (small) where the toy config runs."""
    ws = tmp_path_factory.mktemp('toy')
    proc = run_tool([sys.executable, tool_path('make_toy_dataset'),
                     '--out', 'data/toy', '--train', '16', '--val', '8',
                     '--size', '96'], cwd=ws)
    assert proc.returncode == 0, proc.stderr
    return ws


@pytest.fixture(scope='session')
def toy_trained(toy_workspace):
    """Train the toy detector for one epoch (2 iterations) with train.py."""
    wd = toy_workspace / 'work_dirs' / 'train'
    proc = run_tool([sys.executable, osp.join(TOOLS, 'train.py'), TOY_CONFIG,
                     '--work-dir', str(wd)] + toy_train_options(1),
                    cwd=toy_workspace)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = wd / 'epoch_1.pth'
    assert ckpt.is_file()
    return dict(ws=toy_workspace, work_dir=wd, ckpt=ckpt)
