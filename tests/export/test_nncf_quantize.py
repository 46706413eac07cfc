"""NNCF's quantizer behind ``quantize.py --backend nncf`` (issue 18): the
same conv region as onnxruntime's, a QDQ ONNX file that onnxruntime and
OpenVINO run, the FP32 graph's metadata kept; the accuracy control refuses
a result beyond the allowed drop. The whole tool (accuracy control scored by
the mmdet evaluation): tests/tools/test_quantize.py."""
import json

import onnx
import pytest
import torch

pytest.importorskip('onnxruntime')
pytest.importorskip('nncf')

from mmrepvgg.export import quantize as qz  # noqa: E402
from mmrepvgg.export import runtime  # noqa: E402
from mmrepvgg.export.quantize.nncf_ptq import quantize_nncf  # noqa: E402
from mmrepvgg.testing import randomize_  # noqa: E402

TINY = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25])


@pytest.fixture(scope='module')
def tiny_fp32(tmp_path_factory):
    from mmrepvgg.deploy import switch_to_deploy
    from mmrepvgg.models import RepVGG
    training = RepVGG(arch=TINY)
    randomize_(training, seed=0)
    deploy = switch_to_deploy(training.eval(), verbose=False)
    path = tmp_path_factory.mktemp('nncf') / 'fp32.onnx'
    qz.export_module(deploy, torch.zeros(1, 3, 32, 32), str(path))
    m = onnx.load(str(path))  # metadata the INT8 file must carry over
    m.metadata_props.add(key='mmrepvgg.test', value='kept')
    onnx.save(m, str(path))
    return path


def _calibration(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 32, 32, generator=g).numpy() for _ in range(n)]


def test_qdq_file_both_runtimes_run(tiny_fp32, tmp_path):
    out = tmp_path / 'int8.onnx'
    info = quantize_nncf(str(tiny_fp32), str(out), _calibration())
    model = onnx.load(str(out))
    ops = qz.optimized_op_types(str(out))
    hist = {n.op_type for n in model.graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= hist
    n_convs = 1 + sum(TINY['num_blocks'])
    assert info['quantized'] >= n_convs and info['calibration'] == 8
    assert 1 <= ops['QLinearConv'] <= n_convs  # onnxruntime fuses them
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['mmrepvgg.test'] == 'kept'
    assert 'NNCF' in json.loads(meta[qz.QUANT_METADATA_KEY])['config']
    # the INT8 graph is near the FP32 one (SQNR), on other inputs
    errors = qz.compare_sessions(str(tiny_fp32), str(out),
                                 _calibration(4, seed=1), threads=1)
    assert len(errors) == 4  # the four stages
    for e in errors.values():
        assert 15 < e['sqnr_db'] < 80, e
    from mmrepvgg.export import openvino
    if openvino.unusable_reason() is None:
        x = {'input': _calibration(1, seed=2)[0]}
        a = runtime.run(runtime.make_session(str(out), 1), x)
        b = runtime.run(runtime.make_session(str(out), 1,
                                             runtime='openvino'), x)
        for u, v in zip(a, b):
            assert qz.sqnr_db(u, v) > 20  # the same INT8 graph


class _Scores:
    """A stand-in validator: mAP 0.5 for the FP32 graph, 0.3 for any other
    (a drop no accuracy control can undo in one iteration)."""

    def __init__(self, fp32):
        self.fp32 = onnx.load(str(fp32))
        self.items = [0, 1]
        self.info = dict(split='val', images=2, of=2)
        self.calls = 0

    def __call__(self, model, indices):
        self.calls += 1
        same = model.graph.node == self.fp32.graph.node
        return (0.5 if same else 0.3), None

    def score(self, model):
        return self(model, self.items)[0]


def test_drop_beyond_max_drop_is_refused(tiny_fp32, tmp_path):
    out = tmp_path / 'int8.onnx'
    v = _Scores(tiny_fp32)
    with pytest.raises(qz.QuantizeError) as e:
        quantize_nncf(str(tiny_fp32), str(out), _calibration(4),
                      max_drop=0.01, validator=v, max_iterations=1)
    text = str(e.value)
    assert 'INT8 mAP 0.3000 is 0.2000 below FP32 0.5000' in text
    assert '--max-drop 0.01' in text and '\n' not in text
    assert v.calls >= 3  # initial, quantized, then the final measurement


def test_bad_arguments(tiny_fp32, tmp_path):
    out = str(tmp_path / 'int8.onnx')
    with pytest.raises(qz.QuantizeError, match='no calibration inputs'):
        quantize_nncf(str(tiny_fp32), out, [])
