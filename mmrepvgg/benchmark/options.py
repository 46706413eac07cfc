"""The benchmark's forms and the checks of its options.

Every refusal names the option at fault (:class:`BenchmarkError`, or an
argparse usage error for a malformed value), and every size an option
declares is bounded before anything is allocated, far above what a
benchmark of real models uses.
"""
import argparse
import math
from typing import Dict, Sequence, Tuple

import torch

from mmrepvgg.apis.convert import MAX_SIDE
from mmrepvgg.utils.cli import ToolError

#: Largest batch size (not :data:`mmrepvgg.export.evaluate.MAX_BATCH`, which
#: bounds what an untrusted ONNX file may declare).
MAX_BATCH = 1024
#: Most pixels of one batch (batch x H x W).
MAX_BATCH_PIXELS = 1 << 24

#: Every form, in table order (what each runs: ``docs/benchmark.md``).
ALL_FORMS = ('training', 'deploy', 'reference', 'compile', 'deploy-bf16',
             'ort-fp32', 'ort-int8', 'ov-fp32', 'ov-int8', 'ov-bf16')
DEFAULT_FORMS = ('training', 'deploy', 'reference')


class BenchmarkError(ToolError):
    """Bad option or failed check; the message names the argument."""


def size(spec: str) -> Tuple[int, int]:
    """argparse type of ``--sizes``: ``'224'`` -> (224, 224),
    ``'480x640'`` -> (480, 640) (H x W)."""
    try:
        hw = tuple(int(p) for p in spec.lower().split('x'))
    except ValueError:
        hw = ()
    hw = hw * 2 if len(hw) == 1 else hw
    if len(hw) != 2 or not 1 <= min(hw) <= max(hw) <= MAX_SIDE:
        raise argparse.ArgumentTypeError(
            f'{spec!r} is not a size N or HxW with sides in 1..{MAX_SIDE}')
    return hw


def int_in(low: int, high: float = math.inf):
    """argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            bound = f'>= {low}' if high == math.inf else f'in {low}..{high}'
            raise argparse.ArgumentTypeError(
                f'{text!r} is not an integer {bound}')
        return value

    return parse


def cpu_has_bf16() -> bool:
    """Whether oneDNN reports native bfloat16 (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_forms(forms: Sequence[str]) -> Dict[str, str]:
    """Refuse forms this machine cannot run; returns the forms it skips,
    form -> why (``ov-bf16`` without native bfloat16 in OpenVINO's
    ``OPTIMIZATION_CAPABILITIES``: emulated bfloat16 is no deployment)."""
    unknown = [f for f in forms if f not in ALL_FORMS]
    if unknown or not forms:
        raise BenchmarkError(f'--forms: unknown form(s) {unknown}; choose '
                             f'from {", ".join(ALL_FORMS)}')
    if 'deploy-bf16' in forms and not cpu_has_bf16():
        raise BenchmarkError('--bf16: this CPU has no native bfloat16 '
                             '(oneDNN reports no avx512_bf16/amx support)')
    onnx_forms = ' '.join(f for f in forms if f.startswith(('ort-', 'ov-')))
    if onnx_forms:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise BenchmarkError(
                f'--forms {onnx_forms}: needs onnx and onnxruntime ({e}); '
                'pip install -e .[onnx]') from None
    ov = ' '.join(f for f in forms if f.startswith('ov-'))
    if not ov:
        return {}
    from mmrepvgg.export import openvino
    try:
        openvino.require()
    except openvino.OpenVinoUnavailable as e:
        raise BenchmarkError(f'--forms {ov}: {e}') from None
    if 'ov-bf16' in forms and not openvino.native_bf16():
        return {'ov-bf16': 'OpenVINO reports no native bfloat16 on this CPU '
                '(no BF16 in OPTIMIZATION_CAPABILITIES)'}
    return {}
