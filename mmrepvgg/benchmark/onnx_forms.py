"""ONNX forms of a backbone for the benchmark: the deploy backbone exported
to ONNX and that graph statically quantized to INT8
(:func:`mmrepvgg.export.quantize.quantize_onnx` with its default
:class:`~mmrepvgg.export.quantize.QuantConfig`), each run by onnxruntime
(``ort-fp32``, ``ort-int8``) or OpenVINO (``ov-fp32``, ``ov-int8``: the same
two files, float32 hint; ``ov-bf16``: the FP32 file with the bfloat16 hint),
through :func:`mmrepvgg.export.runtime.make_session`.

The benchmark's backbones have random weights, so the INT8 graph is
calibrated on random normal inputs of the benchmarked sizes (the same
distribution as the timed input); INT8 kernels cost the same whatever the
values, and the reported SQNR is that of this synthetic setting, not of a
trained detector on real images (``tools/deployment/quantize.py``
measures that).
"""
import os.path as osp
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .options import BenchmarkError

#: Random calibration inputs per benchmarked size.
CALIB_PER_SIZE = 4
#: form -> (graph file, runtime, precision hint)
FORM_SPECS = {'ort-fp32': ('fp32', 'onnxruntime', 'f32'),
              'ort-int8': ('int8', 'onnxruntime', 'f32'),
              'ov-fp32': ('fp32', 'openvino', 'f32'),
              'ov-int8': ('int8', 'openvino', 'f32'),
              'ov-bf16': ('fp32', 'openvino', 'bf16')}


class OnnxForms:
    """The onnxruntime and OpenVINO sessions of one backbone
    (:data:`FORM_SPECS`).

    Args:
        backbone (nn.Module): the deploy-form backbone (float32).
        sizes (Sequence[tuple]): benchmarked ``(H, W)``; the INT8 graph is
            calibrated on :data:`CALIB_PER_SIZE` random inputs of each.
        forms (Sequence[str]): forms of :data:`FORM_SPECS`.
        threads (int): runtime intra-op threads (the PyTorch thread
            count, so every runtime gets the same cores).
        spinning (bool): onnxruntime pool threads busy-wait between runs.
    """

    def __init__(self,
                 backbone: nn.Module,
                 sizes: Sequence[Tuple[int, int]],
                 forms: Sequence[str],
                 threads: int,
                 spinning: bool = False) -> None:
        from mmrepvgg.export import quantize as qz
        from mmrepvgg.export.runtime import make_session
        self._tmp = tempfile.TemporaryDirectory(prefix='mmrepvgg-bench-')
        self.dir = self._tmp.name
        self.paths = dict(fp32=osp.join(self.dir, 'backbone_fp32.onnx'),
                          int8=osp.join(self.dir, 'backbone_int8.onnx'))
        model = backbone.float().cpu().eval()
        h, w = sizes[0]
        qz.export_module(model, torch.zeros(1, 3, h, w), self.paths['fp32'])
        self.sessions = {}
        self.info: Dict[str, dict] = {}
        if any(FORM_SPECS[f][0] == 'int8' for f in forms):
            g = torch.Generator().manual_seed(1)
            calib = [torch.randn(1, 3, hh, ww, generator=g).numpy()
                     for hh, ww in sizes for _ in range(CALIB_PER_SIZE)]
            try:
                info = qz.quantize_onnx(self.paths['fp32'],
                                        self.paths['int8'], calib)
            except Exception as e:
                raise BenchmarkError(f'ort-int8: quantization failed: '
                                     f'{str(e).splitlines()[0]}') from None
            info['optimized_ops'] = qz.optimized_op_types(
                self.paths['int8'], threads)
            self.info['int8'] = info
        for form in forms:
            graph, engine, precision = FORM_SPECS[form]
            self.sessions[form] = make_session(
                self.paths[graph], threads, spinning=spinning,
                runtime=engine, precision=precision)
        self.precision = {f: form_precision(f, self.sessions[f])
                          for f in forms}
        self.input_name = next(iter(self.sessions.values())).get_inputs(
        )[0].name if self.sessions else 'input'

    def callable(self, form: str, x: np.ndarray) -> Callable[[], object]:
        """Zero-argument call of ``form`` on ``x`` (float32 NCHW)."""
        sess, feed = self.sessions[form], {self.input_name: x}
        return lambda: sess.run(None, feed)

    def outputs(self, form: str, x: np.ndarray) -> Dict[str, torch.Tensor]:
        """Outputs of ``form`` on ``x`` named like
        :func:`mmrepvgg.deploy.verify.flatten_outputs` (``output.0`` ...)."""
        outs = self.sessions[form].run(None, {self.input_name: x})
        return {f'output.{i}': torch.from_numpy(o) for i, o in
                enumerate(outs)}

    def close(self) -> None:
        self.sessions.clear()
        self._tmp.cleanup()


def form_precision(form: str, session) -> str:
    """What ``form`` computes in: onnxruntime runs the FP32 graph in float32
    and the QDQ graph's quantized ops in INT8; OpenVINO as its compiled
    model's ``INFERENCE_PRECISION_HINT`` says (read back)."""
    graph = FORM_SPECS[form][0]
    hint = getattr(session, 'precision', None)
    if hint is None:
        return 'float32' if graph == 'fp32' else 'INT8 (QDQ), rest float32'
    rest = f'INFERENCE_PRECISION_HINT {hint}'
    return rest if graph == 'fp32' else f'INT8 (QDQ), {rest}'


def ort_threads() -> int:
    """Runtime threads of the benchmark: PyTorch's thread count."""
    return max(1, torch.get_num_threads())


def describe_ops(info: dict) -> List[str]:
    """Lines about the INT8 graph: its config and the ops onnxruntime runs."""
    out = []
    if 'config' in info:
        out.append(f'INT8 graph: {info["config"]}, calibrated on '
                   f'{info["calibration"]} random inputs')
    if 'optimized_ops' in info:
        ops = ', '.join(f'{k} {v}' for k, v in
                        info['optimized_ops'].most_common())
        out.append(f'INT8 graph as onnxruntime runs it: {ops}')
    return out
