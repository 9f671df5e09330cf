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

.PHONY: install test demo study bench mutate clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS) tests

# The demo: a small scaling study on the embedded corpus, trained, evaluated and reported in
# about 6 minutes on 2 cores (experiments/demo.py; README.md, "The demo"). Run again, it reuses
# the finished runs in runs/demo (a stopped one resumes from its checkpoint); a runs/demo of
# another grid is left alone and the study goes to runs/demo-2, ...
demo: $(STAMP)
	$(PY) experiments/demo.py

# The study: the demo's models at five dense sizes, each configuration with three seeds, trained
# 3x longer: about an hour on 2 cores (experiments/study.py; README.md, "The study"). It ends by
# answering both papers' questions with the seed spread; run again, it continues in runs/study.
study: $(STAMP)
	$(PY) experiments/study.py

bench: $(STAMP)
	$(VENV)/bin/moescale bench

# Mutation testing (mutmut) of the modules setup.cfg's [mutmut] lists, on the fast tests. Not
# part of `make test`; mutmut is installed here, not as a test dependency. All ~3,100 mutants
# take about a day on 2 cores; `make mutate MUTATE_SAMPLE=20` runs 20 per module (~1.5 hours),
# the same ones for the same MUTATE_SEED. mutants/ keeps every verdict: a rerun tests only the
# mutants of functions that changed. docs/mutation.md: the scores and the mutants kept alive.
# One child at a time: each mutant's tests already use every core through XLA. The tests' XLA
# flags, and one compilation cache for every mutant: a mutant's process compiles afresh only
# the programs its mutation changed.
MUTMUT := $(VENV)/bin/mutmut
MUTMUT_VERSION := 3.8.1
MUTATE_SAMPLE ?=
MUTATE_SEED ?= 0
MUTATE_ENV := XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3 \
  JAX_COMPILATION_CACHE_DIR=$(CURDIR)/mutants/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5

mutate: $(STAMP)
	$(PY) -m pip show mutmut 2>/dev/null | grep -qx 'Version: $(MUTMUT_VERSION)' || \
	  $(PY) -m pip install -q mutmut==$(MUTMUT_VERSION)
ifeq ($(MUTATE_SAMPLE),)
	$(MUTATE_ENV) nice -n 19 $(MUTMUT) run --max-children 1
else
	$(PY) tests/mutation.py generate > /dev/null
	names="$$($(PY) tests/mutation.py sample $(MUTATE_SAMPLE) --seed $(MUTATE_SEED) --unchecked)"; \
	  test -z "$$names" || $(MUTATE_ENV) nice -n 19 $(MUTMUT) run --max-children 1 $$names
endif
	$(PY) tests/mutation.py summary $(MUTATE_SAMPLE) --seed $(MUTATE_SEED)
	@echo 'mutmut results: the mutants not killed; mutmut show NAME: one diff'

clean:
	rm -rf $(VENV) build src/*.egg-info runs/demo runs/demo-* runs/study runs/study-*
