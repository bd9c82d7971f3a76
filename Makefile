# The entry point for everything: `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST_PORTS ?= --tcp 127.0.0.1:5050 --udp 127.0.0.1:5051

.PHONY: run test lint typecheck clean help

help:
	@echo "make run   - create .venv, install, serve the demo on tcp 5050 / udp 5051"
	@echo "make test  - create .venv, install dev dependencies, run the whole test suite"
	@echo "make lint  - ruff and mypy"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/sockstack serve $(HOST_PORTS)

test: $(VENV)/.installed-dev
	PYTHONASYNCIODEBUG=1 $(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
