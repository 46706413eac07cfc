"""The forms of a backbone and one benchmark run: every form checked
against the training form in float64 (float32 forms within a small multiple
of the training form's own float32 error, lossy forms report their SQNR),
then all timed in the same rounds (:func:`mmrepvgg.utils.timing.measure`).

A form is ``make(x)``: the zero-argument call on the float32 input ``x``
(cast or converted once, outside the call). ``reference`` copies the deploy
weights into plain ``nn.Conv2d`` + activation stages (a hand-written VGG).
The INT8 graph of random weights is calibrated on random inputs: INT8
kernels cost the same whatever the values, but its SQNR is synthetic.
"""
import copy
import os.path as osp
import tempfile
import time
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmrepvgg.deploy import switch_to_deploy
from mmrepvgg.deploy.switch import count_params
from mmrepvgg.deploy.verify import describe, judge_fp32
from mmrepvgg.export.verify import TruthAndReference
from mmrepvgg.testing import randomize_, relative_error
from mmrepvgg.utils.cli import error_message
from mmrepvgg.utils.timing import measure
from .options import (ALL_FORMS, DEFAULT_FORMS, MAX_BATCH_PIXELS,
                      BenchmarkError, check_forms)

#: Ratios reported when both forms ran: ``(numerator, denominator)``.
RATIO_PAIRS = (('deploy', 'reference'), ('training', 'deploy')) + tuple(
    (f, 'deploy') for f in ALL_FORMS[3:]) + (('ort-int8', 'ort-fp32'),
                                             ('ov-int8', 'ov-fp32'))
#: Forms judged by the float32-noise criterion (the others are lossy).
FP32_FORMS = ('deploy', 'reference', 'compile', 'ort-fp32', 'ov-fp32')
#: ONNX form -> (graph, runtime, precision hint)
ONNX_SPECS = {'ort-fp32': ('fp32', 'onnxruntime', 'f32'),
              'ort-int8': ('int8', 'onnxruntime', 'f32'),
              'ov-fp32': ('fp32', 'openvino', 'f32'),
              'ov-int8': ('int8', 'openvino', 'f32'),
              'ov-bf16': ('fp32', 'openvino', 'bf16')}
#: Random calibration inputs of the INT8 graph per benchmarked size.
CALIB_PER_SIZE = 4


class PlainReference(nn.Module):
    """Stages of plain ``nn.Sequential(Conv2d, act, ...)`` (the stem heads
    the first); returns the outputs of the stages in ``out_indices``, like
    :class:`RepVGG`."""

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


def judge_form(label: str, form: str, truth: dict, reference: dict,
               candidate: dict) -> dict:
    """The float32-noise verdict of one float32 form (``label``: the row,
    for the message); :class:`BenchmarkError` naming its error and the
    training form's own float32 error when it fails."""
    try:
        verdict = judge_fp32(truth, reference, candidate)
    except ValueError as e:
        raise BenchmarkError(f'{label}: {form}: {e}') from None
    if not verdict['passed']:
        raise BenchmarkError(
            f'{label}: the {form} form does not compute the training form\'s '
            f'function: ' + describe(verdict, candidate=form,
                                     reference='training') +
            '; the comparison would not be honest')
    return verdict


def lossy_error(truth: dict, candidate: dict) -> dict:
    """``rel_err`` (largest ``max|a-b|/max|a|``) and ``sqnr_db`` (smallest
    signal-to-quantization-noise ratio, dB) over the outputs of a lossy form
    against the float64 truth."""
    from mmrepvgg.export.quantize import sqnr_db
    rel, sqnr = 0.0, float('inf')
    for k, t in truth.items():
        c = candidate[k]
        rel = max(rel, relative_error(t, c.to(t.dtype)))
        sqnr = min(sqnr, sqnr_db(t.numpy(), c.double().numpy()))
    return dict(rel_err=rel, sqnr_db=sqnr)


