# `make test` and `make demo` build .venv themselves on a fresh machine and reuse it after.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
DEPS   := torch==2.13.0 triton==3.8.0 numpy pytest pytest-benchmark ninja expecttest \
          scikit-learn matplotlib tqdm scipy setuptools wheel
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*.h csrc/*/*.h)
# Triton kernels run on the CPU under its interpreter; it must be set before triton is imported.
TEST_ENV := TRITON_INTERPRET=1 OMP_NUM_THREADS=2

.PHONY: venv build test demo bench clean

$(VENV)/.deps: Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(DEPS)
	touch $@

venv: $(VENV)/.deps

# The extension is rebuilt when a C++/CUDA source or the build files change.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(VPY) -m pip install -q -e . --no-build-isolation
	touch $@

build: $(VENV)/.built

test: build
	$(TEST_ENV) $(VPY) -m pytest -q tests

demo: build
	$(VPY) -m grokalign_fast.experiments grok-digits

bench: build
	$(VPY) -m pytest -q bench --benchmark-only

clean:
	rm -rf build *.egg-info grokalign_fast/_C*.so $(VENV)/.built
