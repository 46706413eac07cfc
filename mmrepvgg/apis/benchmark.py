"""Speed and memory benchmark behind ``tools/benchmark.py``.

Three forms of one RepVGG backbone are compared on the same input:

``training``
    the multi-branch form (3x3 conv+BN, 1x1 conv+BN, identity BN), in eval
    mode;
``deploy``
    the same model after :func:`mmrepvgg.deploy.switch_to_deploy`
    (``RepVGGBlock`` modules holding one fused ``conv_reparam`` each);
``reference``
    the *physical* reference: :func:`build_reference` copies the deploy
    weights into hand-built ``nn.Sequential`` stages of plain ``nn.Conv2d``
    and activation modules (plus the SE as plain modules for SE archs), i.e.
    what a hand-written VGG-style network with the fused weights would run.

The deploy form should cost what the reference costs (same convolutions,
only the module wrappers differ); the training form shows what fusion saves.
Before any timing, deploy and reference are checked to give the same outputs
(relative error <= 1e-6 on random weights, :func:`mmrepvgg.testing.randomize_`)
so that the comparison is between equal functions.

Timing: every row runs the three forms interleaved under
``torch.inference_mode()``, one call of each per round, the rounds cycling
through the six orders of :func:`balanced_schedule` (a fixed order favoured
the form timed right after the training form), ``warmup`` untimed rounds
first, and reports the median of ``repeats`` timed rounds
(CUDA: CUDA events after ``torch.cuda.synchronize()``). The ratios
deploy/reference and training/deploy are the medians of the per-round ratios
(:func:`paired_ratio`), which cancels load drift between rounds.

Peak activation memory: on CUDA ``torch.cuda.max_memory_allocated()`` minus
the memory allocated before the forward (weights and input excluded). On CPU
one forward runs under ``torch.profiler`` with ``profile_memory=True``; the
profiler records every allocation and free of PyTorch's CPU allocator
(``[memory]`` events with a signed byte count); the peak is the maximum of
their running sum in time order. It counts every tensor the forward allocates
(activations, outputs, im2col/reorder buffers made through PyTorch's
allocator), not the weights nor the input; buffers that oneDNN allocates
internally, outside PyTorch's allocator, are not seen.
"""
import copy
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from mmrepvgg.deploy import atomic_write, switch_to_deploy
from mmrepvgg.testing import randomize_, relative_error
from mmrepvgg.utils.cli import ToolError

FORMS = ('training', 'deploy', 'reference')
#: deploy/reference outputs must agree to this relative error.
EQUIVALENCE_TOL = 1e-6
#: targets checked (PASS/MISS) on the results.
TARGET_DEPLOY_REF = 1.02
TARGET_TRAIN_DEPLOY = 1.3

COLUMNS = ('arch', 'input', 'batch', 'training ms', 'deploy ms',
           'reference ms', 'training img/s', 'deploy img/s',
           'reference img/s', 'deploy/reference', 'training/deploy',
           'params training', 'params deploy', 'peak MiB training',
           'peak MiB deploy')


class BenchmarkError(ToolError):
    """Bad option or failed check; the message names the argument."""


# ------------------------------------------------------------------ parsing
def parse_arch(spec: str, index: int = 0) -> Tuple[str, Union[str, dict]]:
    """``(label, arch)`` of one ``--archs`` item: a published name (A0 ...)
    or a JSON arch dict, optionally with a ``"name"`` key for the label."""
    from mmrepvgg.models.backbones.repvgg import ARCH_SETTINGS, resolve_arch
    spec = spec.strip()
    if spec.startswith('{'):
        try:
            arch = json.loads(spec)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f'--archs: invalid JSON arch {spec!r} ({e})')
        if not isinstance(arch, dict):
            raise BenchmarkError(f'--archs: {spec!r} is not a JSON object')
        label = str(arch.pop('name', f'custom{index}'))
        for key in ('num_blocks', 'width_factor'):
            if isinstance(arch.get(key), list):
                arch[key] = tuple(arch[key])
        if isinstance(arch.get('group_layer_map'), dict):
            arch['group_layer_map'] = {
                int(k): v for k, v in arch['group_layer_map'].items()}
    else:
        if spec not in ARCH_SETTINGS:
            raise BenchmarkError(
                f'--archs: unknown arch {spec!r}; choose from '
                f'{", ".join(ARCH_SETTINGS)} or pass a JSON arch dict')
        label, arch = spec, spec
    try:
        resolve_arch(arch)
    except ValueError as e:
        raise BenchmarkError(f'--archs: {label}: {e}')
    return label, arch


