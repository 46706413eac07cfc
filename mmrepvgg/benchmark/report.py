"""Targets, tables and files of a benchmark run."""
import contextlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from mmrepvgg.utils.fileio import atomic_write_all, check_output_paths
from .run import ALL_FORMS, RATIO_PAIRS, BenchmarkError, row_name

#: Targets (issue 18): ``(name, op, bound, forms)``, every row for the
#: first, A0 at 224x224 for the others; with ``forms``, the fastest of them
#: over deploy.
TARGETS = (('deploy/reference', '<=', 1.02, ()),
           ('training/deploy', '>=', 1.3, ()),
           ('ort-int8/ort-fp32', '<=', 0.4, ()),
           ('fastest INT8 form/deploy', '<=', 0.15, ('ort-int8', 'ov-int8')),
           ('fastest float32 form/deploy', '<=', 0.5,
            ('compile', 'ort-fp32', 'ov-fp32')))


def check_targets(rows: Sequence[dict]) -> List[str]:
    """One ``PASS``/``MISS`` line per target and row (``N/A``: measured,
    but not for A0 at 224x224), flagged when the machine was busy."""
    lines = []
    for i, (name, op, bound, group) in enumerate(TARGETS):
        keys = [f'{f}/deploy' for f in group] or [name]
        mine = [r for r in rows if not i or (
            r['arch'], r['height'], r['width']) == ('A0', 224, 224)]
        have = [r for r in mine if any(k in r['ratios'] for k in keys)]
        text = f'{name} {op} {bound:g}' + (' (A0, 224, CPU' if i else '')
        if i and not have and any(k in r['ratios'] for r in rows
                                  for k in keys):
            lines.append(f'N/A  {text}): no such row in this run')
        for r in have:
            v, k = min((r['ratios'][k]['median'], k) for k in keys
                       if k in r['ratios'])
            ok = v <= bound if op == '<=' else v >= bound
            which = f'; {k.split("/")[0]})' if group else ')' if i else ''
            busy = ' (busy machine: most rounds disturbed)' if \
                r['rounds']['busy'] else ''
            lines.append(f'{"PASS" if ok else "MISS"} {text}{which}: '
                         f'{row_name(r)}: {v:.{3 if i else 4}f}{busy}')
    return lines


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]],
             left: int = 1) -> List[str]:
    """Lines of a Markdown table, the first ``left`` columns left-aligned."""
    return ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(
        ['---'] * left + ['---:'] * (len(header) - left)) + '|'] + [
        '| ' + ' | '.join(r) + ' |' for r in rows]


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of the rows: latencies, ratios, parameters, rounds."""
    forms = [f for f in ALL_FORMS if any(f in r['latency_ms'] for r in rows)]
    ratios = [f'{a}/{b}' for a, b in RATIO_PAIRS
              if any(f'{a}/{b}' in r['ratios'] for r in rows)]
    cols = [('arch', lambda r: r['arch']),
            ('input', lambda r: f'{r["height"]}x{r["width"]}'),
            ('batch', lambda r: str(r['batch']))]
    cols += [(f'{f} ms', lambda r, f=f: f'{r["latency_ms"][f]:.2f}'
              if f in r['latency_ms'] else '') for f in forms]
    if any('compile_s' in r for r in rows):  # apart from its latency
        cols.append(('compile s', lambda r: f'{r["compile_s"]:.1f}'
                     if 'compile_s' in r else ''))
    cols += [(k, lambda r, k=k: f'{r["ratios"][k]["median"]:.3f}'
              if k in r['ratios'] else '') for k in ratios]
    cols += [(f'params {k}', lambda r, k=k: f'{r["params"][k]:,}')
             for k in ('training', 'deploy')]
    cols.append(('rounds used', lambda r: '{kept}/{total}'.format(
        **r['rounds']) + (' busy' if r['rounds']['busy'] else '')))
    return '\n'.join(md_table([h for h, _ in cols], [
        [cell(r) for _, cell in cols] for r in rows], left=3))


def format_accuracy(rows: Sequence[dict]) -> str:
    """Markdown table: per (arch, size) and form, its precision and error
    against the float64 training form."""
    cells = {}
    for r in rows:
        for form, a in r['accuracy'].items():
            cells[r['arch'], r['height'], r['width'], form] = [
                r['arch'], f'{r["height"]}x{r["width"]}', form,
                r['precision'][form], f'{a["error"]:.2e}',
                f'{a["ratio"]:.2f}' if a['kind'] == 'fp32' else '',
                f'{a["sqnr_db"]:.1f}' if a['kind'] == 'lossy' else '']
    return '\n'.join(md_table(
        ['arch', 'input', 'form', 'precision', 'max rel err vs float64',
         'x float32 noise', 'SQNR dB'], list(cells.values()), left=4))


def environment() -> Dict[str, str]:
    """Versions, CPU (with the flags that matter here: VNNI, BF16, AMX) and
    thread count of this run."""
    wanted = ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16',
              'amx_tile', 'amx_int8', 'amx_bf16')
    info = {}
    with contextlib.suppress(OSError), \
            open('/proc/cpuinfo', encoding='utf-8') as f:
        info = {k.strip(): v.strip() for k, v in (
            line.split(':', 1) for line in f if ':' in line)}
    flags = ' '.join(w for w in wanted if w in info.get('flags', '').split())
    env = {'torch': torch.__version__, 'python': platform.python_version(),
           'platform': platform.platform(), 'cpu': (
               f'{info.get("model name", platform.machine())} ('
               f'{os.cpu_count()} logical CPUs, capability '
               f'{torch.backends.cpu.get_cpu_capability()}; flags: '
               f'{flags or "none"})'),
           'torch threads': str(torch.get_num_threads())}
    for package in ('onnxruntime', 'openvino'):
        with contextlib.suppress(PackageNotFoundError):
            env[package] = version(package)
    return env


def format_markdown(rows: Sequence[dict], command: str,
                    settings: Dict[str, str], env: Dict[str, str],
                    targets: Sequence[str]) -> str:
    """The whole ``benchmark.md``."""
    forms = [f for f in ALL_FORMS if any(f in r['latency_ms'] for r in rows)]
    out = [f'# RepVGG backbone benchmark: {", ".join(forms)}', '',
           '```', command, '```', '']
    out += [f'- {k}: {v}' for k, v in {**env, **settings}.items()]
    out += ['', 'Latency: median over the undisturbed rounds, every form in '
            'every round; ratios: medians of per-round ratios; every form '
            'checked first (docs/benchmark.md of mmrepvgg).', '',
            format_table(rows), '']
    skipped = next((r['skipped'] for r in rows if r['skipped']), {})
    out += [f'Skipped: {form} ({why}).' for form, why in skipped.items()]
    out += ['## Accuracy of the forms', '', format_accuracy(rows), '']
    graph = next((r['int8_graph'] for r in rows if r['int8_graph']), None)
    if graph:
        ops = ', '.join(f'{k} {v}' for k, v in sorted(
            graph['optimized_ops'].items(), key=lambda kv: -kv[1]))
        out += [f'INT8 graph: {graph["config"]}; as onnxruntime runs it: '
                f'{ops}.', '']
    out += ['## Disturbed rounds', '']
    out += [f'- {row_name(r)}: {r["rounds"]["summary"]}: ' + '; '.join(
        sorted({x for x in r['rounds']['reasons'] if x})[:3])
        for r in rows if r['rounds']['dropped']] or ['- none']
    out += ['', '## Targets', ''] + [f'- {t}' for t in targets]
    return '\n'.join(out) + '\n'


def report_paths(out_dir: str) -> Dict[str, str]:
    """The ``md`` and ``json`` files :func:`write_report` writes, checked
    before any work: ``out_dir`` (or its nearest existing parent) is a
    folder, the files are not."""
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
    paths = report_paths(out_dir)
    texts = dict(json=json.dumps(list(rows), indent=1, default=str),
                 md=markdown)
    atomic_write_all([(paths[k], lambda t, d=d: Path(t).write_text(
        d, encoding='utf-8')) for k, d in texts.items()])
    return paths
