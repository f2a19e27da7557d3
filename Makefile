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

.PHONY: demo test test-fast lint bench bench-scale bench-stream bench-s3 bench-tp faults fuzz clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[numpy]'
	touch $@

# torch is pinned to the CPU build that is on this machine's disk; gptqmodel 7.6.0 is the
# last release that works with torch 2.13 (see shared/REFERENCE.md). constraints.txt pins the
# rest to a set known to work, which also spares pip minutes of backtracking on a clean clone.
$(TSTAMP): pyproject.toml requirements-test.txt constraints.txt | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements-test.txt
	$(PIP) install -q -c constraints.txt -e '.[test]'
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
	$(VENV)/bin/lint-imports

bench: $(TSTAMP)
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# kill -9, full-disk and read-error trials: 20 kills each of split, merge and update
faults: $(TSTAMP)
	SAFESHARD_FAULT_TRIALS=$${SAFESHARD_FAULT_TRIALS:-20} $(PY) -m pytest -q tests/system/test_faults.py tests/system/test_crash.py tests/io/test_transaction.py

# 10 minutes of fuzzing (SAFESHARD_FUZZ_SECONDS=600): mutated checkpoints and indexes through
# every command, from a random seed it prints (SAFESHARD_FUZZ_SEED=N replays a run); prints
# the cases tried and each command's outcomes. A short fixed run is part of `make test`.
fuzz: $(TSTAMP)
	SAFESHARD_FUZZ_SECONDS=$${SAFESHARD_FUZZ_SECONDS:-600} $(PY) -m pytest -q -s tests/system/test_fuzz.py -k campaign

# 1,000,000 zero-size tensors, and a header at the 100 MB limit, through every command
# (SCALE_ARGS="--tensors 200000" for a quicker run).
bench-scale: $(STAMP)
	$(PY) benchmarks/scale.py $(SCALE_ARGS)

bench-stream: $(TSTAMP)
	$(PY) benchmarks/stream_bench.py $(BENCH_ARGS)

# split and load against a local S3 server (moto), beside local files and download-first
bench-s3: $(TSTAMP)
	$(PY) benchmarks/s3_bench.py $(BENCH_ARGS)

# tensor-parallel ranks reading only their slices, against whole-checkpoint-then-slice
bench-tp: $(TSTAMP)
	$(PY) benchmarks/tp_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
