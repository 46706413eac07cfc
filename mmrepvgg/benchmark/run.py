"""One benchmark run: every (arch, size, batch) row, every form timed
side by side (:mod:`mmrepvgg.utils.timing`), checked equal first
(:mod:`.reference`).

Forms (:data:`.options.ALL_FORMS`): PyTorch ``training``, ``deploy`` and
``reference`` in float32, optionally ``deploy-bf16`` / ``deploy-fp16`` (the
deploy form in bfloat16 / float16, input cast too) and the onnxruntime
forms ``ort-fp32`` / ``ort-int8`` (:mod:`.onnx_forms`). All forms of a row
run in the same rounds, so every ratio is a median of per-round ratios.
"""
import copy
import statistics
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmrepvgg.deploy.switch import count_params
from mmrepvgg.utils.timing import measure, predecessor_effect
from .memory import peak_activation_bytes
from .options import (DEFAULT_FORMS, MAX_BATCH, ORT_FORMS, BenchmarkError,
                      check_device_options, parse_forms)
from .reference import build_forms, float32_noise, judge_form, lossy_error

#: Ratios reported when both forms ran: ``(numerator, denominator)``.
RATIO_PAIRS = (('deploy', 'reference'), ('training', 'deploy'),
               ('deploy-bf16', 'deploy'), ('deploy-fp16', 'deploy'),
               ('ort-fp32', 'deploy'), ('ort-int8', 'ort-fp32'),
               ('ort-int8', 'deploy'))
#: Forms judged by the float32-noise criterion (the others are lossy).
FP32_FORMS = ('deploy', 'reference', 'ort-fp32')
LOW_PRECISION = {'deploy-bf16': torch.bfloat16, 'deploy-fp16': torch.float16}


def ratio_name(a: str, b: str) -> str:
    return f'{a}/{b}'


def make_input(batch: int, hw: Tuple[int, int], device: torch.device,
               dtype: torch.dtype = torch.float32, channels_last: bool = False,
               seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal ``batch x 3 x H x W`` input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *hw, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype,
             channels_last: bool) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def check_row_options(repeats: int, warmup: int, settle: int,
                      batch_sizes: Sequence[int], order: str) -> None:
    """Refuse bad timing options (the message names the option)."""
    if repeats < 1:
        raise BenchmarkError(f'--repeats must be >= 1, got {repeats}')
    if warmup < 0:
        raise BenchmarkError(f'--warmup must be >= 0, got {warmup}')
    if settle < 0:
        raise BenchmarkError(f'--settle must be >= 0, got {settle}')
    if not batch_sizes or min(batch_sizes) < 1 or \
            max(batch_sizes) > MAX_BATCH:
        raise BenchmarkError(f'--batch-sizes must be >= 1 and <= '
                             f'{MAX_BATCH}, got {list(batch_sizes)}')
    if order not in ('balanced', 'random'):
        raise BenchmarkError(f'--order must be balanced or random, got '
                             f'{order!r}')


