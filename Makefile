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

.PHONY: test bench kernels kernels-check kernels-check-triton36 kernels-test-triton36 check lint gpu-check gpu-check-dry-run clean

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

# The GPU machine's triton (3.6.0), installed beside this venv's torch (torch's triton pin ignored) and
# put first on PYTHONPATH by the two targets below. Order-only on the venv: a reinstall of fastvit does
# not reinstall it.
TRITON36 ?= build/triton-3.6.0
TRITON36_CACHE = TRITON_CACHE_DIR=$(CURDIR)/build/triton-3.6.0-cache
$(TRITON36)/.installed: | $(STAMP)
	rm -rf $(TRITON36)
	$(PY) -m pip install --quiet --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

# The AOT check with triton 3.6.0: the spill table holds what 3.6 adds (kernels/spill_table.py,
# PRUNED_TRITON_3_6), and this proves it.
kernels-check-triton36: $(TRITON36)/.installed
	PYTHONPATH=$(CURDIR)/$(TRITON36) $(TRITON36_CACHE) \
		$(PY) -m fastvit.kernels.aot --check --json build/kernels-check-triton36.json

# The kernel tests (tests/kernels, under the interpreter on a CPU) with triton 3.6.0: a triton.language
# call that 3.6 lacks or computes differently fails here, not first on the GPU machine (the AOT check
# above covers what only the compiler sees). 3.6's interpreter takes int() of a 1-element 1-d array
# (a tensor used as an index, e.g. `range(0, Nk, BLOCK_N)`; 3.8 squeezes it first): numpy 2.4 raises
# TypeError there and numpy 1.25-2.3 warn, failing the tests that turn warnings into errors. So this
# run alone gets numpy 1.24.4, the last without the warning (wheels up to Python 3.11), in a directory
# of its own; the AOT check keeps the venv's numpy. The guard fails if the triton or numpy imported is
# not the one installed here. About 2.5-3 min with one worker on 2 cores, all of tests/kernels.
NUMPY_FOR_TRITON36 ?= build/numpy-for-triton-3.6.0
$(NUMPY_FOR_TRITON36)/.installed: | $(STAMP)
	rm -rf $(NUMPY_FOR_TRITON36)
	$(PY) -m pip install --quiet --no-deps --target $(NUMPY_FOR_TRITON36) numpy==1.24.4
	touch $@

TRITON36_TEST_ENV = PYTHONPATH=$(CURDIR)/$(TRITON36):$(CURDIR)/$(NUMPY_FOR_TRITON36) $(TRITON36_CACHE)
kernels-test-triton36: $(TRITON36)/.installed $(NUMPY_FOR_TRITON36)/.installed
	$(TRITON36_TEST_ENV) $(PY) -c "import numpy, triton, sys; \
		v = (triton.__version__, numpy.__version__); print('triton', v[0], 'numpy', v[1]); \
		sys.exit(0 if v == ('3.6.0', '1.24.4') else f'expected triton 3.6.0 with numpy 1.24.4, got {v}')"
	$(TRITON36_TEST_ENV) $(PY) -m pytest -n $(PYTEST_WORKERS) -q tests/kernels

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
