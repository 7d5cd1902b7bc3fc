# Two commands on a fresh machine (Python ≥ 3.10): `make train` and `make test`.
# `make setup` creates .venv idempotently; constraints.txt pins the CPU build of torch
# (edit or drop it for a CUDA machine).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

bench: setup
	$(PY) scripts/bench.py

lint: setup
	$(VENV)/bin/ruff check advarch hydra_plugins scripts tests train.py eval.py
