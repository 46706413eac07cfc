"""Targets, tables, chart and files of a benchmark run."""
import io
import json
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mmrepvgg.utils.fileio import atomic_write_all, check_output_paths
from .options import ALL_FORMS, BenchmarkError
from .run import RATIO_PAIRS, ratio_name, row_name

#: Targets checked (PASS/MISS) on the results.
TARGET_DEPLOY_REF = 1.02
TARGET_TRAIN_DEPLOY = 1.3
TARGET_INT8_FP32 = 0.4
#: The fastest INT8 form and the fastest true-float32 form, over eager
#: deploy (issue 18; A0 at 224x224 on CPU).
TARGET_INT8_DEPLOY = 0.15
TARGET_FP32_DEPLOY = 0.5
INT8_FORMS = ('ort-int8', 'ov-int8')
FAST_FP32_FORMS = ('compile', 'ort-fp32', 'ov-fp32')

FORM_COLORS = {'training': '#d95f02', 'deploy': '#1b9e77',
               'reference': '#7570b3', 'deploy-bf16': '#66a61e',
               'deploy-fp16': '#a6761d', 'ort-fp32': '#e7298a',
               'ort-int8': '#e6ab02', 'compile': '#666666',
               'ov-fp32': '#1f78b4', 'ov-int8': '#a6cee3',
               'ov-bf16': '#b15928'}


# ----------------------------------------------------------------- targets
def check_targets(rows: Sequence[dict], device: str) -> List[str]:
    """One ``PASS``/``MISS`` line per target and row (``N/A`` when a target
    has no row in this run). A row whose rounds were mostly disturbed is
    marked ``(busy machine)``.

    Targets: deploy/reference <= 1.02 (every row); training/deploy >= 1.3,
    onnxruntime INT8/FP32 <= 0.4, the fastest INT8 form <= 0.15 of deploy
    and the fastest float32 form (compile, ort-fp32, ov-fp32; not bfloat16)
    <= 0.5 of deploy (A0 at 224x224 on CPU).
    """
    cpu = torch.device(device).type == 'cpu'
    lines = []

    def line(ok: bool, text: str, r: dict, v: float, fmt: str) -> str:
        busy = ' (busy machine: most rounds disturbed)' if \
            r['rounds']['busy'] else ''
        return (f'{"PASS" if ok else "MISS"} {text}: {row_name(r)}: '
                f'{v:{fmt}}{busy}')

    key = ratio_name('deploy', 'reference')
    for r in rows:
        if key in r['ratios']:
            v = r['ratios'][key]['median']
            lines.append(line(v <= TARGET_DEPLOY_REF,
                              f'deploy/reference <= {TARGET_DEPLOY_REF:g}',
                              r, v, '.4f'))
    a0 = [r for r in rows if r['arch'] == 'A0' and r['height'] == 224
          and r['width'] == 224] if cpu else []
    for (a, b), target, better in (
            (('training', 'deploy'), TARGET_TRAIN_DEPLOY, 'ge'),
            (('ort-int8', 'ort-fp32'), TARGET_INT8_FP32, 'le')):
        key = ratio_name(a, b)
        have = [r for r in a0 if key in r['ratios']]
        op = '>=' if better == 'ge' else '<='
        text = f'{key} {op} {target:g} (A0, 224, CPU)'
        if not have:
            if any(key in r['ratios'] for r in rows) or a == 'training':
                lines.append(f'N/A  {text}: no such row in this run')
            continue
        for r in have:
            v = r['ratios'][key]['median']
            ok = v >= target if better == 'ge' else v <= target
            lines.append(line(ok, text, r, v, '.3f'))
    for kind, group, target in (('INT8', INT8_FORMS, TARGET_INT8_DEPLOY),
                                ('float32', FAST_FP32_FORMS,
                                 TARGET_FP32_DEPLOY)):
        for r in a0:
            have = {f: r['ratios'][ratio_name(f, 'deploy')]['median']
                    for f in group if ratio_name(f, 'deploy') in r['ratios']}
            if have:
                best = min(have, key=have.get)
                lines.append(line(
                    have[best] <= target, f'fastest {kind} form/deploy <= '
                    f'{target:g} (A0, 224, CPU; {best})', r, have[best],
                    '.3f'))
    return lines


# ------------------------------------------------------------------ tables
def _mib(n: Optional[int]) -> str:
    return 'n/a' if n is None else f'{n / 2**20:.1f}'