def run_benchmark(archs: Sequence[Tuple[str, Union[str, dict]]],
                  sizes: Sequence[Tuple[int, int]],
                  batch_sizes: Sequence[int],
                  forms: Sequence[str] = DEFAULT_FORMS,
                  repeats: int = 24,
                  warmup: int = 3,
                  settle: int = 1,
                  order: str = 'balanced',
                  device: str = 'cpu',
                  channels_last: bool = False,
                  compile: bool = False,
                  ort_spinning: bool = False,
                  tolerance: float = 0.15,
                  log: Callable[[str], None] = print) -> List[dict]:
    """Benchmark every (arch, size, batch); returns one dict per row.

    Args:
        archs (Sequence[tuple]): ``(label, arch)`` pairs
            (:func:`.options.parse_arch`).
        sizes (Sequence[tuple]): input ``(H, W)``.
        batch_sizes (Sequence[int]): batch sizes.
        forms (Sequence[str]): forms to time (:data:`.options.ALL_FORMS`).
        repeats (int): timed rounds per row.
        warmup (int): untimed rounds per row first.
        settle (int): untimed calls of a form before each timed call.
        order (str): ``balanced`` or ``random`` order of forms per round.
        device (str): ``cpu`` or ``cuda[:N]``.
        channels_last (bool): PyTorch models and inputs in channels_last.
        compile (bool): ``torch.compile`` the PyTorch forms.
        ort_spinning (bool): onnxruntime threads busy-wait between runs.
        tolerance (float): a round slower than the median round by more
            than this fraction is disturbed.
        log (callable): progress lines.

    Returns:
        list[dict]: rows with ``latency_ms``, ``throughput``, ``ratios``,
        ``params``, ``peak_bytes``, ``accuracy``, ``rounds`` and the raw
        ``times_ms``.

    Raises:
        BenchmarkError: bad options, or a float32 form that does not compute
            the training form's function.
    """
    forms = parse_forms(forms)
    check_row_options(repeats, warmup, settle, batch_sizes, order)
    dev = check_device_options(device, forms)
    if compile and warmup < 1:
        log('note: --compile: warmup raised to 1 (compilation happens on '
            'the first call)')
        warmup = 1
    rows = []
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dev.type == 'cuda'
    try:
        for label, arch in archs:
            rows += _bench_arch(label, arch, sizes, batch_sizes, forms, dev,
                                repeats, warmup, settle, order,
                                channels_last, compile, ort_spinning,
                                tolerance, log)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return rows


def _bench_arch(label, arch, sizes, batch_sizes, forms, dev, repeats, warmup,
                settle, order, channels_last, compile, ort_spinning,
                tolerance, log) -> List[dict]:
    from .onnx_forms import OrtForms, ort_threads
    base = {k: _prepare(m, dev, torch.float32, channels_last)
            for k, m in build_forms(arch).items()}
    params = {k: count_params(m) for k, m in base.items()}
    if params['deploy'] != params['reference']:
        raise BenchmarkError(f'{label}: reference has {params["reference"]} '
                             f'parameters, deploy {params["deploy"]}')
    torch_models: Dict[str, nn.Module] = {}
    for form in forms:
        if form in ('training', 'deploy', 'reference'):
            torch_models[form] = base[form]
        elif form in LOW_PRECISION:
            torch_models[form] = copy.deepcopy(base['deploy']).to(
                dtype=LOW_PRECISION[form])
    ort = None
    if any(f in ORT_FORMS for f in forms):
        ort = OrtForms(copy.deepcopy(base['deploy']).cpu(), sizes,
                       [f for f in forms if f in ORT_FORMS], ort_threads(),
                       spinning=ort_spinning)
        for line in _ort_lines(ort):
            log(line)
    try:
        accuracy = {hw: _check(label, hw, base, torch_models, ort, forms,
                               dev, channels_last, log) for hw in sizes}
        calls = {k: (torch.compile(m, dynamic=False) if compile else m)
                 for k, m in torch_models.items()}
        rows = []
        for hw in sizes:
            for batch in batch_sizes:
                row = bench_row(calls, ort, forms, batch, hw, dev,
                                channels_last, repeats, warmup, settle,
                                order, tolerance)
                row.update(arch=label, params=dict(
                    training=params['training'], deploy=params['deploy']),
                    accuracy=accuracy[hw])
                if ort is not None and 'ort-int8' in ort.info:
                    row['int8_graph'] = dict(
                        config=ort.info['ort-int8']['config'],
                        optimized_ops=dict(
                            ort.info['ort-int8']['optimized_ops']))
                rows.append(row)
                log(row_line(row))
    finally:
        if ort is not None:
            ort.close()
    return rows


def _ort_lines(ort) -> List[str]:
    from .onnx_forms import describe_ops
    return [ln for info in ort.info.values() for ln in describe_ops(info)]


