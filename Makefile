# volconv: `make demo` sets up and runs the main job; `make test` sets up and runs the checks.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: setup demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m volconv demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) -m volconv bench

clean:
	rm -rf $(VENV) demo_out bench/results .pytest_cache .ruff_cache
