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
