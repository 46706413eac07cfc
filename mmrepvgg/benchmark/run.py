"""The forms of a backbone (``make(x)``: the zero-argument call on input
``x``, converted outside it) and one run: every form checked against the
float64 training form, then all timed in the same rounds. The INT8 graph is
calibrated on random inputs: its kernels cost the same, SQNR is synthetic.
"""
import copy
import os.path as osp
import tempfile
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmrepvgg.deploy import switch_to_deploy
from mmrepvgg.deploy.switch import count_params
from mmrepvgg.deploy.verify import describe, judge_fp32
from mmrepvgg.export.verify import TruthAndReference
from mmrepvgg.testing import randomize_
from mmrepvgg.utils.cli import ToolError, error_message
from mmrepvgg.utils.timing import measure

#: Every form in table order (what each runs: docs/benchmark.md). Those
#: ending in ``-int8`` or ``-bf16`` are lossy, the others are judged by the
#: float32 noise; ``ort-*`` and ``ov-*`` run the exported ONNX graph.
ALL_FORMS = ('training', 'deploy', 'reference', 'compile', 'ort-fp32',
             'ort-int8', 'ov-fp32', 'ov-int8', 'ov-bf16')
DEFAULT_FORMS = ALL_FORMS[:3]
ONNX_FORMS = ALL_FORMS[4:]
#: Ratios reported when both forms ran: ``(numerator, denominator)``.
RATIO_PAIRS = (('deploy', 'reference'), ('training', 'deploy')) + tuple(
    (f, 'deploy') for f in ALL_FORMS[3:]) + (('ort-int8', 'ort-fp32'),
                                             ('ov-int8', 'ov-fp32'))
#: Most pixels of one batch (batch x H x W).
MAX_BATCH_PIXELS = 1 << 24
#: Random calibration inputs of the INT8 graph per benchmarked size.
CALIB_PER_SIZE = 4


class BenchmarkError(ToolError):
    """Bad option or failed check; the message names the argument."""


def check_forms(forms: Sequence[str]) -> Dict[str, str]:
    """Refuse forms this machine cannot run; returns those it skips, form ->
    why (``ov-bf16`` without native bfloat16: emulated is no deployment)."""
    unknown = [f for f in forms if f not in ALL_FORMS]
    if unknown or not forms:
        raise BenchmarkError(f'--forms: unknown form(s) {unknown}; choose '
                             f'from {", ".join(ALL_FORMS)}')
    onnx_forms = ' '.join(f for f in forms if f in ONNX_FORMS)
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


class PlainReference(nn.Module):
    """Stages of plain ``nn.Sequential(Conv2d, act, ...)``, returning those
    in ``out_indices`` like :class:`RepVGG`."""

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


def build_reference(backbone: nn.Module) -> PlainReference:
    """The plain network holding own copies of the conv, SE and activation
    of every block of a deploy-form ``RepVGG`` (``ValueError`` for a block
    not in deploy form), eval mode."""
    stages = []
    for i, name in enumerate(backbone.stage_names):
        mods, blocks = [], [backbone.stem] if i == 0 else []
        for block in blocks + list(getattr(backbone, name)):
            if not getattr(block, 'deploy', False):
                raise ValueError(f'{type(block).__name__} is not in deploy '
                                 'form: call switch_to_deploy first')
            mods += [copy.deepcopy(m) for m in (
                block.conv_reparam, block.se, block.act)
                if not isinstance(m, nn.Identity)]
        stages.append(nn.Sequential(*mods))
    return PlainReference(stages, backbone.out_indices).eval()


def build_forms(arch: Union[str, dict],
                seed: int = 0) -> Dict[str, nn.Module]:
    """``training``, ``deploy`` and ``reference`` modules of one backbone
    (float32, CPU, eval mode), with random weights and batch-norm
    statistics drawn from ``seed``."""
    from mmrepvgg.models import RepVGG
    training = RepVGG(arch=arch)
    randomize_(training, seed=seed)
    training.eval()
    deploy = switch_to_deploy(training, inplace=False, verbose=False)
    return dict(training=training, deploy=deploy,
                reference=build_reference(deploy))


