"""OpenVINO sessions offering the calls callers use of an
``onnxruntime.InferenceSession``, with two guarantees OpenVINO does not give:
an explicit precision (``INFERENCE_PRECISION_HINT`` set and read back: on
CPUs with BF16 or AMX a float32 graph would run in bfloat16), and no crash of
the caller (some versions die with SIGFPE in ``compile_model`` on some
machines: a child process compiles a tiny model first, once per process).
"""
import importlib.util
import os
import signal
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .runtime import OnnxRuntimeError, _first_line

PRECISIONS = ('f32', 'bf16')
#: Seconds the probe may take (importing openvino, compiling a tiny model).
PROBE_TIMEOUT = 300
#: The probe: a 3x3 convolution + ReLU on ones (12 at the corners, 27
#: inside), compiled for the CPU with an explicit float32 hint.
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
    """OpenVINO cannot load or run a graph; names the file."""


class OpenVinoUnavailable(OpenVinoError):
    """openvino is absent or crashes on this machine (the probe failed)."""


def _probe() -> Optional[str]:
    """None when :data:`PROBE_CODE` ran in a child process, else why not
    (one line)."""
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
    """Why OpenVINO cannot be used in this process (None: it can)."""
    if 'reason' not in _verdict:
        _verdict['reason'] = _probe()
    return _verdict['reason']


def require() -> None:
    """Raise :class:`OpenVinoUnavailable` unless the probe passed."""
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
    """Whether OpenVINO's CPU plugin reports native bfloat16."""
    return 'BF16' in core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')


def _args(values) -> List[SimpleNamespace]:
    """Inputs or outputs as onnxruntime describes them."""
    import onnx
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField('dim_value') else
                (d.dim_param or None) for d in t.shape.dim]
        name = onnx.TensorProto.DataType.Name(t.elem_type).lower()
        out.append(SimpleNamespace(name=v.name, type=f'tensor({name})',
                                   shape=dims))
    return out


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO for the CPU with
    ``INFERENCE_PRECISION_HINT`` ``precision``."""

    runtime = 'openvino'

    def __init__(self,
                 model: Union[str, 'os.PathLike'],
                 threads: Optional[int] = None,
                 precision: str = 'f32') -> None:
        import onnx
        if precision not in PRECISIONS:
            raise OpenVinoError(f'OpenVINO precision {precision!r}: choose '
                                f'from {", ".join(PRECISIONS)}')
        ov_core = core()
        what = str(model)
        try:
            proto = onnx.load(what, load_external_data=False)
            ov_model = ov_core.read_model(what)
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
        self._meta = SimpleNamespace(custom_metadata_map={
            p.key: p.value for p in proto.metadata_props})
        self._dtypes = {o.name: _np_dtype(o.type.tensor_type.elem_type)
                        for o in proto.graph.output}
        self._ports = {o.get_any_name(): o for o in self.compiled.outputs}
        missing = [o.name for o in self._outputs if o.name not in self._ports]
        if missing:
            raise OpenVinoError(f'{what}: OpenVINO lost the outputs '
                                f'{missing}')
        self._request = self.compiled.create_infer_request()

    def get_inputs(self) -> List[SimpleNamespace]:
        return list(self._inputs)

    def get_outputs(self) -> List[SimpleNamespace]:
        return list(self._outputs)

    def get_modelmeta(self) -> SimpleNamespace:
        return self._meta

    def run(self, output_names: Optional[Sequence[str]],
            feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """The outputs ``output_names`` (all: None), as numpy copies with
        the declared types."""
        names = list(output_names or [o.name for o in self._outputs])
        unknown = [n for n in names if n not in self._ports]
        if unknown:
            raise OpenVinoError(f'unknown outputs {unknown}')
        result = self._request.infer(dict(feeds))
        # copies: the request reuses its buffers
        return [np.array(result[self._ports[n]], self._dtypes[n])
                for n in names]


def _np_dtype(elem_type: int):
    """numpy dtype of an ONNX element type (None: keep OpenVINO's)."""
    import onnx
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError):
        return None
