"""Parsing and validation of the benchmark's options.

Every refusal raises :class:`BenchmarkError`, whose message names the option
at fault; the tool prints it as its single ``error:`` line. Every size an
option declares is bounded (:data:`MAX_SIDE`, :data:`MAX_BATCH`,
:data:`MAX_BATCH_PIXELS`, :data:`MAX_BLOCKS`, :data:`MAX_WIDTH_FACTOR`,
:data:`MAX_PARAMS`) before anything is allocated, far above what a
benchmark of real models uses.
"""
import json
import math
from typing import Dict, Sequence, Tuple, Union

import torch

from mmrepvgg.apis.convert import MAX_SIDE
from mmrepvgg.utils.cli import ToolError

#: Largest batch size a user may ask to time (``--batch-sizes``: one random
#: input of a backbone). Not :data:`mmrepvgg.export.evaluate.MAX_BATCH`,
#: which bounds what an untrusted ONNX file may declare.
MAX_BATCH = 1024
#: Most pixels of one batch (batch x H x W): each bound alone still let
#: 1024 x 4096x4096 ask for a 200 GB input.
MAX_BATCH_PIXELS = 1 << 24
#: Most blocks of a JSON arch, all stages together (the published archs
#: have at most 47).
MAX_BLOCKS = 256
#: Largest width factor of a JSON arch (the published ones are at most 5).
MAX_WIDTH_FACTOR = 16
#: Most parameters of a JSON arch's training form (the published archs
#: have fewer than 200 million).
MAX_PARAMS = 10**9

#: Every form the benchmark can time, in table order.
#:
#: ``training``: the multi-branch form (eval mode); ``deploy``: after
#: :func:`mmrepvgg.deploy.switch_to_deploy`; ``reference``: the hand-built
#: plain ``Conv2d`` + activation stack holding the deploy weights;
#: ``compile``: the deploy form through ``torch.compile`` (Inductor,
#: freezing); ``deploy-bf16``: the deploy form cast to bfloat16 (input too);
#: ``deploy-fp16``: the same in float16 (CUDA only); ``ort-fp32``: the deploy
#: backbone exported to ONNX and run by onnxruntime (CPU); ``ort-int8``: that
#: graph statically quantized to INT8 (:mod:`mmrepvgg.export.quantize`);
#: ``ov-fp32`` / ``ov-int8``: the same two files run by OpenVINO with the
#: float32 precision hint; ``ov-bf16``: the FP32 file with the bfloat16
#: hint (only where OpenVINO reports native bfloat16).
ALL_FORMS = ('training', 'deploy', 'reference', 'compile', 'deploy-bf16',
             'deploy-fp16', 'ort-fp32', 'ort-int8', 'ov-fp32', 'ov-int8',
             'ov-bf16')
ORT_FORMS = ('ort-fp32', 'ort-int8')
OV_FORMS = ('ov-fp32', 'ov-int8', 'ov-bf16')
ONNX_FORMS = ORT_FORMS + OV_FORMS
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
    from mmrepvgg.models.backbones.repvgg import ARCH_SETTINGS
    spec = spec.strip()
    if not spec.startswith('{'):
        if spec not in ARCH_SETTINGS:
            raise BenchmarkError(
                f'--archs: unknown arch {spec!r}; choose from '
                f'{", ".join(ARCH_SETTINGS)} or pass a JSON arch dict')
        return spec, spec
    try:
        arch = json.loads(spec)
    except (ValueError, RecursionError) as e:
        raise BenchmarkError(f'--archs: invalid JSON arch {spec!r} ({e})')
    if not isinstance(arch, dict):
        raise BenchmarkError(f'--archs: {spec!r} is not a JSON object')
    label = str(arch.pop('name', f'custom{index}'))
    try:
        return label, _checked_arch(arch)
    except BenchmarkError as e:
        raise BenchmarkError(f'--archs: {label}: {e}') from None
    except Exception as e:  # what RepVGG refuses, on the meta device
        raise BenchmarkError(f'--archs: {label}: {type(e).__name__}: '
                             f'{str(e).strip().splitlines()[0]}') from None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and \
        math.isfinite(v)


def _checked_arch(arch: dict) -> dict:
    """``arch`` (a JSON arch dict) with tuples and int keys as ``RepVGG``
    takes them, its sizes bounded and the backbone built on the meta
    device (no memory) to refuse now what it would refuse later."""
    from mmrepvgg.models import RepVGG
    from mmrepvgg.models.backbones.repvgg import resolve_arch
    resolve_arch(arch)  # keys and lengths
    blocks, widths = arch.get('num_blocks'), arch.get('width_factor')
    if not isinstance(blocks, list) or not all(
            type(n) is int and n >= 1 for n in blocks) or \
            sum(blocks) > MAX_BLOCKS:
        raise BenchmarkError(f'num_blocks must be a list of integers >= 1, '
                             f'at most {MAX_BLOCKS} blocks in all; got '
                             f'{str(blocks)[:80]}')
    if not isinstance(widths, list) or not all(
            _number(w) and 0 < w <= MAX_WIDTH_FACTOR for w in widths):
        raise BenchmarkError(f'width_factor must be a list of numbers in '
                             f'(0, {MAX_WIDTH_FACTOR}]; got '
                             f'{str(widths)[:80]}')
    arch['num_blocks'], arch['width_factor'] = tuple(blocks), tuple(widths)
    if isinstance(arch.get('group_layer_map'), dict):
        arch['group_layer_map'] = {
            int(k): v for k, v in arch['group_layer_map'].items()}
    with torch.device('meta'):
        params = sum(p.numel() for p in RepVGG(arch=arch).parameters())
    if params > MAX_PARAMS:
        raise BenchmarkError(f'{params} parameters; at most {MAX_PARAMS}')
    return arch


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
    if max(hw) > MAX_SIDE:
        raise BenchmarkError(f'--sizes: {spec!r}: each side must be at most '
                             f'{MAX_SIDE}')
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
    onnx_forms = [f for f in forms if f in ONNX_FORMS]
    if onnx_forms:
        if dev.type != 'cpu':
            raise BenchmarkError(f'--forms {" ".join(onnx_forms)}: the ONNX '
                                 'runtimes run on the CPU here; use --device '
                                 'cpu')
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BenchmarkError(
                f'--forms {" ".join(onnx_forms)}: needs onnx and onnxruntime '
                f'({e}); pip install -e .[onnx]') from None
    ov = [f for f in forms if f in OV_FORMS]
    if ov:
        from mmrepvgg.export.openvino import OpenVinoUnavailable, require
        try:
            require()
        except OpenVinoUnavailable as e:
            raise BenchmarkError(f'--forms {" ".join(ov)}: {e}') from None
    return dev


def skipped_forms(forms: Sequence[str]) -> Dict[str, str]:
    """Forms this machine cannot run natively: form -> why (reported, not
    timed). ``ov-bf16`` needs OpenVINO's CPU plugin to report ``BF16`` in
    ``OPTIMIZATION_CAPABILITIES`` (emulated bfloat16 is not a deployment
    setting)."""
    skipped = {}
    if 'ov-bf16' in forms:
        from mmrepvgg.export.openvino import native_bf16
        if not native_bf16():
            skipped['ov-bf16'] = ('OpenVINO reports no native bfloat16 on '
                                  'this CPU (no BF16 in '
                                  'OPTIMIZATION_CAPABILITIES)')
    return skipped
