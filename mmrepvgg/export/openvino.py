"""OpenVINO sessions: the second runtime of every ONNX file the project
writes (backbone, raw heads, end-to-end FP32 and INT8 detectors).

:func:`mmrepvgg.export.runtime.make_session` with ``runtime='openvino'``
returns an :class:`OpenVinoSession`, which offers what the callers use of an
``onnxruntime.InferenceSession``: ``get_inputs()`` / ``get_outputs()``
(``name``, ``type``, ``shape``, read from the ONNX file as onnxruntime reads
them), ``get_modelmeta().custom_metadata_map`` and ``run(outputs, feeds)``.

Two guarantees written by hand, because OpenVINO does not give them:

- **Explicit precision.** On a CPU with AVX-512 BF16 or AMX, OpenVINO's CPU
  plugin runs a float32 graph in bfloat16 unless told otherwise (relative
  error ~1e-2). Every compiled model gets ``INFERENCE_PRECISION_HINT`` set
  (``f32``, or ``bf16`` for the bfloat16 form), and the compiled model's
  property is read back: a hint not in effect is an error, not a silent
  change of precision. An INT8 (QDQ) graph runs its quantized convolutions
  in INT8 whatever the hint; the hint rules the rest.
- **No crash of the caller.** Some OpenVINO versions die with SIGFPE in
  ``compile_model`` on some AMD EPYC machines and in containers whose CPU
  set has gaps. Before the first use in a process, a child process
  (``sys.executable``) compiles and runs a tiny convolution; if it dies, or
  openvino cannot be imported, every use raises :class:`OpenVinoUnavailable`
  with one line (``OpenVINO is not usable here: <reason>``). The verdict is
  cached for the process.

Integer outputs come back with the ONNX file's declared type (OpenVINO may
return int32 where onnxruntime returns int64).
"""
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .runtime import OnnxRuntimeError

#: The precisions a session may be compiled with (OpenVINO's names).
PRECISIONS = ('f32', 'bf16')
#: Seconds the probe may take (importing openvino, compiling a tiny model).
PROBE_TIMEOUT = 300
#: ONNX element types -> (onnxruntime's type string, numpy dtype).
_ONNX_TYPES = {1: ('tensor(float)', np.float32),
               6: ('tensor(int32)', np.int32),
               7: ('tensor(int64)', np.int64), 9: ('tensor(bool)', np.bool_),
               10: ('tensor(float16)', np.float16),
               11: ('tensor(double)', np.float64)}
#: What the probe runs in a child process: a 3x3 convolution + ReLU on
#: ones, compiled for the CPU with an explicit float32 hint (12 at the
#: corners, 27 inside).
PROBE_CODE = '''
import numpy as np
import openvino as ov
import openvino.opset13 as ops
x = ops.parameter([1, 3, 8, 8], np.float32, name="x")
w = ops.constant(np.ones((4, 3, 3, 3), np.float32))
y = ops.relu(ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1]))
model = ov.Model([y], [x], "probe")
compiled = ov.Core().compile_model(
    model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
out = compiled(np.ones((1, 3, 8, 8), np.float32))[0]
assert float(out.min()) == 12.0 and float(out.max()) == 27.0, out
print(ov.get_version())
'''

_verdict: Dict[str, Optional[str]] = {}  # 'reason' -> None when usable
_core = None


class OpenVinoError(OnnxRuntimeError):
    """OpenVINO cannot load or run a graph; names the file (caught with the
    onnxruntime errors)."""


class OpenVinoUnavailable(OpenVinoError):
    """openvino is absent or crashes on this machine (the probe failed)."""


def _probe() -> Optional[str]:
    """Compile and run :data:`PROBE_CODE` in a child process; returns None
    when it worked, else why not (one line)."""
    if importlib.util.find_spec('openvino') is None:
        return 'openvino is not installed (pip install -e ".[openvino]")'
    try:
        proc = subprocess.run(
            [sys.executable, '-c', PROBE_CODE], capture_output=True,
            text=True, timeout=PROBE_TIMEOUT,
            env=dict(os.environ, PYTHONWARNINGS='ignore'))
    except subprocess.TimeoutExpired:
        return (f'compiling a tiny model did not finish in {PROBE_TIMEOUT} s '
                '(in a child process)')
    except OSError as e:
        return f'cannot start the probe process ({e.strerror or e})'
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f'signal {-proc.returncode}'
        return (f'compiling a tiny model on the CPU killed the process with '
                f'{name} (a known OpenVINO crash on some AMD EPYC machines '
                'and CPU sets with gaps)')
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f'exit {proc.returncode}'
        return f'compiling a tiny model on the CPU failed: {last}'
    return None


def unusable_reason() -> Optional[str]:
    """Why OpenVINO cannot be used in this process (None: it can); the
    probe runs once per process."""
    if 'reason' not in _verdict:
        _verdict['reason'] = _probe()
    return _verdict['reason']


def require() -> None:
    """Raise :class:`OpenVinoUnavailable` (one line) unless the probe
    passed."""
    reason = unusable_reason()
    if reason is not None:
        raise OpenVinoUnavailable(f'OpenVINO is not usable here: {reason}')


