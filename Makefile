# safeshard: two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fast lint bench bench-stream clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[numpy]'
	touch $@

# torch is pinned to the CPU build that is on this machine's disk; gptqmodel 7.6.0 is the
# last release that works with torch 2.13 (see shared/REFERENCE.md).
$(TSTAMP): pyproject.toml requirements-test.txt | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/safeshard demo

test: $(TSTAMP)
	$(PY) -m pytest -q

test-fast: $(TSTAMP)
	$(PY) -m pytest -q -m "not slow and not gptq"

lint: $(TSTAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(TSTAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

bench-stream: $(TSTAMP)
	$(PY) benchmarks/stream_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
