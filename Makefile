# Set-up is part of each target: on a fresh clone `make test` or `make quickstart`
# creates the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= quickstart_workdir
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: install test quickstart benchmarks

$(BIN)/miniend: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/miniend

install: $(BIN)/miniend

test: install
	$(BIN)/python -m pytest -n 2 -q tests

quickstart: install
	$(BIN)/miniend quickstart --workdir $(WORKDIR)
