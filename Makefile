# Developer entry points. `make test` is what CI runs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test unit cluster cluster-down demo sbatch bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

## test: install everything the tests need, then run every tier
test: install
	$(PY) -m pytest -q

## unit: the fast tier only (no cluster, no vLLM)
unit: install
	$(PY) -m pytest -q tests/unit -m "not slow"

## cluster: start the local 4-node Slurm test cluster by hand (root); cluster-down removes it
cluster: install
	$(PY) -m hpc_serve.demo.localcluster up --nodes 4

cluster-down: install
	$(PY) -m hpc_serve.demo.localcluster down

## demo: a real 2-node deployment of a tiny model on a throwaway local Slurm cluster (root)
demo: install
	$(VENV)/bin/hpc-serve demo

## sbatch: regenerate the ready-to-run scripts in sbatch/ from templates/
sbatch: install
	$(PY) sbatch/generate.py

## bench: every benchmark (root for all but cli_speed); writes benchmarks/results/
bench: install
	$(PY) benchmarks/cli_speed.py
	$(PY) benchmarks/slurm_submit.py
	$(PY) benchmarks/ray_formation.py
	$(PY) benchmarks/bootstrap.py
	$(PY) benchmarks/tunnel.py
	$(PY) benchmarks/faults.py

clean:
	rm -rf $(VENV) dist build *.egg-info
