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

# The GPU check's dry run gets a venv of its own with only what the GPU machine has (no vit-pytorch,
# no xformers, fastvit installed without its dependencies).
DRY_VENV ?= .venv-gpu-check
GPU_MACHINE_PACKAGES ?= timm einops rich pytest pytest-xdist hypothesis
GPU_CHECK_ARGS ?=

.PHONY: test bench kernels kernels-check kernels-check-triton36 check lint gpu-check gpu-check-dry-run clean

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

# The machine-code check: also fails on spills and serialised wgmma (ptxas C7515) in any variant.
kernels-check: $(STAMP)
	$(VENV)/bin/fastvit kernels --check --json build/kernels-check.json

# The same check with the GPU machine's triton (3.6.0), installed beside this venv's torch: the spill
# table holds what 3.6 adds (kernels/spill_table.py, PRUNED_TRITON_3_6), and this proves it.
TRITON36 ?= build/triton-3.6.0
kernels-check-triton36: $(STAMP)
	test -d $(TRITON36)/triton || $(PY) -m pip install --quiet --no-deps --target $(TRITON36) triton==3.6.0
	PYTHONPATH=$(CURDIR)/$(TRITON36) TRITON_CACHE_DIR=$(CURDIR)/build/triton-3.6.0-cache \
		$(PY) -m fastvit.kernels.aot --check --json build/kernels-check-triton36.json

check: $(STAMP)
	$(VENV)/bin/fastvit check

lint: $(STAMP)
	$(VENV)/bin/ruff check fastvit kernels tests benchmarks

# On a CUDA machine with torch, triton, timm, einops, rich, pytest and hypothesis preinstalled (no
# network needed): the kernel tests natively, `fastvit check`, the benchmarks and `fastvit tune`, in at
# most 420 s, into benchmarks/results/gpu-<device>-<date>.json (GPU_CHECK_ARGS="--out-dir DIR" copies it).
gpu-check:
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PYTHON) -m pip install --quiet --no-deps -e .
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The same orchestration on this CPU, in a fresh venv shaped like the GPU machine (CI runs it).
gpu-check-dry-run:
	test -x $(DRY_VENV)/bin/python || $(PYTHON) -m venv $(DRY_VENV)
	$(DRY_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC) $(GPU_MACHINE_PACKAGES)
	$(DRY_VENV)/bin/python -m pip install --quiet --no-deps -e .
	$(MAKE) gpu-check PYTHON=$(DRY_VENV)/bin/python GPU_CHECK_ARGS="--device cpu --quick --out $(CURDIR)/build/gpu-check-dry-run.json $(GPU_CHECK_ARGS)"

clean:
	rm -rf $(VENV) $(DRY_VENV) build dist *.egg-info
