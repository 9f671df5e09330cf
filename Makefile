# moescale: `make demo` and `make test` are the only commands a fresh clone needs.
# Each creates .venv if missing and (re)installs the package whenever setup.cfg changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# 8 fake CPU devices so sharding tests see a mesh; must be set before jax is imported.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/moescale demo

bench: $(STAMP)
	$(VENV)/bin/moescale bench

clean:
	rm -rf $(VENV) build src/*.egg-info runs/demo
