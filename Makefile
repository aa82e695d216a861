# One tool per job. `make install` once, then any target.
VENV ?= .venv
PY := $(VENV)/bin/python

install:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install torch==2.13.0 -e '.[dev]'

serve:
	$(VENV)/bin/loraforge serve

style:
	$(VENV)/bin/ruff format src tests bench && $(VENV)/bin/ruff check --fix src tests bench

quality:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy && $(VENV)/bin/lint-imports

lint-imports:
	$(VENV)/bin/lint-imports

# Everything CI runs (the README's test command): unit, slow and integration tests.
test:
	$(PY) -m pytest -m "not gpu"

# Plain `pytest`: the quick unit tests (no slow, integration or gpu ones).
test-unit:
	$(PY) -m pytest

test-slow:
	$(PY) -m pytest -m slow

test-integration:
	$(PY) -m pytest -m integration

test-gpu:
	$(PY) -m pytest -m gpu

.PHONY: install serve style quality lint-imports test test-unit test-slow test-integration test-gpu