def parse_size(spec: str) -> Tuple[int, int]:
    """``'224'`` -> (224, 224); ``'480x640'`` -> (480, 640) (H x W)."""
    parts = str(spec).lower().split('x')
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise BenchmarkError(f'--sizes: {spec!r} is not a size (N or HxW, '
                             'positive integers)')
    return hw


# ---------------------------------------------------------------- reference
class PlainSE(nn.Module):
    """Squeeze-excitation from plain modules: ``x * gate(pool(x))``."""

    def __init__(self, pool: nn.Module, squeeze: nn.Module,
                 squeeze_act: nn.Module, excite: nn.Module,
                 excite_act: nn.Module) -> None:
        super().__init__()
        self.pool, self.squeeze, self.squeeze_act = pool, squeeze, squeeze_act
        self.excite, self.excite_act = excite, excite_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.squeeze_act(self.squeeze(self.pool(x)))
        return x * self.excite_act(self.excite(gate))


class PlainReference(nn.Module):
    """Stages of plain ``nn.Sequential(Conv2d, act, Conv2d, act, ...)``.

    The stem is the head of the first stage; ``forward`` returns the outputs
    of the stages in ``out_indices``, like :class:`RepVGG`.
    """

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


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                    stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None,
                    padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        # Own storage (a clone), in the same memory format as the source.
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and \
            not conv.weight.is_contiguous():
        new.to(memory_format=torch.channels_last)
    return new


def plain_block(block: nn.Module) -> List[nn.Module]:
    """Plain modules computing a deploy-form ``RepVGGBlock``:
    ``[Conv2d, (PlainSE,) act]``."""
    if not getattr(block, 'deploy', False) or not hasattr(
            block, 'conv_reparam'):
        raise ValueError(f'{type(block).__name__} is not in deploy form: '
                         'call switch_to_deploy first')
    mods: List[nn.Module] = [_plain_conv(block.conv_reparam)]
    se = block.se
    if not isinstance(se, nn.Identity):
        mods.append(PlainSE(copy.deepcopy(se.pool),
                            _plain_conv(se.squeeze),
                            copy.deepcopy(se.squeeze_act),
                            _plain_conv(se.excite),
                            copy.deepcopy(se.excite_act)))
    if not isinstance(block.act, nn.Identity):
        mods.append(copy.deepcopy(block.act))
    return mods


def build_reference(backbone: nn.Module) -> PlainReference:
    """Hand-built plain network holding exactly the weights of a deploy-form
    :class:`RepVGG` backbone (own copies; same device, dtype, layout)."""
    stages = []
    for i, name in enumerate(backbone.stage_names):
        mods = plain_block(backbone.stem) if i == 0 else []
        for block in getattr(backbone, name):
            mods.extend(plain_block(block))
        stages.append(nn.Sequential(*mods))
    return PlainReference(stages, backbone.out_indices).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_forms(arch: Union[str, dict], seed: int = 0,
                **backbone_kwargs) -> Dict[str, nn.Module]:
    """``{'training', 'deploy', 'reference'}`` forms of one backbone with
    random weights and batch-norm statistics (float32, CPU, eval mode)."""
    from mmrepvgg.models import RepVGG
    training = RepVGG(arch=arch, **backbone_kwargs)
    randomize_(training, seed=seed)
    training.eval()
    deploy = switch_to_deploy(training, inplace=False, verbose=False)
    reference = build_reference(deploy)
    return dict(training=training, deploy=deploy, reference=reference)


