import pytest
from _export_helpers import random_detector


@pytest.fixture(scope='session')
def detectors():
    """``get(name) -> (cfg, model)``: calibrated random detectors (see
    :func:`_export_helpers.random_detector`), built once per session; tests
    must not modify them (deep-copy or switch with ``inplace=False``)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = random_detector(name)
        return cache[name]

    return get
