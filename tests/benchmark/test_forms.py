"""mmrepvgg.benchmark: the forms of a backbone (the hand-built plain
reference holds the deploy weights and computes the same function) and the
float32-noise equivalence check."""
import pytest
import torch
import torch.nn as nn

from mmrepvgg.benchmark import run as bm
from mmrepvgg.benchmark.run import BenchmarkError
from mmrepvgg.deploy.switch import count_params
from mmrepvgg.testing import relative_error

TINY = dict(num_blocks=(1, 2, 1, 1), width_factor=(0.25, 0.25, 0.25, 0.25))


@pytest.mark.parametrize('arch', [
    TINY,
    dict(TINY, group_layer_map={2: 2, 4: 2}),
    dict(TINY, se_cfg=dict(ratio=4)),
])
def test_reference_equals_deploy(arch):
    forms = bm.build_forms(arch)
    ref = forms['reference']
    # only plain modules: Conv2d, activations, SE from plain modules
    kinds = {type(m) for m in ref.modules()} - {
        bm.PlainReference, nn.ModuleList, nn.Sequential}
    assert nn.Conv2d in kinds and nn.ReLU in kinds
    assert not any('RepVGG' in k.__name__ or 'BatchNorm' in k.__name__
                   for k in kinds)
    assert count_params(ref) == count_params(forms['deploy'])
    ref_ptrs = {p.data_ptr() for p in ref.parameters()}
    assert not ref_ptrs & {p.data_ptr() for p in forms['deploy'].parameters()}
    x = torch.randn(2, 3, 48, 40)
    with torch.inference_mode():
        outs_d, outs_r = forms['deploy'](x), ref(x)
    assert len(outs_d) == len(outs_r) == 4
    for d, r in zip(outs_d, outs_r):
        assert d.shape == r.shape
        assert relative_error(d, r) <= 1e-6
    acc = bm._check('tiny', forms['training'], _calls(forms), x)
    assert set(acc) == {'deploy', 'reference'}
    assert all(a['kind'] == 'fp32' and a['passed'] for a in acc.values())


def _calls(forms):
    return {f: (lambda x, m=forms[f]: lambda: m(x))
            for f in ('deploy', 'reference')}


def test_equivalence_failure_names_both_errors():
    forms = bm.build_forms(TINY)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # a wrong bias in one fused conv
        forms['deploy'].stage_2[0].conv_reparam.bias.add_(0.05)
    with pytest.raises(BenchmarkError) as e:
        bm._check('tiny 32x32', forms['training'], _calls(forms), x)
    msg = str(e.value)
    assert 'tiny 32x32' in msg and 'deploy model error vs float64 truth' in msg
    assert "training model's own float32 error" in msg


def test_reference_refuses_training_form():
    from mmrepvgg.models import RepVGG
    with pytest.raises(ValueError, match='not in deploy form'):
        bm.build_reference(RepVGG(arch=TINY))
