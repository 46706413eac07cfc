"""Seed sweeps (``tools/analysis_tools/seed_sweep.py``): the same configs
trained under several seeds, compared by their mean metrics; the metrics of
training and test runs, and tools run in a child process with a log.
"""
import glob
import hashlib
import json
import math
import os
import os.path as osp
import stat
import statistics
import subprocess
from typing import Dict, List, Optional, Sequence

from mmrepvgg.utils.cli import ToolError
from mmrepvgg.utils.fileio import atomic_write_bytes

#: The result file written in a seed's work dir after its training.
RESULT_FILE = 'sweep_result.json'
DEFAULT_METRIC = 'coco/bbox_mAP'
#: A result file holds a few lines; a larger one is refused unread.
MAX_RESULT_BYTES = 65536


def run_logged(cmd: Sequence[str], log: str, what: str,
               cwd: Optional[str] = None) -> None:
    """Run ``cmd`` with its output into ``log``; a failure is a ToolError
    naming ``what``, the exit code, the last line and the log."""
    os.makedirs(osp.dirname(osp.abspath(log)), exist_ok=True)
    with open(log, 'w') as f:
        code = subprocess.call(cmd, cwd=cwd, stdout=f,
                               stderr=subprocess.STDOUT)
    if code:
        with open(log) as f:
            tail = [line for line in f.read().splitlines() if line.strip()]
        raise ToolError(f'{what} exited {code}: '
                        f'{tail[-1] if tail else "(no output)"} (full log: '
                        f'{log})')


def _plausible(value) -> bool:
    """A finite number in [0, 1], as every mmdet metric is (COCO's -1,
    "undefined", is refused too)."""
    return isinstance(value, (int, float)) and not isinstance(
        value, bool) and math.isfinite(value) and 0 <= value <= 1


def final_metric(work_dir: str, metric: str = DEFAULT_METRIC) -> float:
    """The last value of ``metric`` in the scalars mmengine logged for the
    newest run in ``work_dir`` (never an older run's value)."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data',
                                      'scalars.json')))
    if not files:
        raise ToolError(f'{work_dir}: no mmengine run logged scalars')
    value = None
    with open(files[-1]) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # blank, or a line cut by a kill
            if isinstance(record, dict) and metric in record:
                value = record[metric]
    if value is None:
        raise ToolError(f'{files[-1]}: no {metric} (did the training reach '
                        'its validation?)')
    if not _plausible(value):
        raise ToolError(f'{files[-1]}: {metric} is {value!r}, not a finite '
                        'number in [0, 1]')
    return float(value)


def test_metrics(work_dir: str) -> Dict[str, float]:
    """``AP50`` and ``mAP`` of the newest ``tools/test.py`` run in
    ``work_dir`` (the metrics JSON mmengine's runner writes)."""
    files = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    if not files:
        raise ToolError(f'{work_dir}: no metrics JSON of tools/test.py')
    with open(files[-1]) as f:
        metrics = json.load(f)
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50'):
        if not _plausible(metrics.get(key)):
            raise ToolError(f'{files[-1]}: {key} is {metrics.get(key)!r}, '
                            'not a number in [0, 1]')
    return dict(AP50=metrics['coco/bbox_mAP_50'], mAP=metrics['coco/bbox_mAP'])


class SweepRun:
    """A labelled config with ``--cfg-options`` (``key=value`` items), seed
    ``s`` trained in ``<work_root>/<label>/seed<s>``."""

    def __init__(self, label: str, config: str, options: Sequence[str],
                 work_root: str) -> None:
        if not label or label != osp.basename(label) or label in ('.', '..'):
            raise ToolError(f'--run: {label!r} is not a usable label (a '
                            'folder name without /)')
        if not osp.isfile(config):
            raise ToolError(f'config file {config} does not exist')
        for item in options:
            if '=' not in item:
                raise ToolError(f'--run {label}: {item!r} is not key=value')
            if item.partition('=')[0].strip() == 'randomness.seed':
                raise ToolError(f'--run {label}: the seed is set by --seeds')
        self.label = label
        self.config = config
        self.options = list(options)
        self.work_root = work_root

    def work_dir(self, seed: int) -> str:
        return osp.join(self.work_root, self.label, f'seed{seed}')

    def identity(self, seed: int, metric: str) -> dict:
        """What a seed's result must have been trained from to be reused."""
        with open(self.config, 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return dict(config=osp.abspath(self.config), config_sha256=digest,
                    options=self.options, seed=seed, metric=metric)

    def train_args(self, seed: int) -> List[str]:
        return [self.config, '--work-dir', self.work_dir(seed),
                '--cfg-options', f'randomness.seed={seed}', *self.options]

    def cached(self, seed: int, metric: str) -> Optional[float]:
        """The recorded result of ``seed`` (None if not trained); a result
        of another config content, options or metric is refused."""
        path = osp.join(self.work_dir(seed), RESULT_FILE)
        if not osp.lexists(path):
            return None
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError('not a regular file')
            if st.st_size > MAX_RESULT_BYTES:
                raise ValueError(f'larger than {MAX_RESULT_BYTES} bytes')
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise ToolError(f'{path}: unreadable ({e})') from None
        if not isinstance(record, dict):
            raise ToolError(f'{path}: not a sweep record (a JSON object); '
                            'remove that folder to train it again')
        want = self.identity(seed, metric)
        changed = [k for k in want if record.get(k) != want[k]]
        if changed:
            raise ToolError(
                f'{path} was trained with another {", ".join(changed)}; '
                'remove that folder or choose another --work-dir or label')
        value = record.get('value')
        if not _plausible(value):
            raise ToolError(f'{path}: value {value!r} is not a finite '
                            'number in [0, 1]; remove that folder to train '
                            'it again')
        return float(value)

    def record(self, seed: int, metric: str, value: float) -> None:
        data = dict(self.identity(seed, metric), value=value)
        atomic_write_bytes(osp.join(self.work_dir(seed), RESULT_FILE),
                           json.dumps(data, indent=1))


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """n, mean, sample standard deviation (0 for one value), min, max and
    the standard error of the mean."""
    n = len(values)
    if n == 0:
        raise ValueError('summarize: no values')
    std = statistics.stdev(values) if n > 1 else 0.0
    return dict(n=n, mean=statistics.fmean(values), std=std, min=min(values),
                max=max(values), sem=std / math.sqrt(n))


def format_table(results: Dict[str, Dict[int, float]],
                 configs: Dict[str, str], metric: str) -> str:
    """A markdown table: per run, the value of every seed, mean +- std, and
    the difference of means to the first run +- its standard error."""
    seeds = sorted({s for r in results.values() for s in r})
    lines = [
        f'| run | config | {" | ".join(f"seed {s}" for s in seeds)} | '
        f'mean +- std ({metric}) | vs {next(iter(results))} |',
        '| --- | --- |' + ' ---: |' * (len(seeds) + 2)
    ]
    first = None
    for label, by_seed in results.items():
        stats = summarize([by_seed[s] for s in sorted(by_seed)])
        cells = [f'{by_seed[s]:.3f}' if s in by_seed else '-' for s in seeds]
        if first is None:
            first, diff = stats, ''
        else:
            se = math.sqrt(first['sem']**2 + stats['sem']**2)
            diff = f'{stats["mean"] - first["mean"]:+.3f} +- {se:.3f}'
        lines.append(f'| {label} | {osp.basename(configs[label])} | '
                     f'{" | ".join(cells)} | '
                     f'{stats["mean"]:.3f} +- {stats["std"]:.3f} | {diff} |')
    return '\n'.join(lines)
