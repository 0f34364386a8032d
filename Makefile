# Two entry points on a fresh clone: `make demo` (the quickstart sweep) and `make test`.
# Each creates the virtual environment it needs in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-data test bench gpu-check clean-runs

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[sweep,test]"
	touch $(STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# The quickstart's data, Debian's Fashion-MNIST, installed here when this user may (root, or
# sudo without a password). Otherwise the launch stops before Ray starts, naming the command.
demo-data:
	@test -d $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else exit 0; fi; \
	  echo "installing Debian's dataset-fashion-mnist, the quickstart's data"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
	    || { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	         apt-get install -y -qq dataset-fashion-mnist; } || true; }

demo: $(STAMP) demo-data
	$(VENV)/bin/mim4dd-sweep launch sweeps/quickstart.yaml
	$(VENV)/bin/mim4dd-sweep report quickstart

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_distill.py
	$(PY) benchmarks/bench_evaluate.py
	$(PY) benchmarks/bench_speed.py

# On a GPU machine, offline, at most 8 minutes: the CUDA tests and what a GPU changes (step
# times, vmap evaluation, syncs, memory, the service, trials sharing a GPU). Report: $OUT if set,
# else ./gpu-check-report/. Without CUDA it stops at once (--dry-run-cpu: a tiny CPU rehearsal).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean-runs:
	rm -rf .mim4dd runs