class Compiled:
    """The ``compile`` form: ``torch.compile`` (Inductor, ``dynamic=False``,
    ``freezing``: weights folded as constants) of the deploy form. The first
    call on each input shape compiles, before the timed rounds; its seconds
    are kept in ``compile_s`` by shape."""

    def __init__(self, module: nn.Module) -> None:
        self.fn = torch.compile(module, dynamic=False)
        self.compile_s: Dict[Tuple[int, ...], float] = {}

    def __call__(self, x: torch.Tensor):
        key = tuple(x.shape)
        if key in self.compile_s:
            return self.fn(x)
        t0 = time.perf_counter()
        try:
            import torch._inductor.config as inductor_config
            with inductor_config.patch(freezing=True):
                out = self.fn(x)
        except Exception as e:  # Inductor needs a working C++ compiler
            raise BenchmarkError(
                f'compile: torch.compile failed on input {list(key)} '
                f'({error_message(e)}); Inductor on CPU needs a C++ '
                'compiler') from None
        self.compile_s[key] = time.perf_counter() - t0
        return out


def onnx_forms(backbone: nn.Module, sizes: Sequence[Tuple[int, int]],
               forms: Sequence[str]) -> dict:
    """The ONNX ``forms`` of a deploy-form backbone: ``calls`` (form ->
    ``make``), ``precision`` (form -> what it computes in; OpenVINO's hint
    read back) and ``int8`` (the INT8 graph's ``config`` and the
    ``optimized_ops`` onnxruntime runs; None when not made)."""
    from mmrepvgg.export import quantize as qz
    from mmrepvgg.export.runtime import make_session
    out = dict(calls={}, precision={}, int8=None)
    if not forms:
        return out
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix='mmrepvgg-bench-') as tmp:
        paths = {g: osp.join(tmp, f'backbone_{g}.onnx')
                 for g in ('fp32', 'int8')}
        qz.export_module(copy.deepcopy(backbone),
                         torch.zeros(1, 3, *sizes[0]), paths['fp32'])
        if any(ONNX_SPECS[f][0] == 'int8' for f in forms):
            g = torch.Generator().manual_seed(1)
            calib = [torch.randn(1, 3, *hw, generator=g).numpy()
                     for hw in sizes for _ in range(CALIB_PER_SIZE)]
            try:
                info = qz.quantize_onnx(paths['fp32'], paths['int8'], calib)
            except Exception as e:
                raise BenchmarkError(f'ort-int8: quantization failed: '
                                     f'{error_message(e)}') from None
            out['int8'] = dict(config=info['config'], optimized_ops=dict(
                qz.optimized_op_types(paths['int8'], threads)))
        for form in forms:
            graph, runtime, hint = ONNX_SPECS[form]
            session = make_session(paths[graph], threads, runtime=runtime,
                                   precision=hint)
            out['calls'][form] = lambda x, s=session: partial(
                s.run, None, {'input': x.contiguous().numpy()})
            text = 'float32' if runtime == 'onnxruntime' else \
                f'INFERENCE_PRECISION_HINT {session.precision}'
            out['precision'][form] = text if graph == 'fp32' else \
                'INT8 (QDQ), ' + text.replace('float32', 'rest float32')
    return out


