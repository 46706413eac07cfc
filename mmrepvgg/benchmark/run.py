"""One benchmark run: every (arch, size, batch) row, every form timed side
by side (:mod:`mmrepvgg.utils.timing`), checked equal first
(:mod:`.reference`).

Forms (:data:`.options.ALL_FORMS`): PyTorch ``training``, ``deploy`` and
``reference`` in float32, ``compile`` (the deploy form through
``torch.compile``, Inductor with freezing; its compilation is timed apart,
before the rounds), optionally ``deploy-bf16`` / ``deploy-fp16`` (the
deploy form in bfloat16 / float16, input cast too), the onnxruntime forms
``ort-fp32`` / ``ort-int8`` and the OpenVINO forms ``ov-fp32`` / ``ov-int8``
/ ``ov-bf16`` (:mod:`.onnx_forms`). All forms of a row run in the same
rounds, so every ratio is a median of per-round ratios.
"""
import copy
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmrepvgg.deploy.switch import count_params
from mmrepvgg.deploy.verify import flatten_outputs
from mmrepvgg.utils.timing import (ORDERS, ROUND_TOLERANCE, measure,
                                   predecessor_effect)
from .memory import peak_activation_bytes
from .options import (DEFAULT_FORMS, MAX_BATCH, MAX_BATCH_PIXELS,
                      ONNX_FORMS, BenchmarkError,
                      check_device_options, parse_forms, skipped_forms)
from .reference import build_forms, float32_noise, judge_form, lossy_error

#: Ratios reported when both forms ran: ``(numerator, denominator)``.
RATIO_PAIRS = (('deploy', 'reference'), ('training', 'deploy'),
               ('deploy-bf16', 'deploy'), ('deploy-fp16', 'deploy'),
               ('compile', 'deploy'), ('ort-fp32', 'deploy'),
               ('ort-int8', 'ort-fp32'), ('ort-int8', 'deploy'),
               ('ov-fp32', 'deploy'), ('ov-bf16', 'deploy'),
               ('ov-int8', 'ov-fp32'), ('ov-int8', 'deploy'))
#: Forms judged by the float32-noise criterion (the others are lossy).
FP32_FORMS = ('deploy', 'reference', 'compile', 'ort-fp32', 'ov-fp32')
LOW_PRECISION = {'deploy-bf16': torch.bfloat16, 'deploy-fp16': torch.float16}
TORCH_PRECISION = {'deploy-bf16': 'bfloat16', 'deploy-fp16': 'float16'}


