"""mmrepvgg.export.quantize on tiny graphs: the quantized region, integer
convs, per-output and per-layer errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip('onnxruntime')

from mmrepvgg.export import quantize as qz  # noqa: E402
from mmrepvgg.export.graph import op_histogram  # noqa: E402

TINY = dict(num_blocks=(1, 2, 1, 1), width_factor=(0.25, 0.25, 0.25, 0.25))


def _tiny_backbone(seed=0):
    from mmrepvgg.benchmark import build_forms
    return build_forms(TINY, seed=seed)['deploy']


#: Settings whose integer kernels are exact on every x86 CPU: onnxruntime's
#: u8s8 kernels without VNNI (AVX2 only) multiply-add pairs into saturating
#: int16 (vpmaddubsw), so numbers that compare the INT8 graph's run with its
#: quantization parameters use u8u8 (docs/int8.md).
EXACT = 'uint8'


def _calib(n, hw=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, hw, hw, generator=g).numpy() for _ in range(n)]


@pytest.fixture(scope='module')
def tiny_graphs(tmp_path_factory):
    """FP32, default INT8 and :data:`EXACT` INT8 graphs of a tiny random
    deploy backbone."""
    d = tmp_path_factory.mktemp('tiny')
    fp32, int8 = str(d / 'fp32.onnx'), str(d / 'int8.onnx')
    qz.export_module(_tiny_backbone(), torch.zeros(1, 3, 32, 32), fp32)
    info = qz.quantize_onnx(fp32, int8, _calib(8))
    exact = str(d / 'int8_exact.onnx')
    qz.quantize_onnx(fp32, exact, _calib(8), EXACT)
    return dict(fp32=fp32, int8=int8, exact=exact, info=info)


def test_sqnr_db():
    x = np.array([3.0, -4.0])  # signal power 25
    assert qz.sqnr_db(x, x) == math.inf
    assert qz.sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)
    assert qz.sqnr_db(np.zeros(2), np.ones(2)) == -math.inf
    assert math.isnan(qz.sqnr_db(x, np.array([np.nan, 1.0])))
    with pytest.raises(ValueError, match='shapes differ'):
        qz.sqnr_db(x, np.ones(3))


class _ConvThenPost(nn.Module):
    """Conv -> ReLU -> Conv, then float post-processing: sigmoid, top-k."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        s = y.sigmoid().flatten(1)
        return s.topk(5, dim=1)[0]


def test_region_leaves_postprocessing_in_float(tmp_path):
    import onnx
    fp32, int8 = str(tmp_path / 'fp32.onnx'), str(tmp_path / 'int8.onnx')
    torch.onnx.export(_ConvThenPost().eval(), (torch.randn(1, 3, 16, 16), ),
                      fp32, dynamo=False, opset_version=17,
                      input_names=['input'], output_names=['top'])
    model = onnx.load(fp32)
    region, excluded = qz.quantizable_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sorted(ops[n] for n in region) == ['Conv', 'Conv', 'Relu']
    assert {'Sigmoid', 'TopK'} <= {ops[n] for n in excluded}
    (boundary, ) = qz.boundary_tensors(model, region)
    conv_b = [n for n in model.graph.node if n.op_type == 'Conv'][1]
    assert boundary == conv_b.output[0]  # the last conv's raw output
    info = qz.quantize_onnx(fp32, int8, _calib(4, hw=16), EXACT)
    q = onnx.load(int8)
    # float post-processing: no QDQ pair after the sigmoid
    sig = [n for n in q.graph.node if n.op_type == 'Sigmoid'][0]
    assert [n.op_type for n in q.graph.node if sig.output[0] in n.input] \
        != ['QuantizeLinear']
    assert info['excluded_ops']['TopK'] == 1
    errs = qz.compare_sessions(fp32, int8, _calib(3, hw=16, seed=5),
                               extra_tensors=info['boundary'])
    assert list(errs) == ['top', boundary]
    assert errs[boundary]['kind'] == 'boundary'
    assert errs[boundary]['sqnr_db'] > 20 and errs['top']['samples'] == 3


def test_backbone_runs_as_integer_convs(tiny_graphs):
    info = tiny_graphs['info']
    n_convs = 1 + sum(TINY['num_blocks'])
    assert op_histogram(tiny_graphs['int8'])['Conv'] == n_convs
    assert info['excluded'] == 0
    assert info['calibration'] == 8
    ops = qz.optimized_op_types(tiny_graphs['int8'])
    assert ops['QLinearConv'] == n_convs and 'Conv' not in ops
    assert qz.optimized_op_types(tiny_graphs['exact'])['QLinearConv'] == \
        n_convs
    errs = qz.compare_sessions(tiny_graphs['fp32'], tiny_graphs['exact'],
                               _calib(4, seed=9))
    assert list(errs) == ['feat0', 'feat1', 'feat2', 'feat3']
    for e in errs.values():
        assert 18 < e['sqnr_db'] < 60 and 0 < e['rel_err'] < 0.3


