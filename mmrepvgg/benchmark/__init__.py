"""Speed and memory benchmark of RepVGG backbones (behind
``tools/benchmark.py``), one module per concern:

* :mod:`.options`: forms, option parsing and validation;
* :mod:`.reference`: the forms of a backbone, the plain-conv reference and
  the float32-noise equivalence checks;
* :mod:`.onnx_forms`: the onnxruntime FP32 and INT8 forms;
* :mod:`.timing`: interleaved rounds, settle calls, disturbed rounds,
  medians of per-round ratios;
* :mod:`.memory`: peak activation memory of one forward;
* :mod:`.run`: one run over archs, sizes and batch sizes;
* :mod:`.report`: targets, tables, chart and the written files;
* :mod:`.detector`: whole-detector forms (training, deploy, bfloat16,
  onnxruntime FP32/INT8) timed together, for the demo's summary table.
"""
from .memory import peak_activation_bytes, peak_from_memory_events
from .options import (ALL_FORMS, DEFAULT_FORMS, BenchmarkError,
                      check_device_options, parse_arch, parse_forms,
                      parse_size)
from .reference import (PlainReference, PlainSE, build_forms,
                        build_reference, count_params, max_relative_error,
                        plain_block)
from .report import (check_targets, columns, environment, format_accuracy,
                     format_markdown, format_table, plot, report_paths,
                     summary_title, write_report)
from .run import RATIO_PAIRS, bench_row, make_input, run_benchmark
from .timing import (balanced_schedule, classify_rounds, paired_ratio,
                     predecessor_effect, ratio_stats, round_orders,
                     select_rounds, time_interleaved)

__all__ = [
    'ALL_FORMS', 'BenchmarkError', 'DEFAULT_FORMS', 'PlainReference',
    'PlainSE', 'RATIO_PAIRS', 'balanced_schedule', 'bench_row',
    'build_forms', 'build_reference', 'check_device_options',
    'check_targets', 'classify_rounds', 'columns', 'count_params',
    'environment', 'format_accuracy', 'format_markdown', 'format_table',
    'make_input', 'max_relative_error', 'paired_ratio', 'parse_arch',
    'parse_forms', 'parse_size', 'peak_activation_bytes',
    'peak_from_memory_events', 'plain_block', 'plot', 'predecessor_effect',
    'ratio_stats', 'report_paths', 'round_orders', 'run_benchmark',
    'select_rounds', 'summary_title', 'time_interleaved', 'write_report'
]
