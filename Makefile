# atlas-pl developer entry points. Each target creates .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench clean

$(BIN)/atlas-pl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/atlas-pl

venv: $(BIN)/atlas-pl

demo: venv
	$(BIN)/atlas-pl fit --config configs/demo.yaml

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -m "not gpu"

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: venv
	$(BIN)/python benchmarks/split_overhead.py

clean:
	rm -rf $(VENV) lightning_logs atlas_runs .pytest_cache
