"""Judging a float32 result by the network's own float32 rounding noise.

A fused network cannot be compared with its training form against a fixed
float32 number: how far two float32 evaluations of the same function drift
apart depends on depth, on the CPU's instruction set (SSE4.1, AVX2, AVX-512
kernels sum in different orders) and on the thread count. What does not
depend on the machine is the *ratio* between two float32 errors measured in
the same run against the same float64 truth:

* ``truth``: the training form evaluated in float64 (exact far beyond
  float32);
* ``noise``: the training form in float32 vs ``truth``: how much float32
  rounding alone moves this network's output on this machine;
* ``error``: the candidate (deploy form, ONNX graph, ...) in float32 vs
  ``truth``.

A correct candidate is one more float32 evaluation of the same function, so
its error is of the order of the noise (measured ratios in
``docs/exactness.md``); a wrong kernel or bias moves the output by orders of
magnitude more. The check therefore is ``error <= factor * max(noise,
FP32_EPS)`` per output tensor, with :data:`NOISE_FACTOR` as the default
factor. ``FP32_EPS`` (one float32 ulp at 1.0) keeps a network whose float32
output happens to be exact from demanding an exact candidate.

Nothing here imports mmdet; every function takes plain tensors or dicts of
tensors.
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

#: Bound on a single block's fusion error in float64: far above the
#: rounding of the float64 maths (docs/exactness.md), far below the effect
#: of any wrong kernel or bias.
BLOCK_FP64_TOL = 1e-9

#: Default allowed ratio of a candidate's float32 error to the reference
#: form's own float32 error, both against the float64 truth.
NOISE_FACTOR = 4.0


class NonFiniteError(ToolError, ValueError):
    """A weight, statistic or output that is NaN or infinite (or a negative
    batch-norm variance); the message names the first offending key."""


def relative_error(reference, other) -> float:
    """``max|a - b| / max|a|`` in float64 (``max|a - b|`` when ``a`` is all
    zero) of two tensors or arrays (numpy, or anything ``torch.as_tensor``
    takes). Any NaN or infinity in either gives ``inf``: a comparison that
    could not be measured never reads as a match."""
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
    """Raise :class:`NonFiniteError` naming ``what`` and the first key whose
    tensor is not finite (or a negative ``running_var``)."""
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
               factor: float = NOISE_FACTOR,
               tolerance: Optional[float] = None) -> Dict[str, Any]:
    """Judge ``candidate`` (float32) against the float64 ``truth`` with the
    float32 ``reference`` as the measure of rounding noise.

    Per output ``k``: ``error = rel(truth, candidate)``, ``noise =
    rel(truth, reference)``; the output passes if ``error <= factor *
    max(noise, FP32_EPS)`` or, when ``tolerance`` is given, if ``error <=
    tolerance`` (a fixed bound that replaces the noise criterion).

    Args:
        truth: float64 outputs of the reference form, by name.
        reference: float32 outputs of the reference form (same names).
        candidate: float32 outputs of the form under test (same names).
        factor (float): allowed ratio error / noise. Defaults to
            :data:`NOISE_FACTOR`.
        tolerance (float, optional): fixed relative-error bound instead.

    Returns:
        dict: ``passed`` (bool), ``error`` and ``noise`` and ``ratio`` of the
        worst output (largest ``error / allowed``), its name ``worst``,
        ``max_error``, ``max_noise``, ``max_ratio`` over all outputs,
        ``num_outputs``, ``criterion`` (text) and ``outputs`` (per-name
        ``(error, noise)``).

    Raises:
        ValueError: names differ or shapes differ.
        NonFiniteError: ``truth`` or ``reference`` is not finite (the model
            itself is broken; nothing can be judged).
    """
    if not factor > 0:
        raise ValueError(f'factor must be > 0, got {factor!r}')
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f'tolerance must be >= 0, got {tolerance!r}')
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
        allowed = tolerance if tolerance is not None else factor * floor
        score = err / allowed if allowed > 0 else (
            0.0 if err == 0 else float('inf'))
        if score > worst_score:
            worst, worst_score = k, score
    err, noise = per[worst]
    if tolerance is not None:
        criterion = f'error <= tolerance {tolerance:g}'
    else:
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
        tolerance=tolerance, outputs=per)


@torch.no_grad()
def blockwise_fp64_error(model: nn.Module, run: Callable[[], Any]
                         ) -> Tuple[float, str]:
    """Worst fusion error of any block of ``model``, measured in float64.

    ``run()`` evaluates ``model`` once (any forward); every re-parameterizable
    block in training form records its real input, then a float64 copy of
    the block is evaluated before and after fusing on that input. Unlike a
    whole-network float32 comparison, this is independent of the CPU and of
    how chaotic the network is (randomly initialised SE networks amplify
    float32 noise to O(1)); see :data:`BLOCK_FP64_TOL`.

    Returns:
        tuple[float, str]: the worst relative error and the block's name
        (``(0.0, '')`` when ``model`` has no block in training form).
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
