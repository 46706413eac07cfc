"""Helpers for checking re-parameterization: randomized weights and
statistics (the defaults hide wrong bias handling), float64 truths, errors.
"""
import torch
import torch.nn as nn

from .deploy.switch import deepcopy_model
from .deploy.verify import (FP32_EPS, NOISE_FACTOR, blockwise_fp64_error,
                            describe, flatten_outputs, judge_fp32,
                            relative_error)
from .models.layers.fusion import is_fusable_norm
from .models.layers.repvgg_block import is_reparam_block


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize in place every parameter and batch-norm statistic (conv
    weights scaled by fan-in, so that deep stacks keep a sane magnitude;
    running variances in [0.5, 2])."""
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
    """The float64 truth: a float64 copy of ``model`` on ``inputs``."""
    twin = deepcopy_model(model).double()
    return twin(*(x.double() for x in inputs))


@torch.no_grad()
def fusion_errors(model: nn.Module, x: torch.Tensor) -> dict:
    """Switch ``model`` (eval, float32) in place; relative errors of its
    last output: ``block_fp64`` (worst block, float64), ``model_fp32`` (deploy
    form vs the float64 truth), ``floor_fp32`` (the training form's float32
    noise) and their ``ratio``."""
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
    """:func:`fusion_errors` of a randomized ``RepVGG(arch)`` of ``block``
    on a random ``1x3x<size>x<size>`` input (seed 0)."""
    from .models import RepVGG
    torch.manual_seed(0)
    model = randomize_(RepVGG(arch, block_cfg=dict(type=block)), seed=0)
    return fusion_errors(model.eval(), torch.randn(1, 3, size, size))


def within_fp32_noise(errs: dict) -> bool:
    """The float32 criterion on a :func:`fusion_errors` result."""
    return errs['model_fp32'] <= NOISE_FACTOR * max(errs['floor_fp32'],
                                                    FP32_EPS)


@torch.no_grad()
def fp32_verdict(reference: nn.Module, candidate,
                 *inputs: torch.Tensor) -> dict:
    """:func:`~mmrepvgg.deploy.verify.judge_fp32` of ``candidate`` (a
    float32 module or callable) against ``reference`` on ``inputs``."""
    truth = flatten_outputs(float64_outputs(reference, *inputs))
    ref = flatten_outputs(reference(*inputs))
    cand = flatten_outputs(candidate(*inputs))
    return judge_fp32(truth, ref, cand)


def assert_fp32_equivalent(reference: nn.Module, candidate,
                           *inputs: torch.Tensor) -> dict:
    """Assert :func:`fp32_verdict` passes; returns the verdict."""
    verdict = fp32_verdict(reference, candidate, *inputs)
    assert verdict['passed'], describe(verdict)
    return verdict
