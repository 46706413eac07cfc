# The README's two commands: `make demo` and `make test`. Both set up .venv first
# (idempotent; see scripts/setup_env.sh for the overrides it accepts).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow benchmark

setup:
	MMREPVGG_VENV=$(abspath $(VENV)) bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest tests -q -m slow --runslow $(PYTEST_ARGS)

# Speed of training form vs deploy form vs a plain Conv2d+ReLU reference;
# writes work_dirs/benchmark/benchmark.{md,png,json}.
BENCH_ARGS ?=
benchmark: setup
	$(PY) tools/benchmark.py --out-dir work_dirs/benchmark $(BENCH_ARGS)
