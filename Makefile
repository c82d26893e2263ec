# `make test` and `make demo` work on a fresh clone: they create .venv and
# install what they need first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEV_STAMP := $(VENV)/.dev-installed
RUN_STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo bench docs clean

test: lint typecheck pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy --strict p2ptimeline

pytest: $(DEV_STAMP)
	$(BIN)/pytest

demo: $(RUN_STAMP)
	$(BIN)/python examples/demo.py

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/store.py

# The documentation site (mkdocs-material + mkdocstrings), into site/.
docs: $(DEV_STAMP)
	$(BIN)/mkdocs build --strict

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(RUN_STAMP)

clean:
	rm -rf $(VENV) dist build site .pytest_cache .mypy_cache .ruff_cache .hypothesis