class Compiled:
    """The ``compile`` form: ``torch.compile`` (Inductor, ``dynamic=False``)
    of a module, compiled with ``torch._inductor.config.freezing`` (weights
    folded as constants; inference only). The first call on each input
    shape compiles; its seconds are kept in ``compile_s`` (by shape) and it
    is made before the timed rounds (:func:`bench_row`).

    Args:
        module (nn.Module): the deploy form (a copy of its own).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.fn = torch.compile(module, dynamic=False)
        self.compile_s: Dict[Tuple[int, ...], float] = {}
        self.dtype = next(module.parameters()).dtype

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
            text = str(e).strip().splitlines()
            raise BenchmarkError(
                f'compile: torch.compile failed on input {list(key)} '
                f'({type(e).__name__}: {text[0] if text else ""}); '
                'Inductor on CPU needs a C++ compiler') from None
        self.compile_s[key] = time.perf_counter() - t0
        return out


@dataclass
class BenchOptions:
    """How :func:`run_benchmark` times (the options of
    ``tools/analysis_tools/benchmark.py`` of the same names).

    Args:
        forms (Sequence[str]): forms to time (:data:`.options.ALL_FORMS`).
        repeats (int): timed rounds per row.
        warmup (int): untimed rounds per row first.
        settle (int): untimed calls of a form before each timed call.
        order (str): ``balanced`` or ``random`` order of forms per round.
        device (str): ``cpu`` or ``cuda[:N]``.
        ort_spinning (bool): onnxruntime threads busy-wait between runs.
        tolerance (float): a round slower than the median round by more
            than this fraction is disturbed.
    """
    forms: Sequence[str] = DEFAULT_FORMS
    repeats: int = 24
    warmup: int = 3
    settle: int = 1
    order: str = 'balanced'
    device: str = 'cpu'
    ort_spinning: bool = False
    tolerance: float = ROUND_TOLERANCE

    def check(self, batch_sizes: Sequence[int]) -> torch.device:
        """Refuse bad options (the message names the option); returns the
        device."""
        self.forms = parse_forms(self.forms)
        for name, value, low in (('repeats', self.repeats, 1),
                                 ('warmup', self.warmup, 0),
                                 ('settle', self.settle, 0)):
            if value < low:
                raise BenchmarkError(f'--{name} must be >= {low}, got '
                                     f'{value}')
        if not batch_sizes or min(batch_sizes) < 1 or \
                max(batch_sizes) > MAX_BATCH:
            raise BenchmarkError(f'--batch-sizes must be >= 1 and <= '
                                 f'{MAX_BATCH}, got {list(batch_sizes)}')
        if self.order not in ORDERS:
            raise BenchmarkError(f'--order must be balanced or random, got '
                                 f'{self.order!r}')
        return check_device_options(self.device, self.forms)


def ratio_name(a: str, b: str) -> str:
    return f'{a}/{b}'


def make_input(batch: int, hw: Tuple[int, int],
               device: torch.device) -> torch.Tensor:
    """A seeded standard-normal float32 ``batch x 3 x H x W`` input."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, *hw, generator=g).to(device)


def run_benchmark(archs: Sequence[Tuple[str, Union[str, dict]]],
                  sizes: Sequence[Tuple[int, int]],
                  batch_sizes: Sequence[int],
                  options: Optional[BenchOptions] = None,
                  log: Callable[[str], None] = print,
                  **overrides) -> List[dict]:
    """Benchmark every (arch, size, batch); returns one dict per row.

    Args:
        archs (Sequence[tuple]): ``(label, arch)`` pairs
            (:func:`.options.parse_arch`).
        sizes (Sequence[tuple]): input ``(H, W)``.
        batch_sizes (Sequence[int]): batch sizes.
        options (BenchOptions, optional): how; ``overrides`` replace its
            fields.
        log (callable): progress lines.

    Returns:
        list[dict]: rows with ``latency_ms``, ``throughput``, ``ratios``,
        ``params``, ``peak_bytes``, ``accuracy``, ``rounds`` and the raw
        ``times_ms``.

    Raises:
        BenchmarkError: bad options, or a float32 form that does not compute
            the training form's function.
    """
    opts = replace(options or BenchOptions(), **overrides)
    dev = opts.check(batch_sizes)
    pixels = max(batch_sizes) * max(h * w for h, w in sizes) if sizes else 0
    if pixels > MAX_BATCH_PIXELS:
        raise BenchmarkError(
            f'--batch-sizes x --sizes: {pixels} pixels in one batch; at most '
            f'{MAX_BATCH_PIXELS} (e.g. 16 x 1024x1024)')
    skipped = skipped_forms(opts.forms)
    for form, why in skipped.items():
        log(f'note: form {form} skipped: {why}')
    opts.forms = tuple(f for f in opts.forms if f not in skipped)
    if not opts.forms:
        raise BenchmarkError('--forms: every form asked for is skipped on '
                             'this machine')
    rows = []
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dev.type == 'cuda'
    try:
        for label, arch in archs:
            rows += _bench_arch(label, arch, sizes, batch_sizes, opts, dev,
                                log)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    for r in rows:
        r['skipped'] = dict(skipped)
    return rows