@torch.inference_mode()
def max_relative_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest :func:`relative_error` over the outputs of ``a`` and ``b``."""
    outs_a, outs_b = a(x), b(x)
    if len(outs_a) != len(outs_b):
        raise BenchmarkError(f'{len(outs_a)} vs {len(outs_b)} outputs')
    worst = 0.0
    for oa, ob in zip(outs_a, outs_b):
        if oa.shape != ob.shape:
            raise BenchmarkError(f'output shapes differ: {tuple(oa.shape)} vs '
                                 f'{tuple(ob.shape)}')
        worst = max(worst, relative_error(oa, ob))
    return worst


# ------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_once(fn: Callable, x: torch.Tensor) -> float:
    """Seconds of one call ``fn(x)`` (CUDA events on GPU)."""
    if x.device.type == 'cuda':
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(x.device)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def balanced_schedule(names: Sequence[str]) -> List[Tuple[str, ...]]:
    """Orders of the rounds: every permutation of ``names`` once, arranged so
    that, run back to back (cyclically), every form is timed right after
    every other form equally often and never right after itself.

    A fixed ``A B C A B C`` order is biased: on CPU the form timed right
    after the (larger) training form ran a few percent faster than the same
    computation timed elsewhere in the round (measured on A0 640x640). With
    this schedule, ``repeats`` a multiple of ``len(names)!`` (6 for three
    forms) balances positions and predecessors exactly. Falls back to a
    simple rotation for more than four forms.
    """
    import itertools
    names = tuple(names)
    if len(names) <= 1:
        return [names]
    if len(names) > 4:
        return [names[i:] + names[:i] for i in range(len(names))]
    perms = list(itertools.permutations(names))
    best, best_score = perms, None
    first, rest = perms[0], perms[1:]
    for tail in itertools.permutations(rest):
        order = (first, ) + tail
        seq = [n for p in order for n in p]
        pairs: Dict[Tuple[str, str], int] = {}
        for i in range(len(seq)):
            key = (seq[i - 1], seq[i])
            pairs[key] = pairs.get(key, 0) + 1
        selfs = sum(v for (a, b), v in pairs.items() if a == b)
        counts = [pairs.get((a, b), 0) for a in names for b in names
                  if a != b]
        score = (selfs, max(counts) - min(counts))
        if best_score is None or score < best_score:
            best, best_score = list(order), score
            if score == (0, 0):
                break
    return best


def time_interleaved(fns: Dict[str, Callable], x: torch.Tensor, repeats: int,
                     warmup: int) -> Dict[str, List[float]]:
    """Time every ``fns[name](x)`` interleaved, one call of each form per
    round, the order of the rounds following :func:`balanced_schedule`:
    ``warmup`` untimed rounds, then ``repeats`` timed ones (starting again
    from the schedule's first order). Returns seconds per call, per form, in
    round order."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    schedule = balanced_schedule(list(fns))
    with torch.inference_mode():
        for i in range(warmup):
            for name in schedule[i % len(schedule)]:
                fns[name](x)
        _sync(x.device)
        for i in range(repeats):
            for name in schedule[i % len(schedule)]:
                times[name].append(time_once(fns[name], x))
    return times


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``.

    Both forms of a round ran back to back, so a change of machine load
    between rounds cancels in each ratio; the median of the ratios is then
    steadier than the ratio of the medians on a shared machine.
    """
    return statistics.median(x / y for x, y in zip(a, b))


# ------------------------------------------------------------------ memory
@contextmanager
def _quiet_native_stderr():
    """Silence the profiler's native start/stop lines on file descriptor 2
    (Python's own ``sys.stderr`` writes are flushed first and unaffected
    afterwards)."""
    import sys
    try:
        sys.stderr.flush()
        fd = sys.__stderr__.fileno()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_from_memory_events(events: Sequence[Tuple[int, int]]) -> int:
    """Peak of the running sum of ``(time, signed bytes)`` events."""
    peak = running = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_activation_bytes(fn: Callable, x: torch.Tensor) -> int:
    """Peak bytes allocated by one forward ``fn(x)`` under inference mode
    (see the module docstring for the method on CPU and CUDA)."""
    if x.device.type == 'cuda':
        with torch.inference_mode():
            torch.cuda.synchronize(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            base = torch.cuda.memory_allocated(x.device)
            out = fn(x)
            torch.cuda.synchronize(x.device)
            peak = torch.cuda.max_memory_allocated(x.device) - base
            del out
        return max(0, peak)
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), _quiet_native_stderr():
        with profile(activities=[ProfilerActivity.CPU],
                     profile_memory=True) as prof:
            out = fn(x)
            del out
    events = [(e.start_ns(), e.nbytes())
              for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and e.device_type().name == 'CPU']
    return peak_from_memory_events(events)


# -------------------------------------------------------------- the run
def check_device_options(device: str, dtype: torch.dtype) -> torch.device:
    """Refuse device/dtype combinations this machine cannot run."""
    if device not in ('cpu', 'cuda') and not device.startswith('cuda:'):
        raise BenchmarkError(f'--device: {device!r} is not cpu or cuda[:N]')
    dev = torch.device(device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise BenchmarkError(f'--device {device}: CUDA is not available '
                             f'(torch {torch.__version__})')
    if dtype == torch.float16 and dev.type != 'cuda':
        raise BenchmarkError('--half needs --device cuda: float16 '
                             'convolutions on CPU are emulated, not a '
                             'deployment setting (try --bf16 on a CPU with '
                             'native bfloat16)')
    if dtype == torch.bfloat16:
        if dev.type == 'cuda' and not torch.cuda.is_bf16_supported():
            raise BenchmarkError(f'--bf16: {torch.cuda.get_device_name(dev)}'
                                 ' has no bfloat16 support')
        if dev.type == 'cpu' and not _cpu_has_bf16():
            raise BenchmarkError('--bf16: this CPU has no native bfloat16 '
                                 '(oneDNN reports no avx512_bf16/amx '
                                 'support)')
    return dev


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype,
             channels_last: bool) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def make_input(batch: int, hw: Tuple[int, int], device: torch.device,
               dtype: torch.dtype = torch.float32, channels_last: bool = False,
               seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *hw, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def run_benchmark(archs: Sequence[Tuple[str, Union[str, dict]]],
                  sizes: Sequence[Tuple[int, int]],
                  batch_sizes: Sequence[int],
                  repeats: int = 24,
                  warmup: int = 3,
                  device: str = 'cpu',
                  dtype: torch.dtype = torch.float32,
                  channels_last: bool = False,
                  compile: bool = False,
                  log: Callable[[str], None] = print) -> List[dict]:
    """Benchmark every (arch, size, batch); returns one dict per row.

    Raises:
        BenchmarkError: bad options, or deploy and reference disagree.
    """
    if repeats < 1:
        raise BenchmarkError(f'--repeats must be >= 1, got {repeats}')
    if warmup < 0:
        raise BenchmarkError(f'--warmup must be >= 0, got {warmup}')
    if not batch_sizes or min(batch_sizes) < 1:
        raise BenchmarkError(f'--batch-sizes must be >= 1, got '
                             f'{list(batch_sizes)}')
    dev = check_device_options(device, dtype)
    if compile and warmup < 1:
        log('note: --compile: warmup raised to 1 (compilation happens on '
            'the first call)')
        warmup = 1
    rows = []
    # CUDA: autotuned conv algorithms (fixed shapes per row; the warm-up
    # absorbs the search; deploy and reference share the cache keys).
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dev.type == 'cuda'
    try:
        for label, arch in archs:
            forms = {k: _prepare(m, dev, torch.float32, channels_last)
                     for k, m in build_forms(arch).items()}
            params = {k: count_params(m) for k, m in forms.items()}
            if params['deploy'] != params['reference']:
                raise BenchmarkError(
                    f'{label}: reference has {params["reference"]} '
                    f'parameters, deploy {params["deploy"]}')
            # float32 checks, before any cast or compilation
            errors = {hw: check_equivalence(label, forms, hw, dev,
                                            channels_last, log)
                      for hw in sizes}
            if dtype != torch.float32:
                forms = {k: m.to(dtype=dtype) for k, m in forms.items()}
            fns = {k: (torch.compile(m, dynamic=False) if compile else m)
                   for k, m in forms.items()}
            for hw in sizes:
                for batch in batch_sizes:
                    x = make_input(batch, hw, dev, dtype, channels_last)
                    row = bench_row(fns, x, repeats, warmup)
                    row.update(arch=label, params=dict(
                        training=params['training'],
                        deploy=params['deploy']),
                        rel_err_deploy_reference=errors[hw])
                    rows.append(row)
                    log(_row_line(row))
            del forms, fns
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return rows


def check_equivalence(label: str, forms: Dict[str, nn.Module],
                      hw: Tuple[int, int], dev: torch.device,
                      channels_last: bool,
                      log: Callable[[str], None]) -> float:
    """Relative error deploy vs reference at ``hw`` (batch 1); raises
    :class:`BenchmarkError` above :data:`EQUIVALENCE_TOL`."""
    x = make_input(1, hw, dev, torch.float32, channels_last)
    err = max_relative_error(forms['deploy'], forms['reference'], x)
    if not err <= EQUIVALENCE_TOL:
        raise BenchmarkError(
            f'{label} {hw[0]}x{hw[1]}: deploy and reference outputs differ '
            f'(relative error {err:.3g} > {EQUIVALENCE_TOL:g}); the '
            'comparison would not be honest')
    log(f'check {label} {hw[0]}x{hw[1]}: deploy vs reference relative error '
        f'{err:.2g} (<= {EQUIVALENCE_TOL:g})')
    return err


def bench_row(fns: Dict[str, Callable], x: torch.Tensor, repeats: int,
              warmup: int) -> dict:
    """Latency, throughput, ratios and peak memory of the forms on ``x``."""
    times = time_interleaved(fns, x, repeats, warmup)
    lat = {k: statistics.median(v) for k, v in times.items()}
    batch = x.shape[0]
    return dict(
        height=x.shape[2], width=x.shape[3], batch=batch,
        latency_ms={k: v * 1e3 for k, v in lat.items()},
        throughput={k: batch / v for k, v in lat.items()},
        deploy_over_reference=paired_ratio(times['deploy'],
                                           times['reference']),
        training_over_deploy=paired_ratio(times['training'],
                                          times['deploy']),
        peak_bytes={k: peak_activation_bytes(fn, x) for k, fn in fns.items()},
        times_ms={k: [t * 1e3 for t in v] for k, v in times.items()})


def _row_line(row: dict) -> str:
    return (f'{_row_name(row)}: ' + ', '.join(
        f'{k} {row["latency_ms"][k]:.2f} ms' for k in FORMS) +
        f'; deploy/reference {row["deploy_over_reference"]:.3f}, '
        f'training/deploy {row["training_over_deploy"]:.2f}')


# ----------------------------------------------------------------- targets
def check_targets(rows: Sequence[dict], device: str) -> List[str]:
    """One ``PASS``/``MISS`` line per target and row (``N/A`` when a target
    has no row in this run)."""
    lines = []
    for r in rows:
        v = r['deploy_over_reference']
        lines.append(
            f'{"PASS" if v <= TARGET_DEPLOY_REF else "MISS"} '
            f'deploy/reference <= {TARGET_DEPLOY_REF:g}: {_row_name(r)}: '
            f'{v:.4f}')
    a0 = [r for r in rows if r['arch'] == 'A0' and r['height'] == 224
          and r['width'] == 224]
    if torch.device(device).type != 'cpu' or not a0:
        lines.append(f'N/A  training/deploy >= {TARGET_TRAIN_DEPLOY:g} for '
                     'A0 at 224x224 on CPU: no such row in this run')
    for r in a0 if torch.device(device).type == 'cpu' else []:
        v = r['training_over_deploy']
        lines.append(
            f'{"PASS" if v >= TARGET_TRAIN_DEPLOY else "MISS"} '
            f'training/deploy >= {TARGET_TRAIN_DEPLOY:g} (A0, 224, CPU): '
            f'{_row_name(r)}: {v:.2f}')
    return lines


def _row_name(r: dict) -> str:
    return f'{r["arch"]} {r["height"]}x{r["width"]} batch {r["batch"]}'


# ----------------------------------------------------------------- report
def _mib(n: int) -> str:
    return f'{n / 2**20:.1f}'


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows (:data:`COLUMNS`)."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |',
             '|' + '|'.join(['---'] * 3 + ['---:'] * (len(COLUMNS) - 3)) +
             '|']
    for r in rows:
        lat, thr = r['latency_ms'], r['throughput']
        cells = [r['arch'], f'{r["height"]}x{r["width"]}', str(r['batch'])]
        cells += [f'{lat[k]:.2f}' for k in FORMS]
        cells += [f'{thr[k]:.1f}' for k in FORMS]
        cells += [f'{r["deploy_over_reference"]:.3f}',
                  f'{r["training_over_deploy"]:.2f}',
                  f'{r["params"]["training"]:,}',
                  f'{r["params"]["deploy"]:,}',
                  _mib(r['peak_bytes']['training']),
                  _mib(r['peak_bytes']['deploy'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> Dict[str, str]:
    env = {
        'torch': torch.__version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'cpu': f'{cpu_name()} ({os.cpu_count()} logical CPUs, capability '
               f'{_cpu_capability()})',
        'torch threads': str(torch.get_num_threads()),
    }
    if torch.device(device).type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(torch.device(device))
        env['cuda'] = str(torch.version.cuda)
        env['cudnn'] = str(torch.backends.cudnn.version())
    return env


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return 'unknown'


def format_markdown(rows: Sequence[dict], command: str,
                    settings: Dict[str, str], env: Dict[str, str],
                    targets: Sequence[str]) -> str:
    out = ['# RepVGG backbone benchmark: training vs deploy vs reference', '',
           '```', command, '```', '']
    for k, v in list(env.items()) + list(settings.items()):
        out.append(f'- {k}: {v}')
    out += ['',
            'Latency is the median over the timed repeats of one forward of '
            'the backbone (all four stage outputs) under '
            '`torch.inference_mode()`, the three forms interleaved (rounds '
            'cycling through the 6 orders, balanced predecessors); the '
            'ratios are medians of the per-round ratios. '
            '*reference* is a hand-built stack of plain `nn.Conv2d` + '
            'activation holding the deploy weights (checked equal to the '
            f'deploy form, relative error <= {EQUIVALENCE_TOL:g}). '
            'Peak MiB: activation memory of one forward (CUDA: '
            '`max_memory_allocated` above the resident weights; CPU: peak of '
            'the running sum of the allocator events recorded by '
            '`torch.profiler(profile_memory=True)`).', '',
            format_table(rows), '', '## Targets', '']
    out += [f'- {t}' for t in targets]
    return '\n'.join(out) + '\n'


def plot(rows: Sequence[dict], title: str) -> bytes:
    """PNG bytes of grouped bars: latency of the three forms per (arch,
    size, batch), log scale, labelled with the training/deploy speed-up."""
    import io

    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * n + 2), 4.5))
    width = 0.27
    colors = dict(training='#d95f02', deploy='#1b9e77', reference='#7570b3')
    for i, form in enumerate(FORMS):
        xs = [j + (i - 1) * width for j in range(n)]
        ax.bar(xs, [r['latency_ms'][form] for r in rows], width,
               label=form, color=colors[form])
    for j, r in enumerate(rows):
        top = max(r['latency_ms'].values())
        ax.annotate(f'x{r["training_over_deploy"]:.2f}', (j, top),
                    xytext=(0, 3), textcoords='offset points', ha='center',
                    fontsize=7)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f'{r["arch"]}\n{r["height"]}x{r["width"]}\n'
                        f'b{r["batch"]}' for r in rows], fontsize=8)
    ax.set_yscale('log')
    ax.set_ylabel('latency per batch (ms, log scale)')
    ax.set_title(title + '\n(label: training/deploy speed-up)', fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(rows: Sequence[dict], out_dir: str, markdown: str,
                 title: str) -> Dict[str, str]:
    """Write ``benchmark.md``, ``benchmark.png`` and ``benchmark.json``
    into ``out_dir`` (each atomically, after all three are rendered);
    returns their paths."""
    contents = dict(png=plot(rows, title),
                    json=json.dumps(list(rows), indent=1).encode(),
                    md=markdown.encode())
    paths = {}
    for ext, data in contents.items():
        paths[ext] = os.path.join(out_dir, f'benchmark.{ext}')

        def write(tmp, data=data):
            with open(tmp, 'wb') as f:
                f.write(data)
        atomic_write(paths[ext], write)
    return paths


def summary_title(device: str, dtype: torch.dtype, channels_last: bool,
                  compile: bool) -> str:
    parts = [device, str(dtype).replace('torch.', '')]
    if channels_last:
        parts.append('channels_last')
    if compile:
        parts.append('torch.compile')
    return 'RepVGG backbone latency (' + ', '.join(parts) + ')'


def dtype_from_flags(half: bool, bf16: bool) -> torch.dtype:
    if half and bf16:
        raise BenchmarkError('--half and --bf16 are mutually exclusive')
    return torch.float16 if half else torch.bfloat16 if bf16 else \
        torch.float32
