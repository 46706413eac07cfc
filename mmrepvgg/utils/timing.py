"""The package's one timer: several forms of one computation timed side by
side (:func:`measure`).

* **rounds**: one timed call of every form per round, the order changing
  from round to round: ``balanced`` cycles through a Williams design
  (:func:`balanced_schedule`: every form at every position equally often
  and right after every other form equally often), ``random`` draws a
  seeded order per round. Slow drifts of the machine's load then reach
  every form alike.
* **settle calls**: before each timed call, ``settle`` untimed calls of the
  *same* form. The call right after another form is not representative (it
  pays for the other form's working set, or for thread pools that went to
  sleep); a balanced order alone only spreads that cost and leaves the
  per-round ratios bimodal. After a settle call every timed call follows a
  call of its own form, as in a server that runs one model in a loop.
* **disturbed rounds** (:func:`classify_rounds`): a round whose timed total
  exceeds the median round total by more than ``tolerance``, or during
  which other processes used CPU time (``/proc/stat`` busy time, steal
  included, minus this process's ``getrusage`` time, beyond the cores our
  threads leave free). Disturbed rounds are dropped from every median
  unless more than half are disturbed: then all are used and the result is
  flagged ``busy``.
* **ratios** (:func:`ratio_stats`): medians of per-round ratios of two forms
  (both ran in the same round, so load changes between rounds cancel), with
  quartiles.

Standard library only (``time.perf_counter``); what the method measured on
real machines is in ``docs/benchmark.md``.
"""
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

try:
    import resource
except ImportError:  # not on Windows
    resource = None

#: A round whose timed total exceeds the median round total by more than
#: this fraction is disturbed.
ROUND_TOLERANCE = 0.15
#: CPU cores other processes may use (on top of the cores our threads leave
#: free) before a round is disturbed.
OTHERS_CORES = 0.1
ORDERS = ('balanced', 'random')


