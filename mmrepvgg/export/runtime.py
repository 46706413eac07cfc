"""The one place where the runtime of an ONNX file is chosen: onnxruntime or
OpenVINO (:mod:`.openvino`) sessions offering the same calls, and runs.
"""
import os
import stat
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np

from mmrepvgg.utils.cli import ToolError

RUNTIMES = ('onnxruntime', 'openvino')
#: Largest ``.onnx`` file opened (a protobuf holds at most 2 GiB).
MAX_ONNX_BYTES = 2**31


class OnnxRuntimeError(ToolError):
    """A runtime cannot load or run a graph; names the file."""


def check_model_file(path: Union[str, 'os.PathLike']) -> None:
    """Refuse, without opening it, anything but a regular file of at most
    :data:`MAX_ONNX_BYTES` (a FIFO would block the read)."""
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
                 runtime: str = 'onnxruntime',
                 precision: str = 'f32'):
    """An ``onnxruntime.InferenceSession`` (CPU, idle threads not spinning:
    they would steal PyTorch's cores) of a path or serialized model, or an
    :class:`~.openvino.OpenVinoSession` with ``precision`` as its hint."""
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
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    what = model if isinstance(model, (str, os.PathLike)) else 'the graph'
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model),
            sess_options=opts,
            providers=['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own exception types
        raise OnnxRuntimeError(f'{what}: onnxruntime cannot load it: '
                               f'{_first_line(e)}') from None


def check_runtime(runtime: str, option: str = '--runtime') -> str:
    """Refuse a runtime not in :data:`RUNTIMES`."""
    if runtime not in RUNTIMES:
        raise ToolError(f'{option} {runtime!r}: choose from '
                        f'{", ".join(RUNTIMES)}')
    return runtime


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
    """``session.run`` with inputs cast to the declared float32 / int64; a
    failure is one line naming the inputs' shapes."""
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
        name = getattr(session, 'runtime', 'onnxruntime')
        raise OnnxRuntimeError(f'{name} run failed on {shapes}: '
                               f'{_first_line(e)}') from None


def _first_line(e: BaseException) -> str:
    """The informative line of a message (OpenVINO's first name C++ files).
    """
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    told = [ln for ln in lines if not ln.startswith('Exception from ')]
    return (told or lines or [type(e).__name__])[0]
