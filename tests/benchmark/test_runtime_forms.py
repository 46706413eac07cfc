"""The benchmark's compile and OpenVINO forms (issue 18): timed in the same
rounds as the others, float32 forms judged by the float32 noise, precision
explicit in every row, ov-bf16 skipped with a reason without native
bfloat16, a failed OpenVINO probe one line."""
import pytest

pytest.importorskip('onnxruntime')

from mmrepvgg.benchmark import report  # noqa: E402
from mmrepvgg.benchmark.run import BenchmarkError, run_benchmark  # noqa: E402
from mmrepvgg.export import openvino  # noqa: E402

TINY = ('tiny', dict(num_blocks=(1, 1, 1, 1),
                     width_factor=(0.25, 0.25, 0.25, 0.25)))


def _usable():
    reason = openvino.unusable_reason()
    if reason is not None:
        pytest.skip(f'OpenVINO is not usable here: {reason}')


def _run(forms, **kw):
    lines = []
    rows = run_benchmark([TINY], [(32, 32)], kw.pop('batches', [1]),
                         forms=forms, repeats=2, warmup=1,
                         log=lines.append, **kw)
    return rows, lines


def test_compile_and_openvino_forms_side_by_side():
    _usable()
    forms = ['deploy', 'compile', 'ort-int8', 'ov-fp32', 'ov-int8',
             'ov-bf16']
    native = openvino.native_bf16()
    rows, _ = _run(forms, batches=[1, 2])
    timed = [f for f in forms if native or f != 'ov-bf16']
    assert len(rows) == 2
    for r in rows:
        assert list(r['latency_ms']) == timed  # same rounds, table order
        assert all(len(r['times_ms'][f]) == 2 for f in timed)
        # compiled before the rounds, not in them, and reported apart
        assert max(r['times_ms']['compile']) < 1e3
        assert r['compile_s'] > max(r['times_ms']['compile']) / 1e3
        for key in ('compile/deploy', 'ov-fp32/deploy', 'ov-int8/ov-fp32',
                    'ov-int8/deploy', 'ort-int8/deploy'):
            assert key in r['ratios'], key
        acc = r['accuracy']
        for f in ('compile', 'ov-fp32'):  # float32: by the float32 noise
            assert acc[f]['kind'] == 'fp32' and acc[f]['passed']
            assert acc[f]['error'] <= 4 * max(acc[f]['noise'], 1.2e-7)
        assert 10 < acc['ov-int8']['sqnr_db'] < 80
        prec = r['precision']
        assert prec['deploy'] == prec['compile'] == 'float32'
        assert prec['ov-fp32'] == 'INFERENCE_PRECISION_HINT f32'
        assert prec['ov-int8'] == 'INT8 (QDQ), INFERENCE_PRECISION_HINT f32'
        if native:
            assert prec['ov-bf16'] == 'INFERENCE_PRECISION_HINT bf16'
            assert 20 < acc['ov-bf16']['sqnr_db'] < 80
            assert r['skipped'] == {}
    table = report.format_table(rows)
    assert 'compile ms' in table and 'ov-int8 ms' in table
    assert 'compile s' in table
    assert 'INFERENCE_PRECISION_HINT f32' in report.format_accuracy(rows)


def test_ov_bf16_skipped_without_native_bf16(monkeypatch):
    _usable()
    monkeypatch.setattr(openvino, 'native_bf16', lambda: False)
    rows, lines = _run(['deploy', 'ov-fp32', 'ov-bf16'])
    (r, ) = rows
    assert list(r['latency_ms']) == ['deploy', 'ov-fp32']
    assert 'no native bfloat16' in r['skipped']['ov-bf16']
    assert any(ln.startswith('note: form ov-bf16 skipped') for ln in lines)
    md = report.format_markdown(rows, 'cmd', {}, {}, [])
    assert 'Skipped: ov-bf16 (OpenVINO reports no native bfloat16' in md
    with pytest.raises(BenchmarkError, match='every form asked for'):
        _run(['ov-bf16'])


def test_unusable_openvino_is_one_line(monkeypatch):
    monkeypatch.setattr(openvino, '_verdict', {})
    monkeypatch.setattr(openvino, '_probe', lambda: 'simulated SIGFPE')
    with pytest.raises(BenchmarkError) as e:
        _run(['deploy', 'ov-fp32', 'ov-int8'])
    assert str(e.value) == ('--forms ov-fp32 ov-int8: OpenVINO is not '
                            'usable here: simulated SIGFPE')


def _row(arch, ratios):
    return dict(arch=arch, height=224, width=224, batch=1,
                ratios={k: dict(median=v) for k, v in ratios.items()},
                rounds=dict(busy=False))


def test_targets_of_the_fastest_forms():
    rows = [_row('A0', {'ort-int8/deploy': 0.2, 'ov-int8/deploy': 0.14,
                        'ort-fp32/deploy': 0.55, 'ov-fp32/deploy': 0.52,
                        'compile/deploy': 0.6}),
            _row('B3', {'ov-int8/deploy': 0.01})]
    lines = report.check_targets(rows)
    assert ('PASS fastest INT8 form/deploy <= 0.15 (A0, 224, CPU; ov-int8): '
            'A0 224x224 batch 1: 0.140') in lines
    assert ('MISS fastest float32 form/deploy <= 0.5 (A0, 224, CPU; '
            'ov-fp32): A0 224x224 batch 1: 0.520') in lines
    assert not any('B3' in ln for ln in lines)
