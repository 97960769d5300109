"""A continual run tracked into an MLflow server on a real PostgreSQL, both started by infra/services.sh
(the script behind `make services`) on 127.0.0.1 with a temporary data directory; artifacts go through
the tracking server (--serve-artifacts) and come back through it.

Skipped only when the PostgreSQL server binaries are absent (`make test` installs them: `make system-deps`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SERVICES = REPO_ROOT / "infra" / "services.sh"


def postgres_binaries() -> str | None:
    """Directory of initdb/pg_ctl, or None when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return str(Path(found[-1]).parent)
    initdb = shutil.which("initdb")
    return str(Path(initdb).parent) if initdb else None


needs_postgres = pytest.mark.skipif(
    postgres_binaries() is None or shutil.which("curl") is None,
    reason="PostgreSQL server binaries (initdb, pg_ctl) or curl not installed: run `make system-deps` as root",
)


def _services(action: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", str(SERVICES), action], env={**os.environ, **env}, capture_output=True, text=True, timeout=400)
    if done.returncode != 0:
        raise RuntimeError(f"infra/services.sh {action} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def mlflow_on_postgres() -> Iterator[tuple[str, dict[str, str]]]:
    """PostgreSQL + MLflow server from infra/services.sh in a temporary directory; yields (tracking URI, env)."""
    from tests.tracking_support import free_port

    state = Path(tempfile.mkdtemp(prefix="contad-services-"))  # under /tmp: reachable by the postgres user
    state.chmod(0o711)
    env = {
        "CONTAD_SERVICES_DIR": str(state),
        "SERVICES": "postgres mlflow",
        "PG_PORT": str(free_port()),
        "MLFLOW_PORT": str(free_port()),
        "VENV_BIN": str(Path(sys.executable).parent),
    }
    try:
        out = _services("start", env)
        assert "mlflow: http://127.0.0.1:" in out
        yield f"http://127.0.0.1:{env['MLFLOW_PORT']}", env
    finally:
        subprocess.run(["bash", str(SERVICES), "stop"], env={**os.environ, **env}, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _psql(env: dict[str, str], sql: str) -> str:
    bin_dir = postgres_binaries()
    password = (Path(env["CONTAD_SERVICES_DIR"]) / "pg-password").read_text().strip()
    done = subprocess.run(
        [f"{bin_dir}/psql", "-h", "127.0.0.1", "-p", env["PG_PORT"], "-U", "contad", "-d", "mlflow", "-tAc", sql],
        env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout.strip()


@needs_postgres
@pytest.mark.integration
def test_run_tracked_on_postgres_with_served_artifacts(mlflow_on_postgres: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from flows.pipeline import execute
    from tests.tracking_support import linked_dataset, sequential_runs, tiny_config, tiny_products

    uri, env = mlflow_on_postgres
    folders = tiny_products(tmp_path / "data", n_products=2)
    dataset = linked_dataset(tmp_path / "dataset", folders)
    cfg = tiny_config(tmp_path / "work", dataset, tracking_uri=uri)
    metrics_json = execute(cfg, tmp_path / "work")

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent, steps = sequential_runs(client)  # exactly one parent run
    runs = [parent, *steps]
    experiment = client.get_experiment_by_name("contad-sequential")
    assert parent.data.metrics["average/image_auroc"] == pytest.approx(metrics_json["average"]["image_auroc"])
    # The runs, metrics and registry live in PostgreSQL ...
    assert int(_psql(env, f"SELECT count(*) FROM runs WHERE experiment_id = {experiment.experiment_id}")) == len(runs) == 3
    assert _psql(env, f"SELECT count(*) FROM metrics WHERE run_uuid = '{parent.info.run_id}' AND key = 'average/image_auroc'") != "0"
    champion = client.get_model_version_by_alias("contad-detector", "champion")
    assert champion.version == "2"
    assert _psql(env, "SELECT version FROM registered_model_aliases WHERE alias = 'champion'") == "2"
    # ... and artifacts are proxied by the tracking server: clients never see the server's folder.
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    downloaded = Path(client.download_artifacts(parent.info.run_id, "metrics.json", str(tmp_path / "download")))
    assert json.loads(downloaded.read_text()) == json.loads((tmp_path / "work" / "metrics.json").read_text())
    import mlflow.artifacts

    model_files = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri("contad-detector", champion.version), dst_path=str(tmp_path / "model"), tracking_uri=uri))
    assert (model_files / "MLmodel").is_file()
    stored = Path(env["CONTAD_SERVICES_DIR"]) / "mlartifacts"
    assert list(stored.rglob("metrics.json")), "artifacts were not stored in the server's artifact destination"