def _bench_arch(label: str, arch, sizes, batch_sizes, opts: BenchOptions,
                dev: torch.device, log) -> List[dict]:
    from .onnx_forms import OnnxForms, describe_ops, ort_threads
    base = {}
    for k, m in build_forms(arch).items():
        base[k] = m.to(device=dev).eval()
    params = {k: count_params(m) for k, m in base.items()}
    if params['deploy'] != params['reference']:
        raise BenchmarkError(f'{label}: reference has {params["reference"]} '
                             f'parameters, deploy {params["deploy"]}')
    models: Dict[str, nn.Module] = {
        f: copy.deepcopy(base['deploy']).to(dtype=LOW_PRECISION[f])
        if f in LOW_PRECISION else base[f]
        for f in opts.forms if f not in ONNX_FORMS and f != 'compile'}
    ort = None
    if any(f in ONNX_FORMS for f in opts.forms):
        ort = OnnxForms(copy.deepcopy(base['deploy']).cpu(), sizes,
                        [f for f in opts.forms if f in ONNX_FORMS],
                        ort_threads(), spinning=opts.ort_spinning)
        for info in ort.info.values():
            for line in describe_ops(info):
                log(line)
    try:
        calls = dict(models)
        if 'compile' in opts.forms:
            calls['compile'] = Compiled(copy.deepcopy(base['deploy']))
        accuracy = {hw: _check(f'{label} {hw[0]}x{hw[1]}', hw,
                               base['training'], calls, ort, opts, dev, log)
                    for hw in sizes}
        rows = []
        for hw in sizes:
            for batch in batch_sizes:
                row = bench_row(calls, ort, batch, hw, opts, dev)
                row.update(arch=label, accuracy=accuracy[hw], params=dict(
                    training=params['training'], deploy=params['deploy']))
                row['precision'] = {f: ort.precision[f] if ort is not None
                                    and f in ort.precision else
                                    TORCH_PRECISION.get(f, 'float32')
                                    for f in opts.forms}
                if ort is not None and 'int8' in ort.info:
                    info = ort.info['int8']
                    row['int8_graph'] = dict(
                        config=info['config'],
                        optimized_ops=dict(info['optimized_ops']))
                rows.append(row)
                log(row_line(row))
    finally:
        if ort is not None:
            ort.close()
    return rows


def _dtype(m) -> torch.dtype:
    return m.dtype if isinstance(m, Compiled) else next(
        m.parameters()).dtype


def _inputs(models, ort, opts, x):
    """Per form the zero-argument call on ``x`` (cast to the form's dtype;
    a numpy copy for the ONNX runtimes) and, for the eager PyTorch forms,
    ``(model, input)`` (peak memory)."""
    fns, torch_inputs = {}, {}
    for form in opts.forms:
        if form in models:
            m = models[form]
            xi = x.to(_dtype(m))
            fns[form] = (lambda m=m, xi=xi: m(xi))
            if not isinstance(m, Compiled):
                torch_inputs[form] = (m, xi)
        elif ort is not None and form in ONNX_FORMS:
            fns[form] = ort.callable(form,
                                     x.float().cpu().contiguous().numpy())
    return fns, torch_inputs


