"""Seed sweeps: train configs under several seeds and compare mean metrics.

One training run of a small detector moves by several mAP points from seed to
seed (the toy set has 32 validation images), so two configs are compared by
their means over seeds, with the spread.
``tools/analysis_tools/seed_sweep.py`` is the command line; this module holds
the parts that do not train:

- :func:`final_metric` reads the last value of a metric that mmengine logged
  in a work dir (``<timestamp>/vis_data/scalars.json``), and
  :func:`test_metrics` the metrics of a ``tools/test.py`` run;
- :class:`SweepRun` is one labelled config (+ ``--cfg-options``) and the
  work dir of each of its seeds; its ``sweep_result.json`` records what was
  trained, so a rerun reuses finished seeds and refuses to mix results of a
  changed config or options into the same work dir;
- :func:`summarize` and :func:`format_table` make the table.
"""
import glob
import hashlib
import json
import math
import os
import os.path as osp
import stat
from typing import Dict, List, Optional, Sequence

from mmrepvgg.utils.cli import ToolError
from mmrepvgg.utils.fileio import atomic_write_bytes, check_output_paths

#: The result file written in a seed's work dir after its training.
RESULT_FILE = 'sweep_result.json'
DEFAULT_METRIC = 'coco/bbox_mAP'
#: A result file holds a few lines; a larger one is refused unread.
MAX_RESULT_BYTES = 65536


def _plausible(value) -> bool:
    """A finite number in [0, 1], as every mmdet evaluation metric (mAP,
    recall) is; COCO's -1 means "undefined" and is refused too."""
    return isinstance(value, (int, float)) and not isinstance(
        value, bool) and math.isfinite(value) and 0 <= value <= 1


def final_metric(work_dir: str, metric: str = DEFAULT_METRIC) -> float:
    """The last value of ``metric`` logged by the newest run in ``work_dir``.

    mmengine writes one ``<timestamp>/vis_data/scalars.json`` per run (JSON
    lines). Only the newest run is read: an older run's value is never
    taken for the one that just trained.

    Raises:
        ToolError: no run in ``work_dir``, or its newest run did not log a
            finite ``metric``.
    """
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
    """The metrics of the newest ``tools/test.py`` run in ``work_dir``: the
    JSON mmengine's runner writes (``<timestamp>/<timestamp>.json``).

    Raises:
        ToolError: no such file, or a metric that is not in [0, 1].
    """
    files = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    if not files:
        raise ToolError(f'{work_dir}: no metrics JSON of tools/test.py')
    with open(files[-1]) as f:
        metrics = json.load(f)
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50'):
        if not _plausible(metrics.get(key)):
            raise ToolError(f'{files[-1]}: {key} is {metrics.get(key)!r}, '
                            'not a number in [0, 1]')
    return metrics


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex, first 16 digits)."""
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class SweepRun:
    """A labelled config with ``--cfg-options``, trained under each seed.

    Args:
        label (str): the run's name in the table and its work dir name.
        config (str): the config file.
        options (list[str]): ``key=value`` items passed to ``tools/train.py
            --cfg-options`` after ``randomness.seed=<seed>``.
        work_root (str): the sweep's folder; seed ``s`` trains in
            ``<work_root>/<label>/seed<s>``.
    """

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

    def identity(self, seed: int) -> dict:
        """What a seed's result must have been trained from to be reused."""
        return dict(config=osp.abspath(self.config),
                    config_sha256=file_digest(self.config),
                    options=self.options, seed=seed)

    def train_args(self, seed: int) -> List[str]:
        """The ``tools/train.py`` arguments for ``seed``."""
        return [self.config, '--work-dir', self.work_dir(seed),
                '--cfg-options', f'randomness.seed={seed}', *self.options]

    def cached(self, seed: int, metric: str) -> Optional[float]:
        """The recorded result of ``seed``, or None if it was not trained.

        Raises:
            ToolError: the seed's work dir holds a result trained from
                another config file content, options or metric.
        """
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
        want = self.identity(seed)
        changed = [k for k in want if record.get(k) != want[k]]
        if record.get('metric') != metric:
            changed.append('metric')
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
        """Write ``sweep_result.json`` (atomically) for ``seed``."""
        data = dict(self.identity(seed), metric=metric, value=value)
        atomic_write_bytes(osp.join(self.work_dir(seed), RESULT_FILE),
                           json.dumps(data, indent=1))


def check_out_path(out: str, runs: Sequence[SweepRun]) -> None:
    """Refuse an ``--out`` table that would overwrite what the sweep reads
    or writes: a config, or anything in a run's folder
    (``<work_root>/<label>``: checkpoints, logs, records, now or later).

    Raises:
        ToolError: naming ``--out`` and the file or folder at stake.
    """
    real = osp.realpath(out)
    inputs = []
    for run in runs:
        folder = osp.join(run.work_root, run.label)
        if osp.commonpath([real, osp.realpath(folder)]) == \
                osp.realpath(folder):
            raise ToolError(f'--out {out}: inside {folder}, the work dir of '
                            f'--run {run.label}; choose a path outside it')
        inputs.append((run.config, f'config of --run {run.label}'))
        for root, _, files in os.walk(folder):  # reached by a hard link
            inputs += [(osp.join(root, f), f'file of --run {run.label}')
                       for f in files]
    try:
        check_output_paths(inputs, [out])
    except ToolError as e:
        raise ToolError(f'--out {e}') from None


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """n, mean, sample standard deviation (0 for one value), min, max and
    the standard error of the mean."""
    n = len(values)
    if n == 0:
        raise ValueError('summarize: no values')
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean)**2
                        for v in values) / (n - 1)) if n > 1 else 0.0
    return dict(n=n, mean=mean, std=std, min=min(values), max=max(values),
                sem=std / math.sqrt(n))


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
