# The two commands of the README: `make demo` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test lint typecheck pytest services bench clean schema

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Sluice needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)

# An editable install does not compile the package (a wheel install does): compile it once, so
# that start-up does not depend on PYTHONDONTWRITEBYTECODE being unset.
$(VENV)/.demo-installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[all]'
	@$(PY) -m compileall -q src
	@touch $@

$(VENV)/.dev-installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[dev]'
	@$(PY) -m compileall -q src
	@touch $@ $(VENV)/.demo-installed

## demo: build .venv, generate example orders, run the example pipeline, print the summary
demo: $(VENV)/.demo-installed
	$(PY) examples/orders/generate.py --rows 200000
	$(VENV)/bin/sluice run examples/orders/pipeline.yaml

## test: build .venv with dev deps, start local services if down, then ruff, mypy and pytest
test: $(VENV)/.dev-installed services lint typecheck pytest

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests benchmarks examples

typecheck: $(VENV)/.dev-installed
	$(VENV)/bin/mypy

pytest: $(VENV)/.dev-installed
	$(VENV)/bin/pytest -q

services:
	@bash scripts/services.sh

## bench: the batch benchmark against hand-written Polars and pandas (small input by default)
bench: $(VENV)/.dev-installed
	$(PY) benchmarks/batch/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache examples/orders/data examples/orders/out \
	       examples/orders/dead_letters examples/orders/runs

## schema: regenerate docs/pipeline.schema.json after changing a config model
schema: $(VENV)/.dev-installed
	$(VENV)/bin/sluice schema -o docs/pipeline.schema.json
