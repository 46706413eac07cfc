"""mmrepvgg.utils.timing: the schedule, settle calls, disturbed rounds,
ratios and the Timing summary (no speed assertion)."""
import itertools

import pytest

from mmrepvgg.utils import timing


@pytest.mark.parametrize('n', [2, 3, 4, 5, 6])
def test_balanced_schedule_is_a_williams_design(n):
    names = [f'f{i}' for i in range(n)]
    schedule = timing.balanced_schedule(names)
    assert len(schedule) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(o) == names for o in schedule)
    # every form at every position equally often
    for pos in range(n):
        counts = {f: sum(o[pos] == f for o in schedule) for f in names}
        assert len(set(counts.values())) == 1
    # within rounds, every form right after every other form equally often
    pairs = [(o[i - 1], o[i]) for o in schedule for i in range(1, n)]
    counts = {(a, b): pairs.count((a, b)) for a in names for b in names
              if a != b}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 1
    if n == 3:
        assert sorted(schedule) == sorted(itertools.permutations(names))


def test_interleaving_with_settle_calls():
    forms = ('training', 'deploy', 'reference')
    schedule = timing.balanced_schedule(forms)
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in forms}
    res = timing.measure(fns, repeats=7, warmup=2, settle=1)
    assert {k: len(v) for k, v in res.times.items()} == dict.fromkeys(
        forms, 7)
    assert len(res.rounds) == 7 and res.orders[:6] == schedule
    # warm-up rounds, then timed rounds from the schedule's start, every
    # timed call right after an untimed call of the same form
    expect = [n for i in range(2) for n in schedule[i]]
    expect += [n for i in range(7) for n in schedule[i % 6] for _ in (0, 1)]
    assert calls == expect
    calls.clear()
    res = timing.measure(fns, repeats=5, warmup=0, settle=0)
    assert calls == [n for o in res.orders for n in o]
    with pytest.raises(ValueError, match='repeats >= 1'):
        timing.measure(fns, repeats=0, warmup=0)


def _round(total, others=0.0, wall=None):
    return dict(total=total, wall=wall or total, own_cpu=2 * total,
                others_cpu=others)


def _timing(a, b, kept):
    return timing.Timing(times=dict(a=a, b=b), orders=[], rounds=[],
                         reasons=[''] * len(a), kept=kept, busy=False)


def test_disturbed_rounds_are_detected_and_dropped():
    rounds = [_round(1.0), _round(1.02), _round(0.99), _round(1.4),
              _round(1.01, others=0.6), _round(1.0, others=0.01)]
    reasons, kept, busy = timing.classify_rounds(rounds, threads=2, ncpu=2)
    assert reasons[0] == reasons[1] == reasons[2] == reasons[5] == ''
    assert reasons[3].startswith('slow round +')
    assert reasons[4] == 'other load 0.6 cores'
    assert kept == [0, 1, 2, 5] and not busy
    # a free core absorbs one other process
    assert timing.classify_rounds([_round(1.0, others=0.6)], threads=1,
                                  ncpu=2)[0] == ['']
    # more than half disturbed: everything kept, flagged busy
    reasons, kept, busy = timing.classify_rounds(
        [_round(1.0), _round(1.0, others=0.6), _round(1.0, others=0.6)],
        threads=2, ncpu=2)
    assert [bool(r) for r in reasons] == [False, True, True]
    assert kept == [0, 1, 2] and busy
    # one contended round cannot move the ratio
    a = [1.0, 1.0, 1.0, 1.0, 5.0]
    b = [2.0, 2.0, 2.0, 2.0, 2.0]
    rs = [_round(x + y) for x, y in zip(a, b)]
    _, kept, _ = timing.classify_rounds(rs, 2, 2)
    assert kept == [0, 1, 2, 3]
    assert _timing(a, b, kept).ratio('a', 'b')['median'] == 0.5


def test_ratios():
    assert _timing([2, 20, 4], [1, 10, 4], [0, 1, 2]).ratio(
        'a', 'b')['median'] == 2
    assert _timing([2, 20, 4, 9], [1, 10, 4, 1], [0, 2]).ratio(
        'a', 'b')['median'] == 1.5
    s = _timing([1, 2, 3, 4, 5], [1, 1, 1, 1, 1], [0, 1, 2, 3, 4]).ratio(
        'a', 'b')
    assert (s['median'], s['n']) == (3, 5)
    with pytest.raises(ValueError, match='no rounds'):
        _timing([1.0], [1.0], []).ratio('a', 'b')


def test_load_is_measured():
    b0 = timing.machine_busy()
    x = 0
    for i in range(200000):
        x += i * i
    b1 = timing.machine_busy()
    if b0 is not None:
        assert b1 >= b0
    t = timing.measure({'a': lambda: sum(range(20000))}, repeats=2)
    for r in t.rounds:
        assert r['wall'] > 0 and r['own_cpu'] > 0 and r['total'] > 0
        assert r['others_cpu'] is None or r['others_cpu'] >= 0


def test_measure_summarises_the_kept_rounds():
    calls = []
    t = timing.measure({'a': lambda: calls.append('a'),
                        'b': lambda: calls.append('b')}, repeats=3,
                       warmup=1)
    assert len(calls) == 2 * (1 + 3 * 2)  # warm-up, then settle + timed
    assert set(t.times) == {'a', 'b'} and len(t.reasons) == 3
    assert t.ratio('a', 'a')['median'] == 1.0
    assert t.median('a') > 0
    assert t.describe().startswith(f'median of {len(t.kept)} of 3 rounds')
    # a fixed record: the medians and ratios use the kept rounds only
    t = timing.Timing(times=dict(a=[1.0, 2.0, 9.0], b=[2.0, 2.0, 3.0]),
                      orders=[('a', 'b')] * 3, rounds=[{}] * 3,
                      reasons=['', '', 'slow round +80%'], kept=[0, 1],
                      busy=False)
    assert t.median('a') == 1.5 and t.ratio('a', 'b')['median'] == 0.75
    assert t.disturbed == 1
    assert t.describe() == 'median of 2 of 3 rounds (1 disturbed)'
