# Two commands a user needs: `make demo` (set up, then run the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: it takes the local CPU wheel instead of several GB of CUDA wheels
	$(VENV)/bin/pip install -q "torch==2.13.0"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) launch.py

test: setup
	bash scripts/run_tests.sh $(VENV)

# Everything except the tests that need the local Slurm (no root needed).
test-fast: lint
	DS_ACCELERATOR=cpu $(PY) -m pytest -q -m "not slurm" tests

# The same checks run by pre-commit (.pre-commit-config.yaml) and by `make test`.
lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(PY) scripts/render_help.py --check

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format . && $(PY) scripts/render_help.py
