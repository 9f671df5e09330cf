# moescale: `make demo` and `make test` are the only commands a fresh clone needs.
# Each creates .venv if missing and (re)installs the package whenever setup.cfg changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# 8 fake CPU devices so sharding tests see a mesh (set before jax is imported). Only the
# tests get them: on 2 cores the tiny run's step took 0.92 s over 8 fake devices, 0.34-0.44 s
# on the one real device.
TEST_XLA_FLAGS ?= --xla_force_host_platform_device_count=8
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/moescale demo

bench: $(STAMP)
	$(VENV)/bin/moescale bench

clean:
	rm -rf $(VENV) build src/*.egg-info runs/demo
