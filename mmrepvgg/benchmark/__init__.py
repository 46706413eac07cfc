"""Speed and memory benchmark of RepVGG backbones (behind
``tools/analysis_tools/benchmark.py``), one module per concern:

* :mod:`.options`: forms, option parsing and validation;
* :mod:`.reference`: the forms of a backbone, the plain-conv reference and
  the float32-noise equivalence checks;
* :mod:`.onnx_forms`: the onnxruntime and OpenVINO FP32, INT8 (and
  OpenVINO bfloat16) forms;
* :mod:`.memory`: peak activation memory of one forward;
* :mod:`.run`: one run over archs, sizes and batch sizes;
* :mod:`.report`: targets, tables, chart and the written files;
* :mod:`.detector`: whole-detector forms (training, deploy, bfloat16,
  onnxruntime FP32/INT8) timed together, for the demo's summary table.

Every form is timed by :mod:`mmrepvgg.utils.timing`.
"""
from .memory import peak_activation_bytes, peak_from_memory_events
from .options import (ALL_FORMS, DEFAULT_FORMS, BenchmarkError,
                      check_device_options, parse_arch, parse_forms,
                      parse_size)
from .reference import (PlainReference, PlainSE, build_forms,
                        build_reference, plain_block)
from .report import (check_targets, columns, environment, format_accuracy,
                     format_markdown, format_table, plot, report_paths,
                     write_report)
from .run import (RATIO_PAIRS, BenchOptions, bench_row, make_input,
                  run_benchmark)

__all__ = [
    'ALL_FORMS', 'BenchmarkError', 'DEFAULT_FORMS', 'PlainReference',
    'PlainSE', 'RATIO_PAIRS', 'BenchOptions', 'bench_row',
    'build_forms', 'build_reference', 'check_device_options',
    'check_targets', 'columns',
    'environment', 'format_accuracy', 'format_markdown', 'format_table',
    'make_input', 'parse_arch',
    'parse_forms', 'parse_size', 'peak_activation_bytes',
    'peak_from_memory_events', 'plain_block', 'plot', 'report_paths',
    'run_benchmark', 'write_report'
]
