"""Helpers for checking re-parameterization: randomized statistics and errors.

Default batch-norm statistics (mean 0, var 1, weight 1, bias 0) hide wrong
bias handling, so every equivalence check first randomizes them.
"""
import torch
import torch.nn as nn

from .deploy.switch import deepcopy_model
from .deploy.verify import (FP32_EPS, NOISE_FACTOR, blockwise_fp64_error,
                            describe, flatten_outputs, judge_fp32,
                            relative_error)
from .models.layers.fusion import is_fusable_norm
from .models.layers.repvgg_block import is_reparam_block

__all__ = ['randomize_', 'relative_error', 'fusion_errors',
           'within_fp32_noise', 'float64_outputs']


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize in place every parameter and batch-norm running statistic.

    Conv weights get a fan-in-scaled normal draw (so activations keep a sane
    magnitude through deep stacks); norm weights, biases and running means
    get normal draws; running variances are drawn in [0.5, 2].
    """
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> torch.Tensor:
        return (torch.randn(t.shape, generator=g, dtype=torch.float64) *
                std).to(t)

    for m in model.modules():
        if is_fusable_norm(m):
            m.running_mean.copy_(normal(m.running_mean, 0.3))
            var = torch.rand(m.running_var.shape, generator=g,
                             dtype=torch.float64) * 1.5 + 0.5
            m.running_var.copy_(var.to(m.running_var))
            if m.weight is not None:
                m.weight.copy_(1 + normal(m.weight, 0.2))
                m.bias.copy_(normal(m.bias, 0.2))
        else:
            for name, p in m.named_parameters(recurse=False):
                if name == 'weight' and p.dim() > 1:
                    fan_in = p[0].numel()
                    p.copy_(normal(p, (2.0 / fan_in)**0.5))
                else:
                    p.copy_(1 + normal(p, 0.2) if name == 'alpha'
                            else normal(p, 0.2))
    return model


def _last_tensor(out) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[-1]
    return out


@torch.no_grad()
def float64_outputs(model: nn.Module, *inputs: torch.Tensor):
    """Outputs of a float64 deep copy of ``model`` on ``inputs`` (cast to
    float64): the truth a float32 evaluation is judged against."""
    twin = deepcopy_model(model).double()
    return twin(*(x.double() for x in inputs))


@torch.no_grad()
def fusion_errors(model: nn.Module, x: torch.Tensor) -> dict:
    """Measure how exactly ``model`` survives the deploy switch.

    ``model`` (eval mode, float32) is switched in place. Returns relative
    errors (``max|a-b| / max|a|``) of the last output against the truth,
    the training form evaluated in float64:

    * ``block_fp64``: worst block, each block fed its real input from the
      network and evaluated in float64 before and after fusing: the
      exactness of the fusion maths (float64 rounding, docs/exactness.md);
    * ``model_fp32``: the deploy form in float32 vs the truth;
    * ``floor_fp32``: the training form in float32 vs the truth: the
      network's own float32 rounding noise on this CPU and thread count;
    * ``ratio``: ``model_fp32 / max(floor_fp32, FP32_EPS)``, the
      machine-independent number (see :mod:`mmrepvgg.deploy.verify`).
    """
    outs = {}
    block_fp64, _ = blockwise_fp64_error(
        model, lambda: outs.__setitem__('ref', _last_tensor(model(x))))
    ref = outs['ref']
    blocks = [m for m in model.modules() if is_reparam_block(m)]
    truth = _last_tensor(float64_outputs(model, x))
    floor = relative_error(truth, ref)
    for b in blocks:
        b.switch_to_deploy()
    err = relative_error(truth, _last_tensor(model(x)))
    return dict(block_fp64=block_fp64, model_fp32=err, floor_fp32=floor,
                ratio=err / max(floor, FP32_EPS))


def backbone_fusion_errors(arch, size: int,
                           block: str = 'RepVGGBlock') -> dict:
    """:func:`fusion_errors` of ``RepVGG(arch)`` built from ``block``,
    weights and statistics randomized (seed 0), on a random
    ``1x3x<size>x<size>`` input (seed 0)."""
    from .models import RepVGG
    torch.manual_seed(0)
    model = randomize_(RepVGG(arch, block_cfg=dict(type=block)), seed=0)
    return fusion_errors(model.eval(), torch.randn(1, 3, size, size))


def within_fp32_noise(errs: dict) -> bool:
    """The suite's float32 criterion on a :func:`fusion_errors` result: the
    deploy form is no further from the float64 truth than ``NOISE_FACTOR``
    times the training form's own float32 error (at least one ulp)."""
    return errs['model_fp32'] <= NOISE_FACTOR * max(errs['floor_fp32'],
                                                    FP32_EPS)


@torch.no_grad()
def fp32_verdict(reference: nn.Module, candidate,
                 *inputs: torch.Tensor) -> dict:
    """Judge ``candidate`` (a module or callable, float32) against
    ``reference`` (float32 module) on ``inputs`` with the float32-noise
    criterion of :func:`mmrepvgg.deploy.verify.judge_fp32`: the truth is
    ``reference`` evaluated in float64."""
    truth = flatten_outputs(float64_outputs(reference, *inputs))
    ref = flatten_outputs(reference(*inputs))
    cand = flatten_outputs(candidate(*inputs))
    return judge_fp32(truth, ref, cand)


def assert_fp32_equivalent(reference: nn.Module, candidate,
                           *inputs: torch.Tensor) -> dict:
    """Assert :func:`fp32_verdict` passes; the message gives both errors."""
    verdict = fp32_verdict(reference, candidate, *inputs)
    assert verdict['passed'], describe(verdict)
    return verdict