def _check(name: str, hw, training: nn.Module, models, ort,
           opts: BenchOptions, dev, log) -> dict:
    """Float32-noise verdicts of the float32 forms and the error of the
    lossy ones, at batch 1; returns ``form -> accuracy dict``."""
    x = make_input(1, hw, dev)
    truth, ref = float32_noise(training, x)
    out: Dict[str, dict] = {}
    with torch.inference_mode():
        for form in opts.forms:
            if form in models and form != 'training':
                m = models[form]
                cand = {k: v.float().cpu() for k, v in flatten_outputs(
                    m(x.to(_dtype(m)))).items()}
            elif ort is not None and form in ONNX_FORMS:
                cand = ort.outputs(form, x.float().cpu().contiguous().numpy())
            else:
                continue
            if form in FP32_FORMS:
                v = judge_form(name, form, truth, ref, cand)
                out[form] = dict(kind='fp32', error=v['error'],
                                 noise=v['noise'], ratio=v['ratio'],
                                 passed=v['passed'])
            else:
                out[form] = dict(kind='lossy', **lossy_error(truth, cand))
    parts = [f'{form} {a["error"]:.2g} ({a["ratio"]:.2f}x noise)'
             if a['kind'] == 'fp32' else f'{form} SQNR {a["sqnr_db"]:.1f} dB'
             for form, a in out.items()]
    noise = max((a['noise'] for a in out.values() if a['kind'] == 'fp32'),
                default=None)
    log(f'check {name}: error vs float64 truth: ' + ', '.join(parts) +
        (f'; training float32 noise {noise:.2g}' if noise is not None
         else ''))
    return out


def bench_row(calls: Dict[str, nn.Module], ort, batch: int,
              hw: Tuple[int, int], opts: BenchOptions,
              dev: torch.device) -> dict:
    """Latency, throughput, ratios and peak memory of the forms on one
    input (see :func:`run_benchmark`)."""
    x = make_input(batch, hw, dev)
    fns, torch_inputs = _inputs(calls, ort, opts, x)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' \
        else None
    threads = torch.get_num_threads() if dev.type == 'cpu' else 1
    compiled = {f: m for f, m in calls.items() if isinstance(m, Compiled)}
    with torch.inference_mode():
        for form in compiled:  # compilation, before (not in) the rounds
            fns[form]()
        t = measure(fns, opts.repeats, opts.warmup, settle=opts.settle,
                    order=opts.order, sync=sync, threads=threads,
                    tolerance=opts.tolerance)
    lat = {k: t.median(k) for k in t.times}
    others = [r['others_cpu'] / r['wall'] for r in t.rounds
              if r['others_cpu'] is not None and r['wall'] > 0]
    return dict(
        height=hw[0], width=hw[1], batch=batch, forms=list(opts.forms),
        latency_ms={k: v * 1e3 for k, v in lat.items()},
        throughput={k: batch / v for k, v in lat.items()},
        ratios={ratio_name(a, b): t.ratio(a, b) for a, b in RATIO_PAIRS
                if a in t.times and b in t.times},
        peak_bytes={f: peak_activation_bytes(*torch_inputs[f])
                    if f in torch_inputs else None for f in opts.forms},
        rounds=dict(total=len(t.reasons), kept=len(t.kept),
                    dropped=t.disturbed, busy=t.busy, reasons=t.reasons,
                    own_cores=[r['own_cpu'] / r['wall'] if r['wall'] else 0
                               for r in t.rounds],
                    others_cores_median=statistics.median(others)
                    if others else None),
        order_effect=predecessor_effect(t.times, t.orders, t.kept),
        compile_s={f: m.compile_s[tuple(x.shape)]
                   for f, m in compiled.items()},
        settle=opts.settle, order=opts.order, threads=threads,
        times_ms={k: [s * 1e3 for s in v] for k, v in t.times.items()},
        orders=[list(o) for o in t.orders])


def row_name(r: dict) -> str:
    return f'{r["arch"]} {r["height"]}x{r["width"]} batch {r["batch"]}'


def row_line(row: dict) -> str:
    """One progress line: latencies and ratios of a row."""
    lat = ', '.join(f'{k} {v:.2f} ms' for k, v in row['latency_ms'].items())
    rat = ', '.join(f'{k} {v["median"]:.3f}'
                    for k, v in row['ratios'].items())
    r = row['rounds']
    dropped = f'; {r["dropped"]}/{r["total"]} rounds disturbed' + (
        ' (BUSY: all kept)' if r['busy'] else ' (dropped)') \
        if r['dropped'] else ''
    return f'{row_name(row)}: {lat}; {rat}{dropped}'
