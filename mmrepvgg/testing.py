"""Helpers for checking re-parameterization: randomized statistics and errors.

Default batch-norm statistics (mean 0, var 1, weight 1, bias 0) hide wrong
bias handling, so every equivalence check first randomizes them.
"""
import torch
import torch.nn as nn

from .deploy.fusion import is_fusable_norm


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


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` (0 when both are all zero)."""
    ref = reference.detach().double()
    diff = (ref - other.detach().double()).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def _last_tensor(out) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[-1]
    return out


@torch.no_grad()
def fusion_errors(model: nn.Module, x: torch.Tensor) -> dict:
    """Measure how exactly ``model`` survives the deploy switch.

    ``model`` (eval mode, float32) is switched in place. Returns relative
    errors (``max|a-b| / max|a|``):

    * ``block_fp64``: worst block, each block fed its real input from the
      network and evaluated in float64 before and after fusing: the
      exactness of the fusion maths (about 1e-15);
    * ``model_fp32``: last output of the whole model, float32, deploy form
      vs training form;
    * ``floor_fp32``: the training form in float32 vs in float64: rounding
      noise that bounds any float32 comparison of this network.
    """
    import copy
    blocks = [m for m in model.modules()
              if callable(getattr(m, 'get_equivalent_kernel_bias', None))]
    inputs = {}
    hooks = [b.register_forward_pre_hook(
        lambda m, a: inputs.__setitem__(id(m), a[0].clone())) for b in blocks]
    try:
        ref = _last_tensor(model(x))
    finally:
        for h in hooks:
            h.remove()
    block_fp64 = 0.0
    for b in blocks:
        b64 = copy.deepcopy(b).double()
        inp = inputs[id(b)].double()
        before = b64(inp)
        b64.switch_to_deploy()
        block_fp64 = max(block_fp64, relative_error(before, b64(inp)))
    floor = relative_error(_last_tensor(model.double()(x.double())), ref)
    model.float()
    for b in blocks:
        b.switch_to_deploy()
    out = _last_tensor(model(x))
    return dict(block_fp64=block_fp64, model_fp32=relative_error(ref, out),
                floor_fp32=floor)
