import os.path as osp
import sys

import pytest

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'tools'))
from _toolkit import load_tool  # noqa: E402


@pytest.fixture(scope='session')
def toy_data(tmp_path_factory):
    """A folder holding a small data/toy, where the toy config runs."""
    ws = tmp_path_factory.mktemp('toy')
    assert load_tool('make_toy_dataset').main([
        '--out', str(ws / 'data' / 'toy'), '--train', '4', '--val', '4',
        '--size', '96']) == 0
    return ws
