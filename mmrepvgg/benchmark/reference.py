"""The forms of one backbone, and the checks that they compute the same
function.

``reference`` is the *physical* reference: :func:`build_reference` copies the
deploy weights into hand-built ``nn.Sequential`` stages of plain ``nn.Conv2d``
and activation modules (plus the SE as plain modules for SE archs), i.e. what
a hand-written VGG-style network with the fused weights would run. The deploy
form should cost what the reference costs (same convolutions, only the module
wrappers differ).

Equivalence is judged by the network's own float32 rounding noise
(:func:`mmrepvgg.deploy.verify.judge_fp32`): the truth is the training form
in float64, the noise is the training form in float32 against it, and every
float32 candidate (deploy, reference, the onnxruntime FP32 graph) must be no
further from the truth than a small multiple of that noise. Lossy forms
(bfloat16, INT8) are not judged; their error against the same truth is
reported (:func:`lossy_error`).
"""
import copy
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmrepvgg.deploy import switch_to_deploy
from mmrepvgg.deploy.verify import describe, judge_fp32
from mmrepvgg.export.verify import TruthAndReference
from mmrepvgg.testing import randomize_, relative_error
from .options import BenchmarkError

Outputs = Mapping[str, torch.Tensor]


class PlainSE(nn.Module):
    """Squeeze-excitation from plain modules: ``x * gate(pool(x))``.

    Args:
        pool (nn.Module): global pooling.
        squeeze (nn.Module): the reducing 1x1 conv.
        squeeze_act (nn.Module): its activation.
        excite (nn.Module): the expanding 1x1 conv.
        excite_act (nn.Module): the gate activation.
    """

    def __init__(self, pool: nn.Module, squeeze: nn.Module,
                 squeeze_act: nn.Module, excite: nn.Module,
                 excite_act: nn.Module) -> None:
        super().__init__()
        self.pool, self.squeeze, self.squeeze_act = pool, squeeze, squeeze_act
        self.excite, self.excite_act = excite, excite_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.squeeze_act(self.squeeze(self.pool(x)))
        return x * self.excite_act(self.excite(gate))


