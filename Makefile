# The only entry points a newcomer needs. Each of up/test/bench runs setup first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup up down test lint unit bench clean

setup:
	bash scripts/bootstrap

up: setup
	$(VENV)/bin/millrace up $(UP_ARGS)

down:
	$(VENV)/bin/millrace down

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy millrace
	$(VENV)/bin/lint-imports

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
