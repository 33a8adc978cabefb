# Set-up is part of each target: on a fresh clone `make test` or `make quickstart`
# creates the virtual environments first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= quickstart_workdir
# The second test leg's interpreter: the first Python 3.12 that runs (pyenv
# machines have a `python3.12` shim that may not).
PY312_CANDIDATES = python3.12 $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12 \
  $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 \
  /usr/local/bin/python3.12 /usr/bin/python3.12)
PY312 ?= $(firstword $(foreach p,$(PY312_CANDIDATES),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
VENV312 ?= .venv312
# The tests marked `lean` (model, losses, steps): they import no TensorFlow, seqio or torch.
LEAN_TESTS = $(shell grep -l -r '^pytestmark = pytest.mark.lean' tests)

.PHONY: install test test-main test-py312 quickstart

# The package alone (what the quickstart needs), then the test and plan extras
# (torch as the oracle, libtpu, the notebook kernel) for the tests only.
$(BIN)/miniend: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(BIN)/miniend

$(VENV)/.test-extras: $(BIN)/miniend
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,plan]'
	touch $@

install: $(VENV)/.test-extras

$(VENV312)/bin/pytest: requirements-lean-py312.txt
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet -r requirements-lean-py312.txt
	touch $(VENV312)/bin/pytest

# 8 fake CPU devices make every mesh in the tests real. Whole files go to the
# two workers, slowest first (the order is in tests/conftest.py).
XDIST = -n 2 --dist loadfile --no-loadscope-reorder
test-main: $(VENV)/.test-extras
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest $(XDIST) -q tests

# The lean core on Python 3.12 with the newest JAX and Flax we accept (no torch:
# the oracle tests stay in test-main).
test-py312:
	@if [ -z "$(PY312)" ]; then echo "test-py312: no working python3.12 here (set PY312=/path/to/python3.12)"; exit 1; fi
	$(MAKE) $(VENV312)/bin/pytest
	PYTHONPATH=$(CURDIR) XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(VENV312)/bin/python -m pytest $(XDIST) -q -p no:cacheprovider -m lean $(LEAN_TESTS)

test: test-main test-py312

quickstart: $(BIN)/miniend
	$(BIN)/miniend quickstart --workdir $(WORKDIR)
