"""Parsing and validation of the benchmark's options.

Every refusal raises :class:`BenchmarkError`, whose message names the option
at fault; the tool prints it as its single ``error:`` line.
"""
import json
from typing import Sequence, Tuple, Union

import torch

from mmrepvgg.utils.cli import ToolError

#: Every form the benchmark can time, in table order.
#:
#: ``training``: the multi-branch form (eval mode); ``deploy``: after
#: :func:`mmrepvgg.deploy.switch_to_deploy`; ``reference``: the hand-built
#: plain ``Conv2d`` + activation stack holding the deploy weights;
#: ``deploy-bf16``: the deploy form cast to bfloat16 (input too);
#: ``deploy-fp16``: the same in float16 (CUDA only); ``ort-fp32``: the deploy
#: backbone exported to ONNX and run by onnxruntime (CPU); ``ort-int8``: that
#: graph statically quantized to INT8 (:mod:`mmrepvgg.export.quantize`).
ALL_FORMS = ('training', 'deploy', 'reference', 'deploy-bf16', 'deploy-fp16',
             'ort-fp32', 'ort-int8')
#: Forms run by PyTorch (the others by onnxruntime).
TORCH_FORMS = ('training', 'deploy', 'reference', 'deploy-bf16',
               'deploy-fp16')
ORT_FORMS = ('ort-fp32', 'ort-int8')
#: Forms of a default run.
DEFAULT_FORMS = ('training', 'deploy', 'reference')


class BenchmarkError(ToolError):
    """Bad option or failed check; the message names the argument."""


def parse_arch(spec: str, index: int = 0) -> Tuple[str, Union[str, dict]]:
    """``(label, arch)`` of one ``--archs`` item.

    Args:
        spec (str): a published arch name (A0 ...) or a JSON arch dict,
            optionally with a ``"name"`` key for the label.
        index (int): position of the item, for the default label
            ``custom<index>``.

    Returns:
        tuple: ``(label, arch)`` where ``arch`` is what
        :class:`mmrepvgg.models.RepVGG` accepts.
    """
    from mmrepvgg.models.backbones.repvgg import ARCH_SETTINGS, resolve_arch
    spec = spec.strip()
    if spec.startswith('{'):
        try:
            arch = json.loads(spec)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f'--archs: invalid JSON arch {spec!r} ({e})')
        if not isinstance(arch, dict):
            raise BenchmarkError(f'--archs: {spec!r} is not a JSON object')
        label = str(arch.pop('name', f'custom{index}'))
        for key in ('num_blocks', 'width_factor'):
            if isinstance(arch.get(key), list):
                arch[key] = tuple(arch[key])
        if isinstance(arch.get('group_layer_map'), dict):
            arch['group_layer_map'] = {
                int(k): v for k, v in arch['group_layer_map'].items()}
    else:
        if spec not in ARCH_SETTINGS:
            raise BenchmarkError(
                f'--archs: unknown arch {spec!r}; choose from '
                f'{", ".join(ARCH_SETTINGS)} or pass a JSON arch dict')
        label, arch = spec, spec
    try:
        resolve_arch(arch)
    except ValueError as e:
        raise BenchmarkError(f'--archs: {label}: {e}')
    return label, arch


def parse_size(spec: str) -> Tuple[int, int]:
    """``'224'`` -> (224, 224); ``'480x640'`` -> (480, 640) (H x W)."""
    parts = str(spec).lower().split('x')
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise BenchmarkError(f'--sizes: {spec!r} is not a size (N or HxW, '
                             'positive integers)')
    return hw


def parse_forms(forms: Sequence[str]) -> Tuple[str, ...]:
    """Validate ``--forms``; returns them in table order (:data:`ALL_FORMS`),
    without duplicates."""
    unknown = [f for f in forms if f not in ALL_FORMS]
    if unknown:
        raise BenchmarkError(f'--forms: unknown form(s) {unknown}; choose '
                             f'from {", ".join(ALL_FORMS)}')
    if not forms:
        raise BenchmarkError('--forms: give at least one form')
    return tuple(f for f in ALL_FORMS if f in forms)


def cpu_has_bf16() -> bool:
    """Whether oneDNN reports native bfloat16 (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_device_options(device: str,
                         forms: Sequence[str] = DEFAULT_FORMS
                         ) -> torch.device:
    """Refuse device/form combinations this machine cannot run.

    Args:
        device (str): ``cpu``, ``cuda`` or ``cuda:N``.
        forms (Sequence[str]): the forms to time.

    Returns:
        torch.device: the device.
    """
    if device not in ('cpu', 'cuda') and not device.startswith('cuda:'):
        raise BenchmarkError(f'--device: {device!r} is not cpu or cuda[:N]')
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise BenchmarkError(f'--device {device}: CUDA is not available '
                             f'(torch {torch.__version__})')
    if 'deploy-fp16' in forms and dev.type != 'cuda':
        raise BenchmarkError('--half (form deploy-fp16) needs --device cuda: '
                             'float16 convolutions on CPU are emulated, not a '
                             'deployment setting (try --bf16 on a CPU with '
                             'native bfloat16)')
    if 'deploy-bf16' in forms:
        if dev.type == 'cuda' and not torch.cuda.is_bf16_supported():
            raise BenchmarkError(f'--bf16: {torch.cuda.get_device_name(dev)}'
                                 ' has no bfloat16 support')
        if dev.type == 'cpu' and not cpu_has_bf16():
            raise BenchmarkError('--bf16: this CPU has no native bfloat16 '
                                 '(oneDNN reports no avx512_bf16/amx '
                                 'support)')
    ort = [f for f in forms if f in ORT_FORMS]
    if ort:
        if dev.type != 'cpu':
            raise BenchmarkError(f'--forms {" ".join(ort)}: onnxruntime runs '
                                 'on the CPU here; use --device cpu')
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BenchmarkError(
                f'--forms {" ".join(ort)}: needs onnx and onnxruntime '
                f'({e}); pip install -e .[onnx]') from None
    return dev
