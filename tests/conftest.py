"""Test-wide settings: offline, telemetry-free, deterministic, CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.cli import OFFLINE_ENV  # the CLI's own offline, telemetry-free defaults (light import: no Prefect)

for _key, _value in {**OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": ""}.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]


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