def balanced_schedule(names: Sequence[str]) -> List[Tuple[str, ...]]:
    """The orders of one cycle of rounds: a Williams design over ``names``.

    ``n`` orders for an even number ``n`` of forms, ``2n`` for an odd one
    (every permutation for three forms); in one cycle every form is at every
    position equally often and, within the rounds, right after every other
    form equally often (never after itself).
    """
    names = tuple(names)
    n = len(names)
    if n <= 1:
        return [names]
    first = [0]
    for j in range(1, n):
        first.append((j + 1) // 2 if j % 2 else n - j // 2)
    rows = [[(v + r) % n for v in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [tuple(names[v] for v in row) for row in rows]


def round_orders(names: Sequence[str], rounds: int, order: str = 'balanced',
                 seed: int = 0) -> List[Tuple[str, ...]]:
    """The order of the forms in each of ``rounds`` rounds: ``balanced``
    (:func:`balanced_schedule` from its start, cyclically) or ``random`` (a
    shuffle per round, seeded with ``seed``)."""
    if order == 'balanced':
        cycle = balanced_schedule(names)
        return [cycle[i % len(cycle)] for i in range(rounds)]
    if order == 'random':
        rng = random.Random(seed)
        out = []
        for _ in range(rounds):
            o = list(names)
            rng.shuffle(o)
            out.append(tuple(o))
        return out
    raise ValueError(f'order must be balanced or random, got {order!r}')


class LoadProbe:
    """Wall clock, this process's CPU time (all threads) and the whole
    machine's busy CPU time (``/proc/stat``, steal included; ``None`` where
    unavailable), in seconds."""

    def __init__(self) -> None:
        try:
            self.tick = 1.0 / os.sysconf('SC_CLK_TCK')
        except (AttributeError, ValueError, OSError):
            self.tick = 0.01
        self.ncpu = os.cpu_count() or 1

    def machine_busy(self) -> Optional[float]:
        try:
            with open('/proc/stat', encoding='ascii') as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != 'cpu':
            return None
        v = [int(x) for x in fields[1:9]] + [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
        return (user + nice + system + irq + softirq + steal) * self.tick

    @staticmethod
    def own_cpu() -> float:
        if resource is None:
            return time.process_time()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    def sample(self) -> Tuple[float, float, Optional[float]]:
        return time.perf_counter(), self.own_cpu(), self.machine_busy()


def time_interleaved(fns: Mapping[str, Callable[[], object]],
                     repeats: int,
                     warmup: int,
                     settle: int = 1,
                     order: str = 'balanced',
                     seed: int = 0,
                     sync: Optional[Callable[[], None]] = None,
                     probe: Optional[LoadProbe] = None) -> dict:
    """The raw samples behind :func:`measure` (same arguments; ``probe``:
    the load measurement, a new :class:`LoadProbe` by default).

    Returns:
        dict: ``times`` (form -> seconds per timed call, in round order),
        ``orders`` (form order of each timed round) and ``rounds`` (per
        round: ``wall``, ``total`` of the timed calls, ``own_cpu``,
        ``others_cpu`` seconds, ``None`` when unknown).
    """
    if repeats < 1 or warmup < 0 or settle < 0:
        raise ValueError(f'need repeats >= 1, warmup >= 0 and settle >= 0, '
                         f'got {repeats}, {warmup}, {settle}')
    sync = sync or (lambda: None)
    probe = probe or LoadProbe()
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for o in round_orders(names, warmup, order, seed + 1):
        for name in o:
            fns[name]()
    sync()
    orders = round_orders(names, repeats, order, seed)
    rounds = []
    for o in orders:
        w0, c0, b0 = probe.sample()
        total = 0.0
        for name in o:
            fn = fns[name]
            for _ in range(settle):
                fn()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            total += dt
        w1, c1, b1 = probe.sample()
        own = c1 - c0
        others = None if b0 is None or b1 is None else max(
            0.0, (b1 - b0) - own)
        rounds.append(dict(wall=w1 - w0, total=total, own_cpu=own,
                           others_cpu=others))
    return dict(times=times, orders=orders, rounds=rounds)


def classify_rounds(rounds: Sequence[dict],
                    threads: int,
                    ncpu: Optional[int] = None,
                    tolerance: float = ROUND_TOLERANCE,
                    tick: float = 0.01) -> List[str]:
    """Why each round of :func:`time_interleaved` is disturbed (``''`` if
    it is not): ``'slow round +23%'``, ``'other load 0.8 cores'``, or both
    ``'; '``-separated.

    Args:
        rounds (Sequence[dict]): the ``rounds`` of :func:`time_interleaved`.
        threads (int): cores the timed forms use.
        ncpu (int, optional): cores of the machine (``os.cpu_count()``).
        tolerance (float): allowed excess of a round's timed total over the
            median round total.
        tick (float): resolution of the machine's busy time (one jiffy).
    """
    if not rounds:
        return []
    ncpu = ncpu or os.cpu_count() or 1
    med = statistics.median(r['total'] for r in rounds)
    free = max(0, ncpu - threads)
    out = []
    for r in rounds:
        why = []
        if med > 0 and r['total'] > (1 + tolerance) * med:
            why.append(f'slow round +{100 * (r["total"] / med - 1):.0f}%')
        others = r.get('others_cpu')
        if others is not None and r['wall'] > 0 and \
                others > (free + OTHERS_CORES) * r['wall'] + 2 * tick:
            why.append(f'other load {others / r["wall"]:.1f} cores')
        out.append('; '.join(why))
    return out


def select_rounds(reasons: Sequence[str]) -> Tuple[List[int], bool]:
    """``(kept round indices, busy)``: the undisturbed rounds, or all rounds
    with ``busy=True`` when more than half are disturbed."""
    kept = [i for i, r in enumerate(reasons) if not r]
    if len(kept) < math.ceil(len(reasons) / 2):
        return list(range(len(reasons))), True
    return kept, False


def ratio_stats(a: Sequence[float], b: Sequence[float],
                keep: Optional[Sequence[int]] = None) -> dict:
    """Median and quartiles of the per-round ratios ``a[i] / b[i]`` over
    the rounds ``keep`` (default all): ``median``, ``q1``, ``q3`` and ``n``.
    """
    idx = range(len(a)) if keep is None else keep
    ratios = sorted(a[i] / b[i] for i in idx)
    if not ratios:
        raise ValueError('no rounds to compute a ratio from')
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method='inclusive')
    else:
        q1 = q3 = ratios[0]
    return dict(median=statistics.median(ratios), q1=q1, q3=q3,
                n=len(ratios))


def predecessor_effect(times: Mapping[str, Sequence[float]],
                       orders: Sequence[Sequence[str]],
                       keep: Optional[Sequence[int]] = None
                       ) -> Dict[str, Dict[str, float]]:
    """How much each form's time depends on the form run before it.

    The predecessor of a timed call is the form called before it (before
    its settle calls; across rounds for the first call of a round). Result:
    form -> {predecessor -> median time after that predecessor / the form's
    median over all calls} (pairs seen fewer than twice left out). Near 1:
    no order effect; run with ``settle=0`` to see the raw effect.
    """
    idx = set(range(len(orders)) if keep is None else keep)
    by: Dict[Tuple[str, str], List[float]] = {}
    prev = None
    for r, order in enumerate(orders):
        for pos, form in enumerate(order):
            pred = order[pos - 1] if pos else prev
            if r in idx and pred is not None:
                by.setdefault((form, pred), []).append(times[form][r])
        prev = order[-1] if order else prev
    out: Dict[str, Dict[str, float]] = {}
    for (form, pred), ts in sorted(by.items()):
        if len(ts) < 2:
            continue
        base = statistics.median(times[form][r] for r in sorted(idx))
        out.setdefault(form, {})[pred] = statistics.median(ts) / base
    return out


@dataclass
class Timing:
    """What :func:`measure` measured: the raw ``times`` (form -> seconds of
    each timed call), ``orders`` and ``rounds`` of :func:`time_interleaved`,
    per round why it is disturbed (``reasons``, ``''``: it is not), the
    rounds every median uses (``kept``) and whether more than half were
    disturbed (``busy``: then all are kept)."""
    times: Dict[str, List[float]]
    orders: List[Tuple[str, ...]]
    rounds: List[dict]
    reasons: List[str]
    kept: List[int]
    busy: bool

    @property
    def disturbed(self) -> int:
        """Rounds marked disturbed (dropped unless ``busy``)."""
        return sum(bool(r) for r in self.reasons)

    def median(self, form: str) -> float:
        """Median seconds of ``form`` over the kept rounds."""
        return statistics.median(self.times[form][i] for i in self.kept)

    def ratio(self, a: str, b: str) -> dict:
        """:func:`ratio_stats` of ``a / b`` over the kept rounds."""
        return ratio_stats(self.times[a], self.times[b], self.kept)

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
            order: str = 'balanced',
            sync: Optional[Callable[[], None]] = None,
            threads: Optional[int] = None,
            tolerance: float = ROUND_TOLERANCE) -> Timing:
    """Time the forms ``fns`` side by side (see the module docstring).

    Args:
        fns (Mapping): form name -> zero-argument callable.
        repeats (int): timed rounds.
        warmup (int): untimed rounds first.
        settle (int): untimed calls of a form before each timed call.
        order (str): ``balanced`` or ``random``.
        sync (callable, optional): called around every timed call
            (``torch.cuda.synchronize`` on GPU).
        threads (int, optional): cores the forms use (default: all), for
            telling other processes' load from ours.
        tolerance (float): see :func:`classify_rounds`.
    """
    probe = LoadProbe()
    raw = time_interleaved(fns, repeats, warmup, settle, order, 0, sync,
                           probe)
    reasons = classify_rounds(raw['rounds'], threads or probe.ncpu,
                              probe.ncpu, tolerance, tick=probe.tick)
    kept, busy = select_rounds(reasons)
    return Timing(raw['times'], raw['orders'], raw['rounds'], reasons, kept,
                  busy)