def table_forms(rows: Sequence[dict]) -> List[str]:
    """Forms present in any row, in :data:`ALL_FORMS` order."""
    have = {f for r in rows for f in r['latency_ms']}
    return [f for f in ALL_FORMS if f in have]


def table_ratios(rows: Sequence[dict]) -> List[str]:
    have = {k for r in rows for k in r['ratios']}
    return [ratio_name(a, b) for a, b in RATIO_PAIRS
            if ratio_name(a, b) in have]


def columns(rows: Sequence[dict]) -> List[str]:
    """Header of :func:`format_table` for these rows."""
    forms = table_forms(rows)
    cols = ['arch', 'input', 'batch'] + [f'{f} ms' for f in forms]
    cols += [f'{f} img/s' for f in ('deploy', 'ort-int8') if f in forms]
    cols += table_ratios(rows)
    if any(r.get('compile_s') for r in rows):
        cols.append('compile s')
    cols += ['params training', 'params deploy']
    cols += [f'peak MiB {f}' for f in ('training', 'deploy') if f in forms]
    cols.append('rounds used')
    return cols


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows (:func:`columns`)."""
    cols = columns(rows)
    forms = table_forms(rows)
    ratios = table_ratios(rows)
    lines = ['| ' + ' | '.join(cols) + ' |',
             '|' + '|'.join(['---'] * 3 + ['---:'] * (len(cols) - 3)) + '|']
    for r in rows:
        lat, thr = r['latency_ms'], r['throughput']
        cells = [r['arch'], f'{r["height"]}x{r["width"]}', str(r['batch'])]
        cells += [f'{lat[f]:.2f}' if f in lat else '' for f in forms]
        cells += [f'{thr[f]:.1f}' if f in thr else ''
                  for f in ('deploy', 'ort-int8') if f in forms]
        cells += [_ratio_cell(r['ratios'].get(k)) for k in ratios]
        if 'compile s' in cols:
            cells.append(', '.join(f'{v:.1f}' for v in r.get(
                'compile_s', {}).values()))
        cells += [f'{r["params"]["training"]:,}',
                  f'{r["params"]["deploy"]:,}']
        cells += [_mib(r['peak_bytes'].get(f))
                  for f in ('training', 'deploy') if f in forms]
        rd = r['rounds']
        cells.append(f'{rd["kept"]}/{rd["total"]}' +
                     (' busy' if rd['busy'] else ''))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _ratio_cell(stats: Optional[dict]) -> str:
    if stats is None:
        return ''
    digits = 3 if stats['median'] < 10 else 1
    return f'{stats["median"]:.{digits}f}'


def format_accuracy(rows: Sequence[dict]) -> str:
    """Markdown table: per (arch, size) and form, the error against the
    training form in float64 (float32 forms: error, multiple of the training
    form's own float32 noise; lossy forms: SQNR)."""
    lines = ['| arch | input | form | precision | max rel err vs float64 | '
             'x float32 noise | SQNR dB |', '|---|---|---|---|---:|---:|---:|']
    seen = set()
    for r in rows:
        key = (r['arch'], r['height'], r['width'])
        if key in seen:
            continue
        seen.add(key)
        for form, a in r['accuracy'].items():
            if a['kind'] == 'fp32':
                cells = [f'{a["error"]:.2e}', f'{a["ratio"]:.2f}', '']
            else:
                cells = [f'{a["rel_err"]:.2e}', '', f'{a["sqnr_db"]:.1f}']
            prec = r.get('precision', {}).get(form, '')
            lines.append(f'| {r["arch"]} | {r["height"]}x{r["width"]} | '
                         f'{form} | {prec} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_rounds(rows: Sequence[dict]) -> List[str]:
    """Lines naming the rows with disturbed rounds and why."""
    out = []
    for r in rows:
        rd = r['rounds']
        if not rd['dropped']:
            continue
        why = sorted({x for x in rd['reasons'] if x})
        out.append(f'{row_name(r)}: {rd["dropped"]} of {rd["total"]} rounds '
                   f'disturbed ({"; ".join(why[:3])}' +
                   (' ...' if len(why) > 3 else '') + '): ' +
                   ('more than half, so all rounds are used (BUSY)'
                    if rd['busy'] else 'dropped from the medians'))
    return out


def format_order_effects(rows: Sequence[dict], top: int = 3) -> List[str]:
    """Per row, the largest order effects: a form's median time right after
    another form (before the settle calls) over its overall median."""
    out = []
    for r in rows:
        eff = [(abs(v - 1), form, pred, v)
               for form, d in r.get('order_effect', {}).items()
               for pred, v in d.items()]
        if not eff:
            continue
        eff.sort(reverse=True)
        text = ', '.join(f'{form} after {pred} {v:.3f}'
                         for _, form, pred, v in eff[:top])
        out.append(f'{row_name(r)} (settle {r["settle"]}): {text}')
    return out


# ------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The CPU flags that matter here (VNNI, BF16, AMX), from cpuinfo."""
    wanted = ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16',
              'amx_tile', 'amx_int8', 'amx_bf16')
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return ' '.join(w for w in wanted if w in flags) or \
                        'none of ' + ' '.join(wanted)
    except OSError:
        pass
    return 'unknown'


def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return 'unknown'


def environment(device: str) -> Dict[str, str]:
    """Versions, CPU and thread counts of this run."""
    env = {
        'torch': torch.__version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'cpu': f'{cpu_name()} ({os.cpu_count()} logical CPUs, capability '
               f'{_cpu_capability()}; flags: {cpu_features()})',
        'torch threads': str(torch.get_num_threads()),
    }
    from importlib.metadata import PackageNotFoundError, version
    for package in ('onnxruntime', 'openvino'):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            pass
    if torch.device(device).type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(torch.device(device))
        env['cuda'] = str(torch.version.cuda)
        env['cudnn'] = str(torch.backends.cudnn.version())
    return env


METHOD = (
    'Latency is the median over the undisturbed timed rounds of one forward '
    'of the backbone (all stage outputs; PyTorch under '
    '`torch.inference_mode()`). All forms run in every round, their order '
    'following a Williams design (every form at every position and after '
    'every other form equally often) or a random order, and every timed '
    'call follows `settle` untimed calls of the same form (the call right '
    'after another form is not representative). Rounds slower than the '
    'median round by more than the tolerance, or during which other '
    'processes used CPU time (`/proc/stat` minus this process), are '
    'dropped (all kept, and the row marked busy, when that is more than '
    'half). Ratios are medians of per-round ratios. *reference* is a '
    'hand-built stack of plain `nn.Conv2d` + activation holding the deploy '
    'weights; deploy, reference, compile, ort-fp32 and ov-fp32 are checked '
    'to be no further from the training form evaluated in float64 than 4x '
    'the training form\'s own float32 error (per output, the larger of its '
    'contiguous and channels_last runs: NHWC kernels round differently). '
    'ort-* forms: onnxruntime (CPU provider, '
    'graph optimization ORT_ENABLE_ALL, intra-op threads = torch threads, '
    'no spinning unless --ort-spinning); ort-int8 is the same graph '
    'statically quantized by `mmrepvgg.export.quantize` (calibrated on '
    'random inputs: the weights are random too). ov-* forms: OpenVINO '
    '(CPU plugin, NUM_STREAMS 1, LATENCY hint, INFERENCE_NUM_THREADS = '
    'torch threads) on the same two files, INFERENCE_PRECISION_HINT set '
    'explicitly (f32 for ov-fp32 and ov-int8, bf16 for ov-bf16) and read '
    'back from the compiled model. compile: the deploy form through '
    '`torch.compile` (Inductor, freezing, dynamic=False); its compilation '
    'happens before the rounds and is reported apart ("compile s"). Peak '
    'MiB: activation '
    'memory of one forward (CUDA: `max_memory_allocated` above the '
    'resident weights; CPU: peak of the running sum of the allocator '
    'events recorded by `torch.profiler(profile_memory=True)`; not measured '
    'for onnxruntime).')


def format_markdown(rows: Sequence[dict], command: str,
                    settings: Dict[str, str], env: Dict[str, str],
                    targets: Sequence[str]) -> str:
    """The whole ``benchmark.md``."""
    forms = table_forms(rows)
    out = [f'# RepVGG backbone benchmark: {", ".join(forms)}', '',
           '```', command, '```', '']
    for k, v in list(env.items()) + list(settings.items()):
        out.append(f'- {k}: {v}')
    out += ['', METHOD, '', format_table(rows), '']
    skipped = next((r['skipped'] for r in rows if r.get('skipped')), {})
    out += [f'Skipped: {form} ({why}).' for form, why in skipped.items()]
    out += ['## Accuracy of the forms', '', format_accuracy(rows), '']
    graph = next((r['int8_graph'] for r in rows if 'int8_graph' in r), None)
    if graph:
        ops = ', '.join(f'{k} {v}' for k, v in sorted(
            graph['optimized_ops'].items(), key=lambda kv: -kv[1]))
        out += [f'INT8 graph: {graph["config"]}; as onnxruntime runs it: '
                f'{ops}.', '']
    out += ['## Order effects', '',
            'Largest ratios of a form\'s median time right after another '
            'form (the call before its settle calls) to its median over all '
            'calls; 1.000 = no effect of the order (compare a run with '
            '`--settle 0`).', '']
    out += [f'- {ln}' for ln in format_order_effects(rows)] or ['- n/a']
    out += ['']
    rounds = format_rounds(rows)
    out += ['## Disturbed rounds', '']
    out += [f'- {ln}' for ln in rounds] or ['- none']
    out += ['', '## Targets', '']
    out += [f'- {t}' for t in targets]
    return '\n'.join(out) + '\n'


def plot(rows: Sequence[dict], title: str) -> bytes:
    """PNG bytes of grouped bars: latency of every form per (arch, size,
    batch), log scale, labelled with training/deploy and INT8/FP32."""
    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    forms = table_forms(rows)
    n, k = len(rows), len(forms)
    fig, ax = plt.subplots(figsize=(max(6.0, (0.25 * k + 0.6) * n + 2),
                                    4.8))
    width = 0.8 / k
    for i, form in enumerate(forms):
        xs = [j + (i - (k - 1) / 2) * width for j in range(n)]
        ax.bar(xs, [r['latency_ms'].get(form, 0) for r in rows], width,
               label=form, color=FORM_COLORS.get(form))
    for j, r in enumerate(rows):
        top = max(r['latency_ms'].values())
        parts = []
        for key, tag in (('training/deploy', 'fused x'),
                         ('ort-int8/ort-fp32', 'int8/fp32 ')):
            if key in r['ratios']:
                v = r['ratios'][key]['median']
                parts.append(f'{tag}{v:.2f}')
        ax.annotate('\n'.join(parts), (j, top), xytext=(0, 3),
                    textcoords='offset points', ha='center', fontsize=7)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f'{r["arch"]}\n{r["height"]}x{r["width"]}\n'
                        f'b{r["batch"]}' for r in rows], fontsize=8)
    ax.set_yscale('log')
    ax.set_ylabel('latency per batch (ms, log scale)')
    ax.set_title(title + '\n(labels: training/deploy speed-up, onnxruntime '
                 'INT8/FP32 latency)', fontsize=9)
    ax.legend(fontsize=7, ncol=min(k, 4))
    ax.margins(y=0.15)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=120)
    plt.close(fig)
    return buf.getvalue()


