"""Judging a float32 result by the network's own float32 noise, which
depends on depth, CPU and threads: against the float64 ``truth``, a
candidate's ``error`` must be within ``factor * max(noise, FP32_EPS)``,
``noise`` being the reference form's own float32 error measured in the same
run (docs/exactness.md). Plain tensors only; no mmdet.
"""
import copy
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from mmrepvgg.models.layers.repvgg_block import is_reparam_block
from mmrepvgg.utils.cli import ToolError, preview

#: One float32 ulp at 1.0 (2**-23): no float32 result is expected closer.
FP32_EPS = float(torch.finfo(torch.float32).eps)

#: Bound on one block's fusion error in float64: far above float64
#: rounding, far below the effect of any wrong kernel or bias.
BLOCK_FP64_TOL = 1e-9

#: Default allowed ratio of a candidate's float32 error to the noise.
NOISE_FACTOR = 4.0


class NonFiniteError(ToolError, ValueError):
    """A NaN or infinite tensor, or a negative batch-norm variance."""


def relative_error(reference, other) -> float:
    """``max|a - b| / max|a|`` (``max|a - b|`` when ``a`` is all zero) in
    float64 of two tensors or arrays; ``inf`` if either holds a NaN or an
    infinity, so that an unmeasurable comparison never reads as a match."""
    ref = torch.as_tensor(reference).detach().double()
    oth = torch.as_tensor(other).detach().double()
    if ref.shape != oth.shape:
        raise ValueError(f'shapes differ: {tuple(ref.shape)} vs '
                         f'{tuple(oth.shape)}')
    if ref.numel() == 0:
        return 0.0
    if not (bool(torch.isfinite(ref).all()) and
            bool(torch.isfinite(oth).all())):
        return float('inf')
    diff = (ref - oth).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def first_non_finite(tensors: Mapping[str, Any]) -> Optional[str]:
    """Name of the first floating or complex tensor of ``tensors`` holding a
    NaN or an infinity, or of a ``running_var`` with a negative entry."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                return key
            if key.endswith('running_var') and bool((t < 0).any()):
                return key
    return None


def check_finite(tensors: Mapping[str, Any], what: str) -> None:
    """:class:`NonFiniteError` naming ``what`` and the first key that
    :func:`first_non_finite` finds."""
    key = first_non_finite(tensors)
    if key is None:
        return
    t = tensors[key]
    if bool(torch.isfinite(t).all()):
        detail = 'a negative variance'
    else:
        n = int((~torch.isfinite(t)).sum())
        detail = f'{n} non-finite value(s) (NaN or Inf)'
    raise NonFiniteError(f'{what}: {key} holds {detail}')


def flatten_outputs(obj: Any, prefix: str = 'output'
                    ) -> 'OrderedDict[str, torch.Tensor]':
    """Tensors of a nested list/tuple/dict output, by dotted name."""
    out: 'OrderedDict[str, torch.Tensor]' = OrderedDict()

    def walk(name: str, o: Any) -> None:
        if isinstance(o, torch.Tensor):
            out[name] = o
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(f'{name}.{i}', v)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(f'{name}.{k}', v)

    walk(prefix, obj)
    return out


def judge_fp32(truth: Mapping[str, torch.Tensor],
               reference: Mapping[str, torch.Tensor],
               candidate: Mapping[str, torch.Tensor],
               factor: float = NOISE_FACTOR) -> Dict[str, Any]:
    """Judge the float32 ``candidate`` outputs against the float64
    ``truth``, the float32 ``reference`` outputs (all by name) measuring the
    noise (never a fixed float32 bound: it holds on one CPU only). Returns
    ``passed``, the worst output's ``error``, ``noise``, ``ratio`` and name
    (``worst``), ``max_*`` over all outputs, per-name ``outputs``, and the
    ``criterion``. ``NonFiniteError`` if the reference form is not finite.
    """
    if not factor > 0:
        raise ValueError(f'factor must be > 0, got {factor!r}')
    names = list(truth)
    for what, d in (('reference', reference), ('candidate', candidate)):
        if list(d) != names:
            raise ValueError(f'{what} outputs differ from the truth: '
                             f'{preview(d, 4)} vs {preview(names, 4)}')
    if not names:
        raise ValueError('nothing to compare: no output tensors')
    check_finite(truth, 'float64 output of the reference form')
    check_finite(reference, 'float32 output of the reference form')
    per: Dict[str, Tuple[float, float]] = OrderedDict()
    worst, worst_score = names[0], -1.0
    max_ratio = 0.0
    for k in names:
        err = relative_error(truth[k], candidate[k])
        noise = relative_error(truth[k], reference[k])
        per[k] = (err, noise)
        floor = max(noise, FP32_EPS)
        max_ratio = max(max_ratio, err / floor)
        score = err / (factor * floor)
        if score > worst_score:
            worst, worst_score = k, score
    err, noise = per[worst]
    criterion = (f'error <= {factor:g} x the reference form\'s own '
                 'float32 error (floor 1 ulp)')
    return dict(
        passed=bool(worst_score <= 1.0),
        error=err, noise=noise, ratio=err / max(noise, FP32_EPS),
        worst=worst,
        max_error=max(e for e, _ in per.values()),
        max_noise=max(n for _, n in per.values()),
        max_ratio=max_ratio,
        num_outputs=len(names), criterion=criterion, factor=factor,
        outputs=per)


@torch.no_grad()
def blockwise_fp64_error(model: nn.Module, run: Callable[[], Any]
                         ) -> Tuple[float, str]:
    """Worst fusion error of any training-form block of ``model`` and the
    block's name (``(0.0, '')`` if none): each block records its real input
    during ``run()`` (one forward of ``model``), then a float64 copy of it is
    compared before and after fusing on that input, independently of the
    CPU and of how much the network amplifies float32 noise.
    """
    blocks = {id(m): (name, m) for name, m in model.named_modules()
              if is_reparam_block(m) and not m.deploy}
    inputs: Dict[int, torch.Tensor] = {}

    def record(m, args):
        if id(m) not in inputs and args and isinstance(args[0],
                                                       torch.Tensor):
            inputs[id(m)] = args[0].detach().clone()

    hooks = [m.register_forward_pre_hook(record)
             for _, m in blocks.values()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    worst, worst_name = 0.0, ''
    for key, (name, block) in blocks.items():
        if key not in inputs:
            continue
        b64 = copy.deepcopy(block).double().eval()
        x = inputs[key].double()
        before = b64(x)
        b64.switch_to_deploy()
        err = relative_error(before, b64(x))
        if err >= worst:
            worst, worst_name = err, name
    return worst, worst_name


def describe(verdict: Mapping[str, Any], candidate: str = 'converted',
             reference: str = 'original') -> str:
    """One line: both numbers of the worst output and the criterion."""
    return (f'{candidate} model error vs float64 truth {verdict["error"]:.3g}'
            f' at {verdict["worst"]}; the {reference} model\'s own float32 '
            f'error there {verdict["noise"]:.3g} (ratio '
            f'{verdict["ratio"]:.2f}; criterion: {verdict["criterion"]})')