def onnx_forms(backbone: nn.Module, sizes: Sequence[Tuple[int, int]],
               forms: Sequence[str]) -> Tuple[dict, dict, Optional[dict]]:
    """The ONNX ``forms`` of a deploy-form backbone: form -> ``make``, form
    -> precision (OpenVINO's hint read back), the INT8 graph's ``config``
    and ``optimized_ops`` as onnxruntime runs it (None: not made)."""
    from mmrepvgg.export import quantize as qz
    from mmrepvgg.export.runtime import make_session
    calls, precision, int8 = {}, {}, None
    if not forms:
        return calls, precision, int8
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-bench-') as tmp:
        paths = {g: osp.join(tmp, f'backbone_{g}.onnx')
                 for g in ('fp32', 'int8')}
        qz.export_module(copy.deepcopy(backbone),
                         torch.zeros(1, 3, *sizes[0]), paths['fp32'])
        if any(f.endswith('-int8') for f in forms):
            g = torch.Generator().manual_seed(1)
            calib = [torch.randn(1, 3, *hw, generator=g).numpy()
                     for hw in sizes for _ in range(CALIB_PER_SIZE)]
            try:
                info = qz.quantize_onnx(paths['fp32'], paths['int8'], calib)
            except Exception as e:
                raise BenchmarkError(f'ort-int8: quantization failed: '
                                     f'{error_message(e)}') from None
            int8 = dict(config=info['config'], optimized_ops=dict(
                qz.optimized_op_types(paths['int8'], threads)))
        for form in forms:
            graph = 'int8' if form.endswith('-int8') else 'fp32'
            ov = form.startswith('ov-')
            session = make_session(
                paths[graph], threads, precision='bf16' if 'bf16' in form
                else 'f32', runtime='openvino' if ov else 'onnxruntime')
            calls[form] = lambda x, s=session: partial(
                s.run, None, {'input': x.contiguous().numpy()})
            text = f'INFERENCE_PRECISION_HINT {session.precision}' if ov \
                else 'float32'
            precision[form] = text if graph == 'fp32' else \
                'INT8 (QDQ), ' + text.replace('float32', 'rest float32')
    return calls, precision, int8


def run_benchmark(archs: Sequence[Tuple[str, Union[str, dict]]],
                  sizes: Sequence[Tuple[int, int]],
                  batch_sizes: Sequence[int],
                  forms: Sequence[str] = DEFAULT_FORMS,
                  repeats: int = 24,
                  warmup: int = 3,
                  settle: int = 1,
                  log: Callable[[str], None] = print) -> List[dict]:
    """Benchmark every (arch, size, batch) on the CPU, one dict per row
    (``archs``: ``(label, arch)``, arch as ``RepVGG`` takes it; ``log``:
    progress lines); :class:`BenchmarkError` for bad options or a float32
    form that does not compute the training form's function."""
    skipped = check_forms(forms)
    for form, why in skipped.items():
        log(f'note: form {form} skipped: {why}')
    forms = [f for f in ALL_FORMS if f in forms and f not in skipped]
    if not forms:
        raise BenchmarkError('--forms: every form asked for is skipped on '
                             'this machine')
    pixels = max(batch_sizes) * max(h * w for h, w in sizes)
    if pixels > MAX_BATCH_PIXELS:
        raise BenchmarkError(
            f'--batch-sizes x --sizes: {pixels} pixels in one batch; at most '
            f'{MAX_BATCH_PIXELS} (e.g. 16 x 1024x1024)')
    rows = []
    for label, arch in archs:
        base = build_forms(arch)
        calls = {f: (lambda x, m=base[f]: partial(m, x))
                 for f in DEFAULT_FORMS if f in forms}
        compile_s: Dict[tuple, float] = {}  # input shape -> seconds
        if 'compile' in forms:  # Inductor, weights folded as constants
            compiled = torch.compile(copy.deepcopy(base['deploy']),
                                     dynamic=False, options={'freezing': True})
            calls['compile'] = lambda x: partial(_first_call_timed, compiled,
                                                 x, compile_s)
        onnx, precision, int8 = onnx_forms(
            base['deploy'], sizes, [f for f in forms if f in ONNX_FORMS])
        calls = {f: {**calls, **onnx}[f] for f in forms}
        head = dict(arch=label, forms=forms, skipped=skipped, params={
            k: count_params(base[k]) for k in ('training', 'deploy')},
            precision={f: precision.get(f, 'float32') for f in forms},
            int8_graph=int8)
        for hw in sizes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(max(batch_sizes), 3, *hw, generator=g)
            accuracy = _check(f'{label} {hw[0]}x{hw[1]}', base['training'],
                              calls, x[:1])
            for batch in batch_sizes:
                row = dict(head, accuracy=accuracy, **_time(
                    calls, x[:batch], repeats, warmup, settle))
                if compile_s:
                    row['compile_s'] = compile_s[tuple(x[:batch].shape)]
                rows.append(row)
                log(f'{row_name(row)}: ' + ', '.join(
                    f'{k} {v:.2f} ms' for k, v in row['latency_ms'].items())
                    + f'; {row["rounds"]["summary"]}')
    return rows


