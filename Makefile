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

.PHONY: venv demo test test-fast repro lock bench leaderboard clean-venv system-deps services services-stop

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/contad demo --out $(OUT)

# `dvc repro` of dvc.yaml: its stages call `contad`, so .venv/bin goes first on PATH (nothing to activate).
repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro $(DVC_ARGS)

# Two worker processes (pytest-xdist), a test file per worker at a time: about a third of the suite is waiting on
# servers and child processes, which the other worker fills (tests/conftest.py gives each worker its share of threads).
TEST_WORKERS ?= 2
test: $(STAMP) system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

# IB-IUMAD's params.yaml network takes ~10 min per epoch on 2 CPU cores (12 epochs, 3 seeds): the real-3d
# board runs it at benchmarks/bench_ib_iumad.py's CPU sizes (the leaderboard lists these overrides).
IB_IUMAD_CPU = data.image_size=128 data.heldout_fraction=0.2 reconstruction.hidden=32 reconstruction.heads=2 \
	reconstruction.ffn=64 reconstruction.stride=16 ib_iumad.mamba_state=8 ib_iumad.mamba_expand=1 \
	ib_iumad.head_hidden=32 ib_iumad.bottleneck=32 ib_iumad.fusion_heads=2 ib_iumad.batch_size=8 \
	ib_iumad.smoothing_sigma=2.0 ib_iumad.score_pool=8 ib_iumad.epochs=48 ib_iumad.early_stopping_patience=8 ib_iumad.lr=0.003

# Order: real-3d (minutes), then real-ad (seed by seed), then the anomalib peer on real-ad (its own venv, ~1.5 h;
# its section joins the board when the last line regenerates it). Resumable: finished runs under BENCH_OUT are reused.
BENCH_OUT ?= runs/bench
BENCH = $(VENV)/bin/contad bench --out $(BENCH_OUT) --leaderboard benchmarks/LEADERBOARD.md --headline README.md --headline benchmarks/RESULTS.md

leaderboard: $(STAMP)
	$(BENCH) --sequence real-3d --seeds 3 $(IB_IUMAD_CPU)
	$(BENCH) --sequence real-ad --seeds 3
	$(PY) -m benchmarks.peer_anomalib --resume --out $(BENCH_OUT)/real-ad/peer
	$(BENCH) --sequence real-ad --seeds 3

bench: $(STAMP)
	$(PY) -m benchmarks.bench_methods
	$(PY) -m benchmarks.bench_masks
	$(PY) -m benchmarks.real_sequence

lock: $(STAMP)
	{ echo "# Fully pinned environment (pip freeze of a known-good install, Python 3.11). Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^contad'; } > requirements.lock

clean-venv:
	rm -rf $(VENV)

# System packages the integration tests and `make services` need (PostgreSQL server + client, curl).
# Idempotent and quick when present; installs with apt-get when run as root on Debian/Ubuntu, else
# says what is missing (the PostgreSQL tests then skip with that reason). No default cluster is
# created: infra/services.sh and the tests run their own, on 127.0.0.1.
system-deps:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v curl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "system-deps: installing postgresql, curl (apt-get)"; \
	  mkdir -p /etc/postgresql-common/createcluster.d && \
	  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/contad.conf && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql postgresql-client curl >/dev/null \
	    || echo "system-deps: apt-get install failed; the PostgreSQL tests will be skipped" >&2; \
	else echo "system-deps: PostgreSQL server binaries or curl missing; install them as root (apt-get install postgresql curl)" >&2; fi

# Local services on 127.0.0.1: PostgreSQL, MLflow tracking server (artifacts served), Prefect server.
services: $(STAMP) system-deps
	VENV_BIN=$(VENV)/bin bash infra/services.sh start

services-stop:
	bash infra/services.sh stop

# anomalib peer benchmark (own venv .venv-peer with anomalib pinned, built on first use; never part of `make test`).
.PHONY: bench-peer
PEER_ARGS ?=
bench-peer: $(STAMP)
	$(PY) -m benchmarks.peer_anomalib $(PEER_ARGS)
