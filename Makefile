# Two commands matter: `make demo` and `make test`. Both create or reuse .venv with the pinned lock.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: venv demo demo-drift test bench up down lint lock clean

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found " + sys.version.split()[0] + ": make PYTHON=/path/to/python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

demo: venv  ## one complete lifecycle of demand_forecast on the local adapters, then a summary
	$(PY) scripts/demo.py

demo-drift: venv  ## shifted traffic to the demo service: the monitor's breach, the alert, the retrain it requests
	$(PY) scripts/demo_drift.py

test: venv  ## the test suite (unit, DAG integrity, end-to-end on the local adapters)
	$(PY) -m pytest

bench: venv  ## parse-time and lifecycle wall-time benchmarks, printed as tables
	$(PY) scripts/bench.py

up: venv  ## Airflow UI (standalone) on :8080 and MLflow UI on :5000, over the same .local state
	$(PY) scripts/up.py

down:  ## stop the local model services started by deployments (and the fronts on their stable ports)
	$(PY) scripts/up.py --stop-services

lint: venv
	$(VENV)/bin/ruff check dags plugins include tests scripts
	$(VENV)/bin/mypy -p mlops_lifecycle  # plugins/, configured in pyproject.toml (strict for the stage contract)

lock: venv  ## re-resolve requirements.in into the pinned requirements.txt
	$(VENV)/bin/uv pip compile requirements.in --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header -o requirements.txt

clean:  ## forget all local state (Airflow home, MLflow store, warehouse, deployment repository)
	-$(PY) scripts/up.py --stop-services
	rm -rf .local
