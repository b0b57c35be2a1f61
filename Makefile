# `make test` and `make bench` set everything up on a fresh machine by themselves:
# the first call creates .venv and installs fastvit with its dev extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines this project runs on carry these two wheels on disk; override on other hosts,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.fastvit-installed
PYTEST_WORKERS ?= 2

.PHONY: test bench kernels check lint gpu-check clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q tests

bench: $(STAMP)
	$(VENV)/bin/fastvit bench --json benchmarks/results/cpu-latest.json

kernels: $(STAMP)
	$(VENV)/bin/fastvit kernels

check: $(STAMP)
	$(VENV)/bin/fastvit check

lint: $(STAMP)
	$(VENV)/bin/ruff check fastvit kernels tests benchmarks

# On a CUDA machine with torch preinstalled: tests natively, `fastvit check`, the benchmarks and the
# AOT report, into one JSON under benchmarks/results/.
gpu-check:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build dist *.egg-info