def _check(label, hw, base, torch_models, ort, forms, dev, channels_last,
           log) -> dict:
    """Float32-noise verdicts of the float32 forms and the error of the
    lossy ones, at batch 1; returns ``form -> accuracy dict``."""
    name = f'{label} {hw[0]}x{hw[1]}'
    x = make_input(1, hw, dev, torch.float32, channels_last)
    truth, ref = float32_noise(base['training'], x)
    out: Dict[str, dict] = {}
    with torch.inference_mode():
        for form in forms:
            if form in torch_models and form != 'training':
                m = torch_models[form]
                cand = _flat(m(x.to(_dtype(m))))
            elif ort is not None and form in ORT_FORMS:
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
    parts = []
    for form, a in out.items():
        if a['kind'] == 'fp32':
            parts.append(f'{form} {a["error"]:.2g} ({a["ratio"]:.2f}x noise)')
        else:
            parts.append(f'{form} SQNR {a["sqnr_db"]:.1f} dB')
    noise = max(
        (a['noise'] for a in out.values() if a['kind'] == 'fp32'),
        default=None)
    log(f'check {name}: error vs float64 truth: ' + ', '.join(parts) +
        (f'; training float32 noise {noise:.2g}' if noise is not None
         else ''))
    return out


def _flat(outs) -> Dict[str, torch.Tensor]:
    from mmrepvgg.deploy.verify import flatten_outputs
    return {k: v.float().cpu() for k, v in flatten_outputs(outs).items()}


def bench_row(calls: Dict[str, nn.Module],
              ort,
              forms: Sequence[str],
              batch: int,
              hw: Tuple[int, int],
              dev: torch.device,
              channels_last: bool,
              repeats: int,
              warmup: int,
              settle: int = 1,
              order: str = 'balanced',
              tolerance: float = 0.15) -> dict:
    """Latency, throughput, ratios and peak memory of the forms on one
    input (see :func:`run_benchmark`)."""
    x = make_input(batch, hw, dev, torch.float32, channels_last)
    xs = {k: x.to(_dtype(m)) for k, m in calls.items()}
    fns = {}
    for form in forms:
        if form in calls:
            fns[form] = (lambda m=calls[form], xi=xs[form]: m(xi))
        elif ort is not None and form in ORT_FORMS:
            fns[form] = ort.callable(
                form, x.float().cpu().contiguous().numpy())
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' \
        else None
    threads = torch.get_num_threads() if dev.type == 'cpu' else 1
    with torch.inference_mode():
        t = measure(fns, repeats, warmup, settle=settle, order=order,
                    sync=sync, threads=threads, tolerance=tolerance)
    lat = {k: t.median(k) for k in t.times}
    ratios = {ratio_name(a, b): t.ratio(a, b) for a, b in RATIO_PAIRS
              if a in t.times and b in t.times}
    peak = {}
    for form in forms:
        if form in calls:
            peak[form] = peak_activation_bytes(calls[form], xs[form])
        else:
            peak[form] = None
    others = [r['others_cpu'] / r['wall'] for r in t.rounds
              if r['others_cpu'] is not None and r['wall'] > 0]
    return dict(
        height=hw[0], width=hw[1], batch=batch, forms=list(forms),
        latency_ms={k: v * 1e3 for k, v in lat.items()},
        throughput={k: batch / v for k, v in lat.items()},
        ratios=ratios, peak_bytes=peak,
        rounds=dict(total=len(t.reasons), kept=len(t.kept),
                    dropped=t.disturbed, busy=t.busy, reasons=t.reasons,
                    own_cores=[r['own_cpu'] / r['wall'] if r['wall'] else 0
                               for r in t.rounds],
                    others_cores_median=statistics.median(others)
                    if others else None),
        order_effect=predecessor_effect(t.times, t.orders, t.kept),
        settle=settle, order=order, threads=threads,
        times_ms={k: [x * 1e3 for x in v] for k, v in t.times.items()},
        orders=[list(o) for o in t.orders])


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


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