def _first_call_timed(fn: Callable, x: torch.Tensor, seconds: dict):
    """``fn(x)``; the first call per input shape (``torch.compile``
    compiles then) is timed into ``seconds``, apart from the rounds."""
    if tuple(x.shape) in seconds:
        return fn(x)
    t0 = time.perf_counter()
    out = fn(x)
    seconds[tuple(x.shape)] = time.perf_counter() - t0
    return out


def _check(name: str, training: nn.Module, calls: dict,
           x: torch.Tensor) -> Dict[str, dict]:
    """form -> float32-noise verdict (:class:`BenchmarkError` naming the row
    and both errors if it fails), or for a lossy form its largest relative
    ``error`` and smallest SQNR over the outputs."""
    from mmrepvgg.export.quantize.analysis import ErrorStats
    truth, ref = TruthAndReference(training).named(x)
    out: Dict[str, dict] = {}
    with torch.inference_mode():
        for form, make in calls.items():
            if form == 'training':
                continue
            try:  # e.g. Inductor without a working C++ compiler
                outs = make(x)()
            except Exception as e:
                raise BenchmarkError(f'{name}: the {form} form failed: '
                                     f'{error_message(e)}') from None
            cand = {f'output.{i}': torch.as_tensor(o).float()
                    for i, o in enumerate(outs)}
            if not form.endswith(('-int8', '-bf16')):
                try:
                    v = judge_fp32(truth, ref, cand)
                except ValueError as e:
                    raise BenchmarkError(f'{name}: {form}: {e}') from None
                if not v['passed']:
                    raise BenchmarkError(
                        f'{name}: the {form} form does not compute the '
                        "training form's function: " + describe(
                            v, candidate=form, reference='training') +
                        '; the comparison would not be honest')
                out[form] = dict(kind='fp32', **{k: v[k] for k in (
                    'error', 'noise', 'ratio', 'passed')})
                continue
            stats = [ErrorStats().add(t.numpy(), cand[k].double().numpy())
                     for k, t in truth.items()]
            out[form] = dict(kind='lossy',
                             error=max(s.rel_err for s in stats),
                             sqnr_db=min(s.sqnr_db for s in stats))
    return out


def _time(calls: dict, x: torch.Tensor, repeats: int, warmup: int,
          settle: int) -> dict:
    """Latency, ratios and rounds of the forms on ``x``."""
    fns = {f: make(x) for f, make in calls.items()}
    threads = torch.get_num_threads()
    with torch.inference_mode():
        if 'compile' in fns:
            fns['compile']()  # compiles for this shape, before the rounds
        t = measure(fns, repeats, warmup, settle, threads)
    return dict(
        height=x.shape[2], width=x.shape[3], batch=x.shape[0],
        latency_ms={k: t.median(k) * 1e3 for k in t.times},
        ratios={f'{a}/{b}': t.ratio(a, b) for a, b in RATIO_PAIRS
                if a in t.times and b in t.times},
        rounds=dict(total=len(t.reasons), kept=len(t.kept),
                    dropped=t.disturbed, busy=t.busy, reasons=t.reasons,
                    summary=t.describe(), samples=t.rounds),
        settle=settle, threads=threads,
        times_ms={k: [s * 1e3 for s in v] for k, v in t.times.items()},
        orders=[list(o) for o in t.orders])


def row_name(r: dict) -> str:
    return f'{r["arch"]} {r["height"]}x{r["width"]} batch {r["batch"]}'
