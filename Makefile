# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test gpu-check install system-deps clean

install: $(STAMP)

# torch is pinned first, from pip's configured index: on PyPI for Linux that is the CUDA build (several
# GB, it runs on CPU too). A CPU-only machine gets the CPU build with
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (unset by default: the CI machine's pip already serves a local CPU wheel of 2.13.0).
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[test,export]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jobs.demo

# PostgreSQL and Prometheus for the infra integration tests (Debian packages; a no-op when present).
system-deps:
	bash infra/local/system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=30

# Not part of `make test`: the GPU-only tests and benchmarks, one table of targets (at most 8 minutes,
# enforced). Without CUDA it prints one line saying so and exits 0.
gpu-check: $(STAMP)
	$(PY) -m jobs.bench gpu

clean:
	rm -rf work .pytest_cache
