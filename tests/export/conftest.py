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


@pytest.fixture(scope='session')
def toy_e2e(detectors, tmp_path_factory):
    """``(cfg, deploy model, path)``: the calibrated random toy detector
    exported end to end (with the ``img_shape`` input, 128x128)."""
    import torch
    from _export_helpers import config_path

    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.export.onnx_export import export_onnx
    d = tmp_path_factory.mktemp('toy_e2e')
    cfg, model = detectors('toy')
    torch.save({'state_dict': model.state_dict()}, d / 'toy.pth')
    export_onnx(cfg, config_path('toy'), str(d / 'toy.pth'),
                str(d / 'toy.onnx'), mode='end2end', img_shape_input=True,
                shape=(128, 128), verify_images=0)
    return cfg, switch_to_deploy(model, verbose=False), d / 'toy.onnx'


@pytest.fixture
def openvino_usable():
    """Skip, with the probe's one-line reason, where OpenVINO cannot run."""
    from mmrepvgg.export import openvino
    reason = openvino.unusable_reason()
    if reason is not None:
        pytest.skip(f'OpenVINO is not usable here: {reason}')


@pytest.fixture
def failing_probe(monkeypatch):
    """OpenVINO's probe fails (as after a SIGFPE in compile_model) for the
    test; the process's verdict is restored afterwards."""
    from mmrepvgg.export import openvino
    monkeypatch.setattr(openvino, '_verdict', {})
    monkeypatch.setattr(openvino, '_core', None)
    monkeypatch.setattr(openvino, '_probe',
                        lambda: 'simulated: compile_model died with SIGFPE')
