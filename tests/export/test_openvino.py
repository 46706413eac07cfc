"""OpenVINO as the second runtime of the project's ONNX files (issue 18):
its sessions offer onnxruntime's calls, its float32 results are float32
noise away from the truth like onnxruntime's, the precision hint is the one
asked for (not the CPU plugin's bfloat16 default), end-to-end graphs with
NonMaxSuppression give onnxruntime's detections, and a machine where
OpenVINO crashes gets one line, never a crash."""
import copy
import signal

import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime')

from mmrepvgg.deploy.verify import flatten_outputs, judge_fp32  # noqa: E402
from mmrepvgg.export import openvino, runtime  # noqa: E402
from mmrepvgg.export.evaluate import OnnxRuntimeDetector  # noqa: E402
from mmrepvgg.export.verify import (as_channels_last,  # noqa: E402
                                    compare_detections, instances_to_numpy,
                                    make_samples, noisier)
from mmrepvgg.testing import float64_outputs, randomize_  # noqa: E402

TINY = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25])


@pytest.fixture(scope='module')
def tiny_backbone(tmp_path_factory):
    """``(training form, path)``: a random tiny RepVGG's deploy form
    exported to ONNX."""
    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.export.quantize import export_module
    from mmrepvgg.models import RepVGG
    training = RepVGG(arch=TINY)
    randomize_(training, seed=0)
    training.eval()
    deploy = switch_to_deploy(training, verbose=False)
    path = tmp_path_factory.mktemp('ov') / 'backbone.onnx'
    export_module(deploy, torch.zeros(1, 3, 32, 32), str(path))
    return training, path


def test_fp32_is_float32_noise_from_the_truth_like_onnxruntime(
        tiny_backbone, openvino_usable):
    training, path = tiny_backbone
    x = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    nhwc = copy.deepcopy(training).to(memory_format=torch.channels_last)
    with torch.no_grad():  # the noise of both oneDNN layouts
        truth = flatten_outputs(float64_outputs(training, x))
        ref = noisier(truth, flatten_outputs(training(x)), flatten_outputs(
            nhwc(as_channels_last(x))))
    ov = runtime.make_session(str(path), 1, runtime='openvino')
    ort = runtime.make_session(str(path), 1)
    assert [i.name for i in ov.get_inputs()] == runtime.input_names(ort)
    assert [(o.name, o.type, o.shape) for o in ov.get_outputs()] == [
        (o.name, o.type, o.shape) for o in ort.get_outputs()]
    feed = {'input': x.numpy()}
    for sess in (ov, ort):
        cand = {f'output.{i}': torch.from_numpy(o)
                for i, o in enumerate(runtime.run(sess, feed))}
        verdict = judge_fp32(truth, ref, cand)
        assert verdict['passed'], verdict
        assert verdict['ratio'] <= 4
    # and the two runtimes agree to float32 rounding
    for a, b in zip(runtime.run(ov, feed), runtime.run(ort, feed)):
        assert a.dtype == b.dtype == np.float32
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_precision_hint_is_the_one_asked_for(tiny_backbone,
                                             openvino_usable):
    _, path = tiny_backbone
    sess = runtime.make_session(str(path), 1, runtime='openvino')
    hint = sess.compiled.get_property('INFERENCE_PRECISION_HINT')
    assert hint.get_type_name() == sess.precision == 'f32'
    assert sess.threads == 1
    if not openvino.native_bf16():
        pytest.skip('no native bfloat16: the CPU plugin defaults to f32')
    # why the hint is always set: without it this CPU runs in bfloat16
    default = openvino.core().compile_model(str(path), 'CPU')
    assert default.get_property(
        'INFERENCE_PRECISION_HINT').get_type_name() == 'bf16'
    bf16 = runtime.make_session(str(path), 1, runtime='openvino',
                                precision='bf16')
    assert bf16.compiled.get_property(
        'INFERENCE_PRECISION_HINT').get_type_name() == 'bf16'
    x = {'input': np.random.default_rng(0).standard_normal(
        (1, 3, 32, 32)).astype(np.float32)}
    a, b = runtime.run(bf16, x)[0], runtime.run(sess, x)[0]
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert 1e-5 < rel < 0.1  # bfloat16, visibly not float32


