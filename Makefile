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
	$(VENV)/bin/ruff check . && $(VENV)/bin/mypy

test:
	$(PY) -m pytest

test-unit:
	$(PY) -m pytest tests/unit

test-integration:
	$(PY) -m pytest -m integration

test-gpu:
	$(PY) -m pytest -m gpu

.PHONY: install serve style quality test test-unit test-integration test-gpu
