# contad — two-command quick start: `make demo` and `make test`.
# Both create/refresh .venv from requirements.lock when needed (idempotent; a no-op when up to date).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.contad-installed
OUT ?= runs/demo
PYTEST_ARGS ?=

# Offline, telemetry-free settings for everything started from here.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-fast lock bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/contad demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.bench_methods
	$(PY) -m benchmarks.bench_masks
	$(PY) -m benchmarks.real_sequence

lock: $(STAMP)
	{ echo "# Fully pinned environment (pip freeze of a known-good install, Python 3.11). Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^contad'; } > requirements.lock

clean-venv:
	rm -rf $(VENV)
