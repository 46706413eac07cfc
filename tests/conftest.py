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


def _managed_classes():
    """Every mmengine ``ManagerMixin`` class (each keeps its own instances)."""
    from mmengine.utils import ManagerMixin
    todo, seen = [ManagerMixin], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


@pytest.fixture(autouse=True)
def _isolate_global_instances():
    """mmengine keeps process-global named instances (the current
    ``DefaultScope``, loggers, message hubs, visualizers): restore them after
    every test, so no test depends on which tests ran before it in the same
    process. A runner names its logger after the second it started, so two
    in-process tool runs within one second would otherwise share a logger
    whose handlers write to the first test's closed capture stream."""
    import logging
    saved = {cls: cls._instance_dict.copy() for cls in _managed_classes()}
    yield
    for cls in _managed_classes():
        for name, inst in list(cls._instance_dict.items()):
            if saved.get(cls, {}).get(name) is inst:
                continue
            if isinstance(inst, logging.Logger):
                for handler in inst.handlers[:]:
                    inst.removeHandler(handler)
                    handler.close()
        cls._instance_dict.clear()
        cls._instance_dict.update(saved.get(cls, {}))


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state: results do not depend on
    which tests ran before (float32 rounding noise varies with the input)."""
    torch.manual_seed(0)
    yield