def make_input(batch: int, hw: Tuple[int, int]) -> torch.Tensor:
    """A seeded standard-normal float32 ``batch x 3 x H x W`` input."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, *hw, generator=g)


def run_benchmark(archs: Sequence[Tuple[str, Union[str, dict]]],
                  sizes: Sequence[Tuple[int, int]],
                  batch_sizes: Sequence[int],
                  forms: Sequence[str] = DEFAULT_FORMS,
                  repeats: int = 24,
                  warmup: int = 3,
                  settle: int = 1,
                  order: str = 'balanced',
                  log: Callable[[str], None] = print) -> List[dict]:
    """Benchmark every (arch, size, batch) on the CPU; one dict per row.

    Args:
        archs (Sequence[tuple]): ``(label, arch)``, arch as ``RepVGG`` takes
            it.
        repeats, warmup, settle, order: see
            :func:`mmrepvgg.utils.timing.measure`.
        log (callable): progress lines.

    Raises:
        BenchmarkError: bad options, or a float32 form that does not compute
            the training form's function.
    """
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
        if 'deploy-bf16' in forms:
            bf16 = copy.deepcopy(base['deploy']).bfloat16()
            calls['deploy-bf16'] = lambda x: partial(bf16, x.bfloat16())
        if 'compile' in forms:
            compiled = Compiled(copy.deepcopy(base['deploy']))
            calls['compile'] = lambda x: partial(compiled, x)
        ort = onnx_forms(base['deploy'], sizes,
                         [f for f in forms if f in ONNX_SPECS])
        calls.update(ort['calls'])
        calls = {f: calls[f] for f in forms}
        head = dict(arch=label, forms=forms, skipped=skipped, params={
            k: count_params(base[k]) for k in ('training', 'deploy')},
            precision={f: ort['precision'].get(f, 'bfloat16' if 'bf16' in f
                                               else 'float32')
                       for f in forms})
        if ort['int8']:
            head['int8_graph'] = ort['int8']
        for hw in sizes:
            accuracy = _check(f'{label} {hw[0]}x{hw[1]}', base['training'],
                              calls, make_input(1, hw), log)
            for batch in batch_sizes:
                x = make_input(batch, hw)
                row = dict(head, accuracy=accuracy, **_time(
                    calls, x, repeats, warmup, settle, order))
                if 'compile' in forms:
                    row['compile_s'] = dict(
                        compile=compiled.compile_s[tuple(x.shape)])
                rows.append(row)
                log(f'{row_name(row)}: ' + ', '.join(
                    f'{k} {v:.2f} ms' for k, v in row['latency_ms'].items())
                    + f'; {row["rounds"]["summary"]}')
    return rows


def _check(name: str, training: nn.Module, calls: dict, x: torch.Tensor,
           log) -> Dict[str, dict]:
    """Float32-noise verdicts of the float32 forms and the error of the
    lossy ones on ``x``; form -> accuracy dict."""
    truth, ref = TruthAndReference(training).named(x)
    out: Dict[str, dict] = {}
    with torch.inference_mode():
        for form, make in calls.items():
            if form == 'training':
                continue
            cand = {f'output.{i}': torch.as_tensor(o).float() for i, o in
                    enumerate(make(x)())}
            if form in FP32_FORMS:
                v = judge_form(name, form, truth, ref, cand)
                out[form] = dict(kind='fp32', **{k: v[k] for k in (
                    'error', 'noise', 'ratio', 'passed')})
            else:
                out[form] = dict(kind='lossy', **lossy_error(truth, cand))
    log(f'check {name}: error vs float64 truth: ' + ', '.join(
        f'{f} {a["ratio"]:.2f}x the float32 noise' if a['kind'] == 'fp32'
        else f'{f} SQNR {a["sqnr_db"]:.1f} dB' for f, a in out.items()))
    return out


def _time(calls: dict, x: torch.Tensor, repeats: int, warmup: int,
          settle: int, order: str) -> dict:
    """Latency, throughput, ratios and rounds of the forms on ``x``."""
    fns = {f: make(x) for f, make in calls.items()}
    threads = torch.get_num_threads()
    with torch.inference_mode():
        if 'compile' in fns:
            fns['compile']()  # compilation, before (not in) the rounds
        t = measure(fns, repeats, warmup, settle=settle, order=order,
                    threads=threads)
    lat = {k: t.median(k) for k in t.times}
    return dict(
        height=x.shape[2], width=x.shape[3], batch=x.shape[0],
        latency_ms={k: v * 1e3 for k, v in lat.items()},
        throughput={k: x.shape[0] / v for k, v in lat.items()},
        ratios={f'{a}/{b}': t.ratio(a, b) for a, b in RATIO_PAIRS
                if a in t.times and b in t.times},
        rounds=dict(total=len(t.reasons), kept=len(t.kept),
                    dropped=t.disturbed, busy=t.busy, reasons=t.reasons,
                    summary=t.describe(), samples=t.rounds),
        settle=settle, order=order, threads=threads,
        times_ms={k: [s * 1e3 for s in v] for k, v in t.times.items()},
        orders=[list(o) for o in t.orders])


def row_name(r: dict) -> str:
    return f'{r["arch"]} {r["height"]}x{r["width"]} batch {r["batch"]}'