class PlainReference(nn.Module):
    """Stages of plain ``nn.Sequential(Conv2d, act, Conv2d, act, ...)``.

    The stem is the head of the first stage; ``forward`` returns the outputs
    of the stages in ``out_indices``, like :class:`RepVGG`.

    Args:
        stages (Sequence[nn.Sequential]): the stages.
        out_indices (Sequence[int]): stages whose outputs are returned.
    """

    def __init__(self, stages: Sequence[nn.Sequential],
                 out_indices: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_indices = tuple(out_indices)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                    stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None,
                    padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # Own storage (a clone), in the same memory format as the source.
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and \
            not conv.weight.is_contiguous():
        new.to(memory_format=torch.channels_last)
    return new


def plain_block(block: nn.Module) -> List[nn.Module]:
    """Plain modules computing a deploy-form ``RepVGGBlock``.

    Args:
        block (nn.Module): a block after ``switch_to_deploy``.

    Returns:
        list: ``[Conv2d, (PlainSE,) act]``.

    Raises:
        ValueError: the block is not in deploy form.
    """
    if not getattr(block, 'deploy', False) or not hasattr(
            block, 'conv_reparam'):
        raise ValueError(f'{type(block).__name__} is not in deploy form: '
                         'call switch_to_deploy first')
    mods: List[nn.Module] = [_plain_conv(block.conv_reparam)]
    se = block.se
    if not isinstance(se, nn.Identity):
        mods.append(PlainSE(copy.deepcopy(se.pool),
                            _plain_conv(se.squeeze),
                            copy.deepcopy(se.squeeze_act),
                            _plain_conv(se.excite),
                            copy.deepcopy(se.excite_act)))
    if not isinstance(block.act, nn.Identity):
        mods.append(copy.deepcopy(block.act))
    return mods


def build_reference(backbone: nn.Module) -> PlainReference:
    """Hand-built plain network holding exactly the weights of a deploy-form
    :class:`RepVGG` backbone (own copies; same device, dtype, layout).

    Args:
        backbone (nn.Module): a deploy-form ``RepVGG``.

    Returns:
        PlainReference: the plain network, eval mode.
    """
    stages = []
    for i, name in enumerate(backbone.stage_names):
        mods = plain_block(backbone.stem) if i == 0 else []
        for block in getattr(backbone, name):
            mods.extend(plain_block(block))
        stages.append(nn.Sequential(*mods))
    return PlainReference(stages, backbone.out_indices).eval()


def build_forms(arch: Union[str, dict],
                seed: int = 0) -> Dict[str, nn.Module]:
    """The three PyTorch float32 forms of one backbone.

    Args:
        arch (str | dict): the ``RepVGG`` arch.
        seed (int): seed of the random weights and batch-norm statistics.

    Returns:
        dict: ``training``, ``deploy`` and ``reference`` modules (float32,
        CPU, eval mode).
    """
    from mmrepvgg.models import RepVGG
    training = RepVGG(arch=arch)
    randomize_(training, seed=seed)
    training.eval()
    deploy = switch_to_deploy(training, inplace=False, verbose=False)
    reference = build_reference(deploy)
    return dict(training=training, deploy=deploy, reference=reference)


@torch.no_grad()
def float32_noise(training: nn.Module,
                  x: torch.Tensor) -> Tuple[Outputs, Outputs]:
    """``(truth, reference)``: the training form's outputs on ``x`` in
    float64 and in float32, by name (``output.0`` ...), on CPU.

    The float32 reference of each output is the training form's in the
    memory layout (contiguous or channels_last) that is further from the
    truth there: oneDNN's NHWC kernels, which ``torch.compile`` (Inductor)
    and OpenVINO use, round differently from its NCHW ones, and both are
    this network's float32 noise on this CPU (``docs/exactness.md``).

    Args:
        training (nn.Module): the float32 training form.
        x (torch.Tensor): a float32 input.
    """
    return tuple({k: v.cpu() for k, v in d.items()}
                 for d in TruthAndReference(training).named(x))


def judge_form(label: str, form: str, truth: Outputs, reference: Outputs,
               candidate: Outputs) -> dict:
    """Judge one float32 candidate form by the float32-noise criterion.

    Args:
        label (str): the row (arch and size), for the message.
        form (str): the candidate's name, for the message.
        truth (Mapping): float64 training-form outputs.
        reference (Mapping): float32 training-form outputs.
        candidate (Mapping): float32 outputs of the form, same names.

    Returns:
        dict: the verdict of :func:`~mmrepvgg.deploy.verify.judge_fp32`.

    Raises:
        BenchmarkError: the form fails; the message gives its error and the
            training form's own float32 error.
    """
    cand = {k: v.detach().cpu() for k, v in candidate.items()}
    try:
        verdict = judge_fp32(truth, reference, cand)
    except ValueError as e:
        raise BenchmarkError(f'{label}: {form}: {e}') from None
    if not verdict['passed']:
        raise BenchmarkError(
            f'{label}: the {form} form does not compute the training form\'s '
            f'function: ' + describe(verdict, candidate=form,
                                     reference='training') +
            '; the comparison would not be honest')
    return verdict


def lossy_error(truth: Outputs, candidate: Outputs) -> dict:
    """Error of a lossy form (bfloat16, INT8) against the float64 truth.

    Returns:
        dict: ``rel_err`` (largest ``max|a-b|/max|a|`` over outputs) and
        ``sqnr_db`` (smallest signal-to-quantization-noise ratio over
        outputs, dB; see :func:`mmrepvgg.export.quantize.sqnr_db`).
    """
    from mmrepvgg.export.quantize import sqnr_db
    rel, sqnr = 0.0, float('inf')
    for k, t in truth.items():
        c = candidate[k].detach().cpu()
        rel = max(rel, relative_error(t, c.to(t.dtype)))
        sqnr = min(sqnr, sqnr_db(t.numpy(), c.double().numpy()))
    return dict(rel_err=rel, sqnr_db=sqnr)
