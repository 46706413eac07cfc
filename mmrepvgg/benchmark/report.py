"""Targets, tables and files of a benchmark run."""
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from mmrepvgg.utils.fileio import atomic_write_all, check_output_paths
from .options import ALL_FORMS, BenchmarkError
from .run import RATIO_PAIRS, row_name

#: Targets checked (PASS/MISS): ``(ratio, op, target)``, all rows for the
#: first, A0 at 224x224 for the others; then the fastest form of a group
#: over deploy (issue 18).
TARGETS = (('deploy/reference', '<=', 1.02), ('training/deploy', '>=', 1.3),
           ('ort-int8/ort-fp32', '<=', 0.4))
FASTEST = (('INT8', ('ort-int8', 'ov-int8'), 0.15),
           ('float32', ('compile', 'ort-fp32', 'ov-fp32'), 0.5))


def check_targets(rows: Sequence[dict]) -> List[str]:
    """One ``PASS``/``MISS`` line per target and row (``N/A``: no row for a
    target), ``(busy machine)`` when most rounds of the row were disturbed.
    """

    def line(ok: bool, text: str, r: dict, v: float, digits: int = 3):
        busy = ' (busy machine: most rounds disturbed)' if \
            r['rounds']['busy'] else ''
        return (f'{"PASS" if ok else "MISS"} {text}: {row_name(r)}: '
                f'{v:.{digits}f}{busy}')

    lines = []
    a0 = [r for r in rows
          if (r['arch'], r['height'], r['width']) == ('A0', 224, 224)]
    for i, (key, op, target) in enumerate(TARGETS):
        text = f'{key} {op} {target:g}' + (' (A0, 224, CPU)' if i else '')
        have = [r for r in (a0 if i else rows) if key in r['ratios']]
        if i and not have and (key == 'training/deploy' or
                               any(key in r['ratios'] for r in rows)):
            lines.append(f'N/A  {text}: no such row in this run')
        for r in have:
            v = r['ratios'][key]['median']
            lines.append(line(v <= target if op == '<=' else v >= target,
                              text, r, v, 3 if i else 4))
    for kind, group, target in FASTEST:
        for r in a0:
            have = {f: r['ratios'][f'{f}/deploy']['median'] for f in group
                    if f'{f}/deploy' in r['ratios']}
            if have:
                best = min(have, key=have.get)
                lines.append(line(
                    have[best] <= target, f'fastest {kind} form/deploy <= '
                    f'{target:g} (A0, 224, CPU; {best})', r, have[best]))
    return lines


def _ratio_cell(stats: Optional[dict]) -> str:
    if stats is None:
        return ''
    return f'{stats["median"]:.{3 if stats["median"] < 10 else 1}f}'