def core():
    """The process's ``openvino.Core`` (after :func:`require`)."""
    global _core
    require()
    if _core is None:
        import openvino
        _core = openvino.Core()
    return _core


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports native bfloat16
    (``OPTIMIZATION_CAPABILITIES`` contains ``BF16``)."""
    return 'BF16' in core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')


def version() -> str:
    import openvino
    return openvino.get_version().split('-')[0]


class _Arg:
    """An input or output as onnxruntime describes it."""

    def __init__(self, name: str, type: str, shape: list) -> None:
        self.name, self.type, self.shape = name, type, shape


class _Meta:

    def __init__(self, custom_metadata_map: Dict[str, str]) -> None:
        self.custom_metadata_map = custom_metadata_map


def _args(values) -> List[_Arg]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField('dim_value') else
                (d.dim_param or None) for d in t.shape.dim]
        out.append(_Arg(v.name, _ONNX_TYPES.get(t.elem_type,
                                                (f'elem{t.elem_type}', ))[0],
                        dims))
    return out


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO for the CPU.

    Args:
        model (str | bytes): an ``.onnx`` path or a serialized model.
        threads (int, optional): ``INFERENCE_NUM_THREADS`` (default:
            OpenVINO's).
        precision (str): ``INFERENCE_PRECISION_HINT``, one of
            :data:`PRECISIONS`.

    Raises:
        OpenVinoUnavailable: the probe failed (see the module docstring).
        OpenVinoError: the graph cannot be read or compiled, or the
            compiled model does not run in ``precision``.
    """

    runtime = 'openvino'

    def __init__(self,
                 model: Union[str, bytes, 'os.PathLike'],
                 threads: Optional[int] = None,
                 precision: str = 'f32') -> None:
        import onnx
        if precision not in PRECISIONS:
            raise OpenVinoError(f'OpenVINO precision {precision!r}: choose '
                                f'from {", ".join(PRECISIONS)}')
        ov_core = core()
        what = 'the graph' if isinstance(model, bytes) else str(model)
        try:
            if isinstance(model, bytes):
                proto = onnx.load_from_string(model)
                with tempfile.TemporaryDirectory(prefix='mmrepvgg-ov-') as d:
                    path = os.path.join(d, 'model.onnx')
                    with open(path, 'wb') as f:
                        f.write(model)
                    ov_model = ov_core.read_model(path)
            else:
                proto = onnx.load(str(model), load_external_data=False)
                ov_model = ov_core.read_model(str(model))
            config = {'INFERENCE_PRECISION_HINT': precision,
                      'NUM_STREAMS': 1, 'PERFORMANCE_HINT': 'LATENCY'}
            if threads:
                config['INFERENCE_NUM_THREADS'] = int(threads)
            self.compiled = ov_core.compile_model(ov_model, 'CPU', config)
        except Exception as e:  # openvino raises its own exception types
            raise OpenVinoError(f'{what}: OpenVINO cannot load it: '
                                f'{_first_line(e)}') from None
        self.precision = self.compiled.get_property(
            'INFERENCE_PRECISION_HINT').get_type_name()
        if self.precision != precision:
            raise OpenVinoError(f'{what}: OpenVINO compiled it in '
                                f'{self.precision}, not the {precision} '
                                'asked for')
        self.threads = int(self.compiled.get_property('INFERENCE_NUM_THREADS'))
        self._inputs, self._outputs = _args(proto.graph.input), _args(
            proto.graph.output)
        self._meta = _Meta({p.key: p.value for p in proto.metadata_props})
        self._dtypes = {o.name: _ONNX_TYPES.get(
            o.type.tensor_type.elem_type, (None, None))[1]
            for o in proto.graph.output}
        self._ports = {o.get_any_name(): o for o in self.compiled.outputs}
        missing = [o.name for o in self._outputs if o.name not in self._ports]
        if missing:
            raise OpenVinoError(f'{what}: OpenVINO lost the outputs '
                                f'{missing}')
        self._request = self.compiled.create_infer_request()

    def get_inputs(self) -> List[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> List[_Arg]:
        return list(self._outputs)

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def run(self, output_names: Optional[Sequence[str]],
            feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """The outputs ``output_names`` (all: None) on ``feeds``, as numpy
        copies with the ONNX file's declared types."""
        names = list(output_names or [o.name for o in self._outputs])
        unknown = [n for n in names if n not in self._ports]
        if unknown:
            raise OpenVinoError(f'unknown outputs {unknown}')
        result = self._request.infer(dict(feeds))
        out = []
        for n in names:
            value = np.array(result[self._ports[n]])  # a copy: the request
            dtype = self._dtypes.get(n)               # reuses its buffers
            if dtype is not None and value.dtype != dtype:
                value = value.astype(dtype)
            out.append(value)
        return out


def _first_line(e: BaseException) -> str:
    """The informative line of an OpenVINO message (its first lines name
    C++ source files)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    told = [ln for ln in lines if not ln.startswith('Exception from ')]
    return (told or lines or [type(e).__name__])[0]
