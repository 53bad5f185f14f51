# Waha: `make run` starts everything for development; `make test` runs the whole suite.
# Both do their own set-up on a fresh Debian machine with Python 3.11 and make.

SHELL := /bin/bash
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
# Use the machine's Python; never download an interpreter.
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := python3.11

.PHONY: run test install services migrate lint typecheck bench clean

$(UV):
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(BIN)/waha: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen
	@touch $@

install: $(BIN)/waha

services:
	bash platform/scripts/ensure-services.sh

migrate: install services
	$(BIN)/waha migrate

run: migrate
	$(BIN)/waha dev

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

test: install services lint typecheck
	$(BIN)/pytest -n 2 --dist loadgroup

bench: migrate
	WAHA_BENCH_TOOLS=1 bash platform/scripts/ensure-services.sh
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
