# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,s3]'
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(BIN)/baton demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/storage_bench.py
	$(BIN)/python bench/model_bench.py
	$(BIN)/python bench/server_bench.py
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/flow_bench.py
	$(BIN)/python bench/sync_cli_bench.py
	$(BIN)/python bench/hf_bench.py