def report_paths(out_dir: str) -> Dict[str, str]:
    """The ``md``, ``png`` and ``json`` files :func:`write_report` writes
    into ``out_dir``, checked before any work: ``out_dir`` (or its nearest
    existing parent) is a folder, and no file is a folder or another one
    (:func:`mmrepvgg.utils.fileio.check_output_paths`).

    Raises:
        BenchmarkError: naming ``--out-dir`` or the file.
    """
    path = os.path.abspath(out_dir)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise BenchmarkError(f'--out-dir {out_dir}: {path} exists and is not '
                             'a folder')
    paths = {ext: os.path.join(out_dir, f'benchmark.{ext}')
             for ext in ('md', 'png', 'json')}
    check_output_paths([], list(paths.values()), BenchmarkError)
    return paths


def write_report(rows: Sequence[dict], out_dir: str, markdown: str,
                 title: str) -> Dict[str, str]:
    """Write ``benchmark.md``, ``benchmark.png`` and ``benchmark.json``
    into ``out_dir`` (:func:`report_paths`), all or none, after all three
    are rendered; returns their paths."""
    contents = dict(png=plot(rows, title),
                    json=json.dumps(list(rows), indent=1,
                                    default=str).encode(),
                    md=markdown.encode())
    paths = report_paths(out_dir)
    atomic_write_all([(paths[ext], lambda t, d=data: Path(t).write_bytes(d))
                      for ext, data in contents.items()])
    return paths
