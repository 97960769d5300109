"""``contad`` is offline and telemetry-free by itself, not only under ``make``.

The Makefile and tests/conftest.py export the offline variables; a user who runs ``.venv/bin/contad``
from a plain shell has none of them, and the temporary Prefect server then logged
``ERROR | prefect.server.services.telemetry - Failed to send telemetry`` on every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import OFFLINE_ENV, main

REPO = Path(__file__).resolve().parents[1]
CONTAD = Path(sys.executable).with_name("contad")


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """The current environment without any offline/analytics variable, Prefect's home in ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV and not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow  # starts the temporary Prefect server (about 20 s on 2 cores)
def test_run_from_a_plain_shell_sends_no_telemetry(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    result = subprocess.run([str(CONTAD), "run", "--out", str(out), f"data.root={tmp_path / 'empty'}",
                             f"tracking.uri=sqlite:///{out / 'mlflow.db'}"],
                            cwd=REPO, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output  # the empty data folder fails validation inside the flow run
    assert "FAILED validation" in output and "Starting temporary server" in output  # the Prefect server did start
    assert "telemetry" not in output.lower(), output


def test_main_sets_offline_defaults_and_keeps_explicit_values(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's explicit choice wins
    assert main(["config", "show"]) == 0
    capsys.readouterr()
    assert {k: os.environ[k] for k in OFFLINE_ENV} == {**OFFLINE_ENV, "HF_HUB_OFFLINE": "0"}


def test_leaderboard_real3d_overrides_are_the_ib_iumad_benchmark_sizes() -> None:
    """`make leaderboard` runs real-3d at bench_ib_iumad's CPU sizes and training; the two must not drift apart."""
    from benchmarks.bench_ib_iumad import CPU_SIZES, config

    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("IB_IUMAD_CPU ="))
    overrides = dict(item.split("=", 1) for item in line.split("=", 1)[1].split())
    cfg = config("rgb+depth", "cross_attention", int(overrides["data.image_size"]), int(overrides["ib_iumad.epochs"]))
    expected = {**{k: str(v) for k, v in CPU_SIZES.items()}, "data.image_size": "128",
                "data.heldout_fraction": str(cfg.data.heldout_fraction), "ib_iumad.epochs": "48",
                "ib_iumad.early_stopping_patience": str(cfg.ib_iumad.early_stopping_patience), "ib_iumad.lr": str(cfg.ib_iumad.lr)}
    assert overrides == expected
