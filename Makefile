# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine: they create
# .venv, install the pinned requirements and build the extension first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.engine-installed

.PHONY: setup demo test lint bench nvcc-check triton-check clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/**/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m engine demo

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check engine kernels tests bench setup.py

bench: $(STAMP)
	$(PY) bench/bench_certify.py

nvcc-check: $(STAMP)
	csrc/nvcc_check.sh

triton-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m kernels.compile_check --arch 90

clean:
	rm -rf build engine/_C*.so *.egg-info
