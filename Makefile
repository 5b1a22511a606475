# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine: they create
# .venv, install the pinned requirements and build the extension first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.engine-installed

.PHONY: setup demo test lint bench nvcc-check triton-check install-check side-check clean

$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/**/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip uninstall -q -y engine 2>/dev/null || true  # the distribution's name before 0.2.0
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_certify.py

nvcc-check: $(STAMP)
	csrc/nvcc_check.sh

triton-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m engine.kernels.compile_check --arch 90

# `pip install .` into a fresh virtual environment (outside the source tree): the package imports, the console
# script runs, and no top-level `kernels` package is installed. torch is installed first at the pinned version.
CHECK_VENV ?= /tmp/pacd-engine-install-check
install-check:
	rm -rf $(CHECK_VENV) && $(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(CHECK_VENV)/bin/python -m pip install -q .
	cd /tmp && $(CHECK_VENV)/bin/python -c "import importlib.util as u, engine, engine.kernels, engine._ext as e; \
	  assert u.find_spec('kernels') is None, 'top-level kernels installed'; \
	  print('engine', engine.__version__, 'extension', e.available())"
	cd /tmp && $(CHECK_VENV)/bin/pacd-engine --version && $(CHECK_VENV)/bin/pacd-engine certify --help > /dev/null

# The GPU machine's software on this CPU (issue 33): Python 3.12, torch 2.11, triton 3.6 in .venv312 (PyPI has no CPU
# wheel of torch 2.11 for Linux: this installs its CUDA build, about 4.5 GB, which runs on the CPU too), the extension
# built with its CUDA sources for sm_90 against torch 2.11's headers, then the suite under the Triton interpreter.
# numpy stays below 2.4: triton 3.6's interpreter does not run with numpy 2.4 (tests/conftest.py says so).
SIDE_PYTHON ?= python3.12
SIDE_VENV := .venv312
side-check:
	test -x $(SIDE_VENV)/bin/python || $(SIDE_PYTHON) -m venv $(SIDE_VENV)
	$(SIDE_VENV)/bin/python -m pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" scipy==1.17.1 safetensors==0.8.0 \
	  tqdm==4.70.1 filelock==4.3.2 matplotlib==3.11.2 mpmath==1.3.0 pytest==9.2.0 pytest-benchmark==5.3.1 \
	  setuptools==84.2.1 ninja
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$$(nproc) \
	  $(SIDE_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	$(SIDE_VENV)/bin/python -m pytest -q tests

clean:
	rm -rf build engine/_C*.so *.egg-info