def test_end_to_end_detections_equal_onnxruntime(toy_e2e, openvino_usable):
    cfg, _, path = toy_e2e
    ov = runtime.make_session(str(path), 1, runtime='openvino')
    ort = runtime.make_session(str(path), 1)
    assert ov.get_modelmeta().custom_metadata_map == \
        ort.get_modelmeta().custom_metadata_map
    g = torch.Generator().manual_seed(3)
    feed = dict(input=torch.randn(3, 3, 128, 128, generator=g).numpy(),
                img_shape=np.array([[128, 128], [100, 120], [128, 90]]))
    (d1, l1), (d2, l2) = (runtime.run(s, feed, ['dets', 'labels'])
                          for s in (ov, ort))
    assert l1.dtype == l2.dtype == np.int64 and d1.dtype == np.float32
    assert ((l1 >= 0).sum(1) == (l2 >= 0).sum(1)).all()  # per image
    assert (l2 >= 0).sum() >= 10
    assert np.array_equal(l1, l2)
    assert np.abs(d1[..., :4] - d2[..., :4]).max() < 1e-2  # pixels
    assert np.abs(d1[..., 4] - d2[..., 4]).max() < 1e-5


def test_evaluation_detector_on_openvino(toy_e2e, openvino_usable):
    cfg, _, path = toy_e2e
    det = {r: OnnxRuntimeDetector(str(path), cfg.model.data_preprocessor,
                                  runtime=r)
           for r in ('onnxruntime', 'openvino')}
    assert det['openvino'].session.runtime == 'openvino'
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(4))
    shapes = [(96, 128), (80, 100)]
    res = {}
    for r, d in det.items():
        samples = make_samples(shapes, (96, 128))
        for s in samples:
            s.set_metainfo(dict(scale_factor=(1.25, 1.25)))
        res[r] = instances_to_numpy(d.predict(x, samples))
    cmp = compare_detections(res['openvino'], res['onnxruntime'], 0.02, 1e-4)
    assert cmp['differing'] == [] and cmp['matched'] >= 5


def test_export_verifies_on_openvino(detectors, tmp_path, openvino_usable):
    from _export_helpers import config_path

    from mmrepvgg.export.onnx_export import export_onnx
    cfg, model = detectors('toy')
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'toy.pth')
    report = export_onnx(cfg, config_path('toy'), str(tmp_path / 'toy.pth'),
                         str(tmp_path / 'bb.onnx'), mode='backbone',
                         shape=(64, 64), runtime='openvino', bench=2,
                         threads=1)
    assert report.runtime == 'openvino' and report.verdict['passed']
    assert set(report.bench['timing'].times) == {'pytorch', 'openvino'}
    assert (tmp_path / 'bb.onnx').is_file()


def test_failed_probe_is_one_line_everywhere(tiny_backbone, failing_probe):
    _, path = tiny_backbone
    with pytest.raises(openvino.OpenVinoUnavailable) as e:
        runtime.make_session(str(path), runtime='openvino')
    text = str(e.value)
    assert text == ('OpenVINO is not usable here: simulated: compile_model '
                    'died with SIGFPE') and '\n' not in text
    assert isinstance(e.value, runtime.OnnxRuntimeError)  # a ToolError


def test_probe_reports_a_crashing_child(monkeypatch):
    """The real probe, its child killed by SIGFPE as compile_model does on
    the affected CPUs: the parent survives and names the signal."""
    pytest.importorskip('openvino')
    monkeypatch.setattr(openvino, 'PROBE_CODE',
                        'import os, signal; '
                        'os.kill(os.getpid(), signal.SIGFPE)')
    reason = openvino._probe()
    assert signal.Signals.SIGFPE.name in reason and '\n' not in reason
    monkeypatch.setattr(openvino, 'PROBE_CODE', 'raise SystemExit("no CPU")')
    assert openvino._probe().endswith('failed: no CPU')


def test_probe_without_openvino(monkeypatch):
    monkeypatch.setattr(openvino.importlib.util, 'find_spec',
                        lambda name: None)
    assert openvino._probe().startswith('openvino is not installed')


def test_unknown_runtime_and_precision_are_one_line(tiny_backbone):
    _, path = tiny_backbone
    with pytest.raises(runtime.ToolError, match="--runtime 'tvm': choose"):
        runtime.make_session(str(path), runtime='tvm')
    with pytest.raises(runtime.OnnxRuntimeError, match='not bf16'):
        runtime.make_session(str(path), precision='bf16')
