# The README's two commands: `make demo` and `make test`. Both set up .venv first
# (idempotent; see scripts/setup_env.sh for the overrides it accepts).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-numerics noise-table benchmark

setup:
	MMREPVGG_VENV=$(abspath $(VENV)) bash scripts/setup_env.sh

demo: setup
	$(PY) tools/misc/demo.py

# The suite runs on every core (at most 4 workers, each with its share of the
# cores as torch threads; see tests/conftest.py): XDIST= runs it in one process.
XDIST ?= -n auto --maxprocesses 4 --dist worksteal
test: setup
	$(PY) -m pytest tests -q $(XDIST) $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest tests -q -m slow --runslow $(PYTEST_ARGS)

# The fast numerical tests under other CPUs' code paths and thread counts
# (oneDNN's SSE4.1 and AVX2 kernels, 1 and 2 threads): float32 results move
# with them, and every float32 check must hold on all of them.
NUMERIC_TESTS ?= tests/deploy tests/models tests/configs
ISAS ?= default AVX2 SSE41
THREADS ?= 1 2
test-numerics: setup
	@set -e; for isa in $(ISAS); do for t in $(THREADS); do \
	  echo "== ONEDNN_MAX_CPU_ISA=$$isa OMP_NUM_THREADS=$$t"; \
	  if [ $$isa = default ]; then unset ONEDNN_MAX_CPU_ISA; \
	  else export ONEDNN_MAX_CPU_ISA=$$isa; fi; \
	  OMP_NUM_THREADS=$$t $(PY) -m pytest $(NUMERIC_TESTS) -q -p no:cacheprovider $(PYTEST_ARGS); \
	done; done

# Deploy error vs the network's own float32 noise, for A0, B3 and the toy
# detector, under the same settings.
noise-table: setup
	@set -e; first=1; for isa in $(ISAS); do for t in $(THREADS); do \
	  if [ $$isa = default ]; then unset ONEDNN_MAX_CPU_ISA; \
	  else export ONEDNN_MAX_CPU_ISA=$$isa; fi; \
	  if [ $$first = 1 ]; then h=; first=0; else h=--no-header; fi; \
	  OMP_NUM_THREADS=$$t $(PY) tools/analysis_tools/noise_table.py --toy $$h; \
	done; done

# Speed of the forms of RepVGG backbones, timed in the same rounds: training,
# deploy, a plain Conv2d+ReLU reference, onnxruntime FP32 and INT8 (others with
# BENCH_ARGS='--forms ...'); writes work_dirs/benchmark/benchmark.{md,json}.
# Run on a quiet machine, e.g. BENCH_ARGS='--threads 2 --sizes 224 --repeats 36'.
BENCH_ARGS ?=
benchmark: setup
	$(PY) tools/analysis_tools/benchmark.py --out-dir work_dirs/benchmark $(BENCH_ARGS)
