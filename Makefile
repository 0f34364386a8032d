# Two entry points on a fresh clone: `make demo` (the quickstart sweep) and `make test`.
# Each creates the virtual environment it needs in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean-runs

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[sweep,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mim4dd-sweep launch sweeps/quickstart.yaml
	$(VENV)/bin/mim4dd-sweep report quickstart

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_distill.py
	$(PY) benchmarks/bench_evaluate.py

clean-runs:
	rm -rf .mim4dd runs
