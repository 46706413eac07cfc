"""mmrepvgg.benchmark.report: what a run writes and prints."""
from mmrepvgg.benchmark import report
from mmrepvgg.utils.timing import balanced_schedule, predecessor_effect


def test_order_effects_are_reported():
    orders = balanced_schedule(['a', 'b', 'c'])  # 'b' 20% slower after 'a'
    times = {'a': [], 'b': [], 'c': []}
    for o in orders:
        for i, f in enumerate(o):
            times[f].append(1.2 if f == 'b' and i and o[i - 1] == 'a'
                            else 1.0)
    eff = predecessor_effect(times, orders)
    lines = report.format_order_effects([dict(
        arch='x', height=8, width=8, batch=1, settle=0, order_effect=eff)])
    assert lines == ['x 8x8 batch 1 (settle 0): b after a 1.200, '
                     'c after b 1.000, c after a 1.000']