def test_layer_errors(tiny_graphs):
    rows = qz.layer_errors(tiny_graphs['fp32'], tiny_graphs['int8'],
                           _calib(3, seed=9))
    assert [r['layer'] for r in rows] == [
        'stem.conv_reparam', 'stage_1.0.conv_reparam',
        'stage_2.0.conv_reparam', 'stage_2.1.conv_reparam',
        'stage_3.0.conv_reparam', 'stage_4.0.conv_reparam']
    for r in rows:
        # 8-bit weights per channel give 25-50 dB
        assert 20 < r['weight_sqnr_db'] < 60
        assert r['w_peak_over_mean'] > 1
    assert rows[-1]['sqnr_db'] < rows[0]['sqnr_db']  # error accumulates
    table = qz.format_layer_table({'A': rows, 'B': rows[:-1]})
    lines = table.splitlines()
    assert lines[0].startswith('| layer | A SQNR dB | A weight dB |')
    assert len(lines) == 2 + len(rows) and lines[-1].endswith('n/a |')


def test_layer_errors_agree_with_onnxruntime_debug(tiny_graphs):
    """The accumulated SQNR equals onnxruntime's qdq_loss_debug
    ``xmodel_err`` (weights come from its ``create_weight_matching``)."""
    from onnxruntime.quantization import qdq_loss_debug as dbg
    inputs = _calib(2, seed=9)
    rows = qz.layer_errors(tiny_graphs['fp32'], tiny_graphs['exact'], inputs)
    acts = {}
    for key in ('fp32', 'exact'):
        aug = tiny_graphs[key] + '.aug.onnx'
        dbg.modify_model_output_intermediate_tensors(tiny_graphs[key], aug)
        acts[key] = dbg.collect_activations(aug, [dict(input=x)
                                                  for x in inputs])
    errors = dbg.compute_activation_error(
        dbg.create_activation_matching(acts['exact'], acts['fp32']))
    import onnx
    fp32 = onnx.load(tiny_graphs['fp32']).graph
    after = {n.input[0]: n.output[0] for n in fp32.node
             if n.op_type == 'Relu'}
    convs = {n.name: after.get(n.output[0], n.output[0]) for n in fp32.node
             if n.op_type == 'Conv'}
    for r in rows:
        assert r['sqnr_db'] == pytest.approx(
            errors[convs[r['node']]]['xmodel_err'], abs=0.01)


def test_weight_outlier_shows_in_its_layer(tiny_graphs, tmp_path):
    """Large diagonal centre taps in one conv (what fusing an identity
    branch with a large BN scale does) lower that layer's weight SQNR and
    raise its max|w|/mean|w|, and only there."""
    backbone = _tiny_backbone()
    conv = backbone.stage_2[1].conv_reparam
    with torch.no_grad():
        idx = torch.arange(conv.out_channels)
        conv.weight[idx, idx, 1, 1] = 20 * conv.weight.abs().max()
    fp32, int8 = str(tmp_path / 'fp32.onnx'), str(tmp_path / 'int8.onnx')
    qz.export_module(backbone, torch.zeros(1, 3, 32, 32), fp32)
    qz.quantize_onnx(fp32, int8, _calib(8))
    before = qz.layer_errors(tiny_graphs['fp32'], tiny_graphs['int8'],
                             _calib(2))
    after = qz.layer_errors(fp32, int8, _calib(2))
    for b, a in zip(before, after):
        if a['layer'] == 'stage_2.1.conv_reparam':
            assert a['w_peak_over_mean'] > 2 * b['w_peak_over_mean']
            assert a['weight_sqnr_db'] < b['weight_sqnr_db'] - 3
        else:
            assert a['weight_sqnr_db'] == pytest.approx(b['weight_sqnr_db'])


def test_bad_weight_type(tiny_graphs, tmp_path):
    with pytest.raises(qz.QuantizeError, match='--weight-type'):
        qz.quantize_onnx(tiny_graphs['fp32'], str(tmp_path / 'q.onnx'),
                         _calib(1), weight_type='int4')


def test_pick_indices():
    assert qz.pick_indices(5, None) == [0, 1, 2, 3, 4]
    assert qz.pick_indices(5, 9) == [0, 1, 2, 3, 4]
    assert qz.pick_indices(100, 3) == [0, 50, 99]
    with pytest.raises(qz.QuantizeError):
        qz.pick_indices(5, 0)
