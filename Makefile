# Two commands: `make train` (the main job) and `make test` (lint, format check and the whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Test processes: most tests wait on single-threaded XLA compilation, so two workers use a 2-core machine fully.
TEST_WORKERS ?= 2

.PHONY: train test bench clean

# The venv is rebuilt when pyproject.toml changes; stamps record which extras are installed.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(BIN)/python train.py
	$(BIN)/python evaluate.py

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(VENV)/.installed-test
	$(BIN)/python bench/compare_torch.py

clean:
	rm -rf $(VENV)
