"""What MLflow and Prefect show first: the experiment kind (not MLflow 3's GenAI overview) and one
Prefect artifact key per run directory (so "latest" is never another run's table)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.run_links import run_key
from flows.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment, make_client_for_uri


def test_experiments_are_tagged_as_model_development(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = make_client_for_uri(uri)
    created = ensure_experiment(client, "contad-new", uri)
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    old = client.create_experiment("contad-old")  # made by an earlier contad version: no kind yet
    assert ensure_experiment(client, "contad-old", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    chosen = client.create_experiment("contad-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert ensure_experiment(client, "contad-chosen", uri) == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice is kept


def test_artifact_key_is_per_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = run_key("ucad", "sequential", tmp_path / "a" / "demo"), run_key("ucad", "sequential", tmp_path / "b" / "demo")
    assert a != b and a.startswith("contad-ucad-sequential-demo-") and b.startswith("contad-ucad-sequential-demo-")
    monkeypatch.chdir(tmp_path)
    assert run_key("ucad", "sequential", Path("a/demo")) == a  # relative or absolute: the same directory, the same key
    key = run_key("patchcore_finetune", "2-1", tmp_path / "Runs" / "X_1")
    assert re.fullmatch(r"contad-patchcore-finetune-2-1-x-1-[0-9a-f]{6}", key)  # Prefect's alphabet: a-z, 0-9, dashes
    assert run_key("ucad", "sequential", None) == "contad-ucad-sequential"
