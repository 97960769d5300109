"""Test-wide settings: offline, telemetry-free, deterministic, CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.cli import OFFLINE_ENV  # the CLI's own offline, telemetry-free defaults (light import: no Prefect)

for _key, _value in {**OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": ""}.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``make test``: ``-n 2``) each worker and its child processes get their share of the
    cores' threads, so two workers do not oversubscribe the machine (2 vCPUs here: one thread each)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, threads)
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores_between_workers()


def real_ad_root() -> Path:
    """Root of the shared real industrial datasets (env CONTAD_REAL_AD overrides)."""
    return Path(os.environ.get("CONTAD_REAL_AD", REPO_ROOT.parent / "shared" / "data" / "real-ad"))


@pytest.fixture
def real_ad() -> Path:
    root = real_ad_root()
    if not root.is_dir():
        pytest.skip(f"real datasets not available at {root}")
    return root


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)


# The longest test files (``make test PYTEST_ARGS=--durations=30``: each 1-5 min on 2 cores). Under
# ``--dist loadfile`` a worker takes whole files in collection order, so these go first: started last, the
# longest of them would leave the other worker idle for minutes at the end. A renamed file is just not moved.
LONGEST_FILES = ("test_readme_commands.py", "test_dvc_pipeline.py", "test_infra_worker.py", "test_leaderboard.py",
                 "test_serve_prefect.py", "test_fault_injection.py", "test_cli_ux.py", "test_pipeline_demo.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the ``LONGEST_FILES`` first (longest first); every other file keeps its place."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
