# The two Quick start commands: `make run` and `make test`. Each creates .venv
# on first use; nothing but Python 3.11+ is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean lock

# requirements.lock pins every dependency to what the suite last passed with, so a
# fresh clone and CI install exactly that; `make lock` writes it again (needs uv).
$(STAMP): pyproject.toml clients/python/pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e clients/python -e .
	touch $(STAMP)

lock:  ## pin the dependencies again from pyproject.toml (uv from PyPI)
	uv pip compile pyproject.toml clients/python/pyproject.toml --extra dev --extra bench \
		--python-version 3.11 --universal -o requirements.lock

run: $(STAMP)  ## serve on 127.0.0.1:8000 (embedded Postgres unless SSEHUB_DATABASE_URL is set)
	$(BIN)/ssehub serve

test: $(STAMP)  ## the whole suite against a real Postgres (embedded unless SSEHUB_TEST_DATABASE_URL)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## the benchmark suite (bench/), writes docs/BENCHMARKS.md
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .ssehub-test .mypy_cache .ruff_cache .pytest_cache
