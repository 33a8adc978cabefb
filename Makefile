# Set-up is part of each target: on a fresh clone `make test` or `make quickstart`
# creates the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= quickstart_workdir

.PHONY: install test quickstart

$(BIN)/miniend: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,plan]'
	touch $(BIN)/miniend

install: $(BIN)/miniend

# 8 fake CPU devices make every mesh in the tests real.
test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -n 2 -q tests

quickstart: install
	$(BIN)/miniend quickstart --workdir $(WORKDIR)
