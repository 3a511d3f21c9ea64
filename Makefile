# The only entry points a newcomer needs. Each of up/test/bench runs setup first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup up down test lint unit bench screenshots clean

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
	PY=$(PY) scripts/run-tests $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run.py

# The dashboard pictures in README.md and docs/dashboards.md: the browser test, told to save
# its screenshots into docs/img/ (under `make test` they go to a temporary folder).
screenshots: setup
	MILLRACE_SCREENSHOTS_DIR=docs/img $(PY) -m pytest tests/dashboards/test_browser.py -q

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
