# The two commands: `make demo` and `make test`. Every target creates .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv demo test lint format unit integration e2e bench stack-up stack-down clean

help:
	@echo "make demo    run the main job on the local stack (creates .venv when missing)"
	@echo "make test    lint, then the unit, integration and end-to-end tests"
	@echo "make bench   run the benchmarks under bench/"
	@echo "make stack-up / stack-down   start or stop the local stack"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25"
	$(BIN)/python -m pip install --progress-bar off -r requirements.txt -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/pytest -m integration $(PYTEST_ARGS)

e2e: $(STAMP)
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/dataloading.py

stack-up: $(STAMP)
	$(BIN)/tirelib stack up

stack-down: $(STAMP)
	$(BIN)/tirelib stack down

demo: $(STAMP)
	$(BIN)/tirelib demo

clean:
	-$(BIN)/tirelib stack down
	rm -rf .tire
