"""Runtime sessions and runs: onnxruntime, or OpenVINO (:mod:`.openvino`).

The one place where the runtime of an ONNX file is chosen
(:func:`make_session`'s ``runtime``); both sessions offer the same calls
(``get_inputs``, ``get_outputs``, ``get_modelmeta``, ``run``). Reusable by
every exported form (FP32, INT8, end-to-end detectors): nothing here knows
about mmdet.
"""
import os
import stat
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np

from mmrepvgg.utils.cli import ToolError

#: The runtimes an ONNX file can be run with (the tools' ``--runtime``).
RUNTIMES = ('onnxruntime', 'openvino')
#: The provider every session gets unless told otherwise.
DEFAULT_PROVIDERS = ('CPUExecutionProvider', )
#: Largest ``.onnx`` file opened (a protobuf holds at most 2 GiB; larger
#: weights live in external data files).
MAX_ONNX_BYTES = 2**31


class OnnxRuntimeError(ToolError):
    """A runtime cannot load or run a graph; names the file."""


def check_model_file(path: Union[str, 'os.PathLike']) -> None:
    """Refuse, without opening it, anything but a regular file of at most
    :data:`MAX_ONNX_BYTES`: a folder, a FIFO (reading it would block), a
    device.

    Raises:
        OnnxRuntimeError: one line naming ``path``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OnnxRuntimeError(f'ONNX file {path} does not exist') from None
    except OSError as e:
        raise OnnxRuntimeError(f'ONNX file {path}: cannot read it '
                               f'({e.strerror})') from None
    if stat.S_ISDIR(st.st_mode):
        raise OnnxRuntimeError(f'ONNX file {path} is a folder; expected an '
                               '.onnx file')
    if not stat.S_ISREG(st.st_mode):
        raise OnnxRuntimeError(f'ONNX file {path} is not a regular file (a '
                               'FIFO, socket or device); expected an .onnx '
                               'file')
    if st.st_size > MAX_ONNX_BYTES:
        raise OnnxRuntimeError(f'ONNX file {path}: {st.st_size} bytes, more '
                               'than an ONNX protobuf holds '
                               f'({MAX_ONNX_BYTES})')


def make_session(model: Union[str, bytes, 'os.PathLike'],
                 threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None,
                 spinning: bool = False,
                 runtime: str = 'onnxruntime',
                 precision: str = 'f32'):
    """An ``onnxruntime.InferenceSession``, or with ``runtime='openvino'``
    an :class:`~.openvino.OpenVinoSession` offering the same calls.

    Args:
        model (str | bytes): an ``.onnx`` path or a serialized model.
        threads (int, optional): intra-op threads (default: onnxruntime's,
            one per physical core).
        providers (Sequence[str], optional): execution providers. Defaults
            to :data:`DEFAULT_PROVIDERS`.
        spinning (bool): let idle pool threads busy-wait after a run. Off by
            default: interleaved with PyTorch (verification, timing), the
            spinning threads steal the cores PyTorch runs on and slow it down
            many times.
        runtime (str): one of :data:`RUNTIMES`.
        precision (str): OpenVINO's ``INFERENCE_PRECISION_HINT`` (``f32`` or
            ``bf16``), always set; onnxruntime runs float32 (``f32`` only).

    Raises:
        OnnxRuntimeError: the graph cannot be loaded (message names it);
            a path that is not a regular file (:func:`check_model_file`).
        ToolError: OpenVINO is not usable on this machine
            (:class:`~.openvino.OpenVinoUnavailable`, one line).
    """
    check_runtime(runtime)
    if not isinstance(model, bytes):
        check_model_file(model)
    if runtime == 'openvino':
        from .openvino import OpenVinoSession
        return OpenVinoSession(model, threads, precision)
    if precision != 'f32':
        raise OnnxRuntimeError(f'onnxruntime runs float32 graphs here, not '
                               f'{precision}')
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry('session.intra_op.allow_spinning',
                                  '1' if spinning else '0')
    what = model if isinstance(model, (str, os.PathLike)) else 'the graph'
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            sess_options=opts,
            providers=list(providers or DEFAULT_PROVIDERS))
    except Exception as e:  # onnxruntime raises its own exception types
        raise OnnxRuntimeError(f'{what}: onnxruntime cannot load it: '
                               f'{_first_line(e)}') from None


def check_runtime(runtime: str, option: str = '--runtime') -> str:
    """Refuse a runtime not in :data:`RUNTIMES` (one line naming
    ``option``)."""
    if runtime not in RUNTIMES:
        raise ToolError(f'{option} {runtime!r}: choose from '
                        f'{", ".join(RUNTIMES)}')
    return runtime


def runtime_name(session) -> str:
    """``onnxruntime`` or ``openvino``: what runs ``session``."""
    return getattr(session, 'runtime', 'onnxruntime')


def set_threads(threads: Optional[int]) -> None:
    """A tool's ``--threads``: PyTorch's intra-op threads (None: keep)."""
    if threads is not None and threads < 1:
        raise ToolError(f'--threads must be >= 1, got {threads}')
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


def input_names(session) -> List[str]:
    return [i.name for i in session.get_inputs()]


def output_names(session) -> List[str]:
    return [o.name for o in session.get_outputs()]


def run(session, feeds: Mapping[str, np.ndarray],
        outputs: Optional[Sequence[str]] = None) -> List[np.ndarray]:
    """``session.run`` with inputs cast to the graph's declared types
    (float32 / int64); a failure is one line naming the inputs' shapes."""
    types = {i.name: i.type for i in session.get_inputs()}
    cast = {}
    for name, value in feeds.items():
        value = np.asarray(value)
        if types.get(name) == 'tensor(float)':
            value = np.ascontiguousarray(value, dtype=np.float32)
        elif types.get(name) == 'tensor(int64)':
            value = np.ascontiguousarray(value, dtype=np.int64)
        cast[name] = value
    try:
        return session.run(list(outputs) if outputs else None, cast)
    except Exception as e:
        shapes = ', '.join(f'{k} {tuple(v.shape)}' for k, v in cast.items())
        raise OnnxRuntimeError(f'{runtime_name(session)} run failed on '
                               f'{shapes}: {_first_line(e)}') from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
