"""The package's one timer (:func:`measure`; the method: docs/benchmark.md).

Every round makes one timed call of every form, in an order that changes
from round to round (a Williams design), each after
``settle`` untimed calls of the same form. Rounds much slower than the
median round, or during which other processes used CPU time, are disturbed
and dropped from every median, unless more than half are (then all are kept
and the result is ``busy``). Ratios are medians of per-round ratios.
"""
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

#: A round whose timed total exceeds the median round total by more than
#: this fraction is disturbed.
ROUND_TOLERANCE = 0.15
#: CPU cores other processes may use (on top of the cores our threads leave
#: free) before a round is disturbed.
OTHERS_CORES = 0.1


def balanced_schedule(names: Sequence[str]) -> List[Tuple[str, ...]]:
    """One cycle of a Williams design (``n`` orders, ``2n`` for odd ``n``):
    every form at every position and after every other equally often."""
    names = tuple(names)
    n = len(names)
    if n <= 1:
        return [names]
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2
                   for j in range(1, n)]
    rows = [[(v + r) % n for v in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [tuple(names[v] for v in row) for row in rows]


def machine_busy() -> Optional[float]:
    """Busy CPU seconds of the whole machine since boot (``/proc/stat``,
    steal included); None where unavailable."""
    try:
        with open('/proc/stat', encoding='ascii') as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def classify_rounds(rounds: Sequence[dict], threads: int,
                    ncpu: Optional[int] = None,
                    tick: float = 0.01) -> Tuple[List[str], List[int], bool]:
    """``(reasons, kept, busy)`` of rounds (``wall``, ``total`` of the timed
    calls, ``others_cpu`` seconds): why each is disturbed, ``''`` if not
    (``'slow round +23%'``, ``'other load 0.8 cores'`` beyond the cores our
    ``threads`` leave free, ``tick``: a jiffy of ``/proc/stat``), the rounds
    kept (module docstring)."""
    med = statistics.median(r['total'] for r in rounds) if rounds else 0
    free = max(0, (ncpu or os.cpu_count() or 1) - threads)
    reasons = []
    for r in rounds:
        why = []
        if med > 0 and r['total'] > (1 + ROUND_TOLERANCE) * med:
            why.append(f'slow round +{100 * (r["total"] / med - 1):.0f}%')
        others = r.get('others_cpu')
        if others is not None and r['wall'] > 0 and \
                others > (free + OTHERS_CORES) * r['wall'] + 2 * tick:
            why.append(f'other load {others / r["wall"]:.1f} cores')
        reasons.append('; '.join(why))
    kept = [i for i, r in enumerate(reasons) if not r]
    if len(kept) < math.ceil(len(reasons) / 2):
        return reasons, list(range(len(reasons))), True
    return reasons, kept, False


@dataclass
class Timing:
    """``times`` (form -> seconds of each timed call), per round its
    ``orders``, ``rounds`` and ``reasons``; the rounds every median uses
    (``kept``) and ``busy`` (:func:`classify_rounds`)."""
    times: Dict[str, List[float]]
    orders: List[Tuple[str, ...]]
    rounds: List[dict]
    reasons: List[str]
    kept: List[int]
    busy: bool

    @property
    def disturbed(self) -> int:
        return sum(bool(r) for r in self.reasons)

    def median(self, form: str) -> float:
        """Median seconds of ``form`` over the kept rounds."""
        return statistics.median(self.times[form][i] for i in self.kept)

    def ratio(self, a: str, b: str) -> dict:
        """``median`` and count ``n`` of the per-round ratios ``a / b`` over
        the kept rounds."""
        ratios = [self.times[a][i] / self.times[b][i] for i in self.kept]
        if not ratios:
            raise ValueError('no rounds to compute a ratio from')
        return dict(median=statistics.median(ratios), n=len(ratios))

    def describe(self) -> str:
        """``median of 18 of 20 rounds (2 disturbed)`` and the like."""
        text = f'median of {len(self.kept)} of {len(self.reasons)} rounds'
        if self.busy:
            return text + ' (busy machine)'
        return text + (f' ({self.disturbed} disturbed)'
                       if self.disturbed else '')


def measure(fns: Mapping[str, Callable[[], object]],
            repeats: int,
            warmup: int = 3,
            settle: int = 1,
            threads: Optional[int] = None) -> Timing:
    """Time the zero-argument calls ``fns`` (form -> call) side by side,
    ``warmup`` untimed rounds, then ``repeats`` timed ones; ``threads``:
    cores the forms use (default: all), to tell others' load from ours."""
    if repeats < 1 or warmup < 0 or settle < 0:
        raise ValueError(f'need repeats >= 1, warmup >= 0 and settle >= 0, '
                         f'got {repeats}, {warmup}, {settle}')
    times: Dict[str, List[float]] = {name: [] for name in fns}
    cycle = balanced_schedule(list(fns))
    for i in range(warmup):
        for name in cycle[i % len(cycle)]:
            fns[name]()
    orders = [cycle[i % len(cycle)] for i in range(repeats)]
    rounds = []
    for o in orders:
        w0, c0, b0 = time.perf_counter(), time.process_time(), machine_busy()
        for name in o:
            for _ in range(settle):
                fns[name]()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        w1, c1, b1 = time.perf_counter(), time.process_time(), machine_busy()
        others = None if b0 is None or b1 is None else max(
            0.0, (b1 - b0) - (c1 - c0))
        rounds.append(dict(wall=w1 - w0, total=sum(
            times[name][-1] for name in o), own_cpu=c1 - c0,
            others_cpu=others))
    ncpu = os.cpu_count() or 1
    return Timing(times, orders, rounds,
                  *classify_rounds(rounds, threads or ncpu, ncpu))
