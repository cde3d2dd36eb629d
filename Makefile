# The two commands of the README: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: any other route lets pip choose a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,demo,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradwatch demo

# Two workers, a test file each at a time (CI has two cores; much of the suite waits on child processes).
test: $(STAMP)
	$(VENV)/bin/ruff check
	$(PY) -m pytest -q -n 2 --dist loadfile

# The unit tests alone (rules, derivation, store, probe, guards, forensics, sinks): about a minute and a half.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) gradwatch-runs
