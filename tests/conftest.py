import os
import warnings

import pytest
import torch

# At most 2 threads, unless OMP_NUM_THREADS says otherwise (make
# test-numerics runs the numerical tests with 1 and 2 threads). Under
# pytest-xdist the cores are shared by the workers: more threads than cores
# make OpenMP's spin-waiting threads slow every worker down many times over.
if not os.environ.get('OMP_NUM_THREADS'):
    _workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1') or 1)
    torch.set_num_threads(
        max(1, min(2, (os.cpu_count() or 1) // max(1, _workers))))
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
def _isolate_default_scope():
    """mmengine's current ``DefaultScope`` is process-global (the latest one
    created, e.g. by a runner): restore it after every test, so that no test
    depends on which tests ran before it in the same process."""
    from mmengine.registry import DefaultScope
    saved = DefaultScope._instance_dict.copy()
    yield
    DefaultScope._instance_dict.clear()
    DefaultScope._instance_dict.update(saved)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state: results do not depend on
    which tests ran before (float32 rounding noise varies with the input)."""
    torch.manual_seed(0)
    yield