def _columns(rows: Sequence[dict]) -> list:
    """``(header, cell of a row)`` of each column of the table."""
    forms = [f for f in ALL_FORMS if any(f in r['latency_ms'] for r in rows)]
    ratios = [f'{a}/{b}' for a, b in RATIO_PAIRS
              if any(f'{a}/{b}' in r['ratios'] for r in rows)]
    cols = [('arch', lambda r: r['arch']),
            ('input', lambda r: f'{r["height"]}x{r["width"]}'),
            ('batch', lambda r: str(r['batch']))]
    cols += [(f'{f} ms', lambda r, f=f: f'{r["latency_ms"][f]:.2f}'
              if f in r['latency_ms'] else '') for f in forms]
    cols += [(f'{f} img/s', lambda r, f=f: f'{r["throughput"][f]:.1f}'
              if f in r['throughput'] else '')
             for f in ('deploy', 'ort-int8') if f in forms]
    cols += [(k, lambda r, k=k: _ratio_cell(r['ratios'].get(k)))
             for k in ratios]
    if any(r.get('compile_s') for r in rows):
        cols.append(('compile s', lambda r: ', '.join(
            f'{v:.1f}' for v in r.get('compile_s', {}).values())))
    cols += [(f'params {k}', lambda r, k=k: f'{r["params"][k]:,}')
             for k in ('training', 'deploy')]
    cols.append(('rounds used', lambda r: '{kept}/{total}'.format(
        **r['rounds']) + (' busy' if r['rounds']['busy'] else '')))
    return cols


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows (:func:`_columns`)."""
    cols = _columns(rows)
    lines = ['| ' + ' | '.join(h for h, _ in cols) + ' |',
             '|' + '|'.join(['---'] * 3 + ['---:'] * (len(cols) - 3)) + '|']
    lines += ['| ' + ' | '.join(cell(r) for _, cell in cols) + ' |'
              for r in rows]
    return '\n'.join(lines)


def format_accuracy(rows: Sequence[dict]) -> str:
    """Markdown table: per (arch, size) and form, its precision and error
    against the training form in float64."""
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
            lines.append(f'| {r["arch"]} | {r["height"]}x{r["width"]} | '
                         f'{form} | {r["precision"][form]} | ' +
                         ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def environment() -> Dict[str, str]:
    """Versions, CPU (with the flags that matter here: VNNI, BF16, AMX) and
    thread count of this run."""
    wanted = ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16',
              'amx_tile', 'amx_int8', 'amx_bf16')
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            info = {k.strip(): v.strip() for k, v in (
                line.split(':', 1) for line in f if ':' in line)}
    except OSError:
        info = {}
    flags = set(info.get('flags', '').split())
    env = {
        'torch': torch.__version__,
        'python': platform.python_version(),
        'platform': platform.platform(),
        'cpu': f'{info.get("model name", platform.machine())} '
               f'({os.cpu_count()} logical CPUs, capability '
               f'{torch.backends.cpu.get_cpu_capability()}; flags: ' +
               (' '.join(w for w in wanted if w in flags) or 'none of ' +
                ' '.join(wanted)) + ')',
        'torch threads': str(torch.get_num_threads()),
    }
    for package in ('onnxruntime', 'openvino'):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            pass
    return env


METHOD = (
    'Latency: median of one forward over the undisturbed rounds, every form '
    'in every round; ratios: medians of per-round ratios; float32 forms '
    'checked against the training form in float64 first (the forms and the '
    'method: docs/benchmark.md of mmrepvgg).')


def format_markdown(rows: Sequence[dict], command: str,
                    settings: Dict[str, str], env: Dict[str, str],
                    targets: Sequence[str]) -> str:
    """The whole ``benchmark.md``."""
    forms = [f for f in ALL_FORMS if any(f in r['latency_ms'] for r in rows)]
    out = [f'# RepVGG backbone benchmark: {", ".join(forms)}', '',
           '```', command, '```', '']
    out += [f'- {k}: {v}' for k, v in list(env.items()) +
            list(settings.items())]
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
    out += ['## Disturbed rounds', '']
    out += [f'- {row_name(r)}: {r["rounds"]["summary"]}: ' + '; '.join(
        sorted({x for x in r['rounds']['reasons'] if x})[:3])
        for r in rows if r['rounds']['dropped']] or ['- none']
    out += ['', '## Targets', '']
    out += [f'- {t}' for t in targets]
    return '\n'.join(out) + '\n'


def report_paths(out_dir: str) -> Dict[str, str]:
    """The ``md`` and ``json`` files :func:`write_report` writes, checked
    before any work: ``out_dir`` (or its nearest existing parent) is a
    folder, the files are not (``fileio.check_output_paths``)."""
    path = os.path.abspath(out_dir)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise BenchmarkError(f'--out-dir {out_dir}: {path} exists and is not '
                             'a folder')
    paths = {ext: os.path.join(out_dir, f'benchmark.{ext}')
             for ext in ('md', 'json')}
    check_output_paths([], list(paths.values()), BenchmarkError)
    return paths


def write_report(rows: Sequence[dict], out_dir: str,
                 markdown: str) -> Dict[str, str]:
    """Write ``benchmark.md`` and ``benchmark.json`` (every sample) into
    ``out_dir``, all or none; returns their paths."""
    contents = dict(json=json.dumps(list(rows), indent=1,
                                    default=str).encode(),
                    md=markdown.encode())
    paths = report_paths(out_dir)
    atomic_write_all([(paths[ext], lambda t, d=data: Path(t).write_bytes(d))
                      for ext, data in contents.items()])
    return paths
