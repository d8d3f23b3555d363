# Quick start: `make test` and `make bench`. Each sets up .venv (pinned dependencies) and builds the
# extension first; a second run only rebuilds what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: all build test fuzz bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps-stamp: requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Editable install; ninja recompiles only the sources that changed.
$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.build-stamp

test: build
	$(PY) -m pytest tests $(TEST_ARGS)

# The property tests with fresh random examples (the "fuzz" hypothesis profile, tests/conftest.py), 1000 per
# test unless FUSED_LOSSES_FUZZ_EXAMPLES says otherwise; `make test` runs a fixed set of them.
fuzz: build
	FUSED_LOSSES_HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests -k fuzz $(TEST_ARGS)

bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build fused_losses/*.so $(VENV)/.build-stamp
