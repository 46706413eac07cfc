import os
import warnings

import pytest
import torch

# At most 2 threads, unless OMP_NUM_THREADS says otherwise (make
# test-numerics runs the numerical tests with 1 and 2 threads).
if not os.environ.get('OMP_NUM_THREADS'):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings('ignore', message='.*TypedStorage is deprecated.*')


@pytest.fixture(scope='session')
def dist_world1(tmp_path_factory):
    """A single-process gloo group, needed to build mmcv's MMSyncBN."""
    import torch.distributed as dist
    if not dist.is_initialized():
        path = tmp_path_factory.mktemp('dist') / 'store'
        dist.init_process_group('gloo', init_method=f'file://{path}',
                                rank=0, world_size=1)
    yield


def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False,
                     help='also run tests marked slow')


def pytest_collection_modifyitems(config, items):
    if config.getoption('--runslow'):
        return
    skip = pytest.mark.skip(reason='slow: run with --runslow')
    for item in items:
        if 'slow' in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state: results do not depend on
    which tests ran before (float32 rounding noise varies with the input)."""
    torch.manual_seed(0)
    yield
