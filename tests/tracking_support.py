"""Helpers of the tracking / add-product / serve tests: tiny synthetic products, a tiny config,
and background servers on 127.0.0.1 that are always torn down."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from components.config import Config, SynthConfig

VENV_BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 180.0


def tiny_products(out: Path, n_products: int = 3, seed: int = 0) -> list[Path]:
    """``n_products`` small synthetic MVTec-layout product folders, each in its own ``out/<i>/`` root."""
    from components.data.synth import generate_products

    scratch = out / "_generated"
    synth = SynthConfig(products=n_products, seed=seed, image_size=64, train_per_product=6, test_good_per_product=3, test_defect_per_type=2)
    names = generate_products(scratch, n_products, seed, synth)
    folders = []
    for name in names:
        target = out / name / name  # a one-product dataset root per product
        target.parent.mkdir(parents=True)
        shutil.move(str(scratch / name), target)
        folders.append(target)
    shutil.rmtree(scratch)
    return folders


def tiny_config(work: Path, data_root: Path, tracking_uri: str | None = None, **promotion: float) -> Config:
    """Fast PatchCore config (64 px, no structure masks, no overlays) with all state under ``work``."""
    return Config.model_validate(
        {
            "method": "patchcore_finetune",
            "data": {"root": str(data_root), "image_size": 64},
            "backbone": {"device": "cpu"},
            "patchcore": {"coreset_size": 64},
            "eval": {"overlays_per_task": 0},
            "masks": {"cache_dir": str(work / "mask_cache")},
            "banks": {"store_dir": str(work / "banks")},
            "tracking": {"uri": tracking_uri or f"sqlite:///{work / 'mlflow.db'}", "registered_model": "contad-detector"},
            "promotion": {"min_new_image_auroc": 0.0, "max_forgetting": 1.0, "max_false_reject_rate": 1.0, **promotion},
        }
    )


@dataclass
class TrainedBase:
    """A 2-product sequence trained once per test session (see ``trained_base``)."""

    work: Path  # bank store (work/banks) + MLflow sqlite store (work/mlflow.db)
    old: list[Path]  # the two learned product folders
    new: Path  # a third product folder, not learned yet


_TRAINED: dict[str, TrainedBase] = {}


def linked_dataset(dataset: Path, folders: list[Path]) -> Path:
    """A new dataset root ``dataset`` holding symlinks to the product ``folders``."""
    dataset.mkdir()
    for folder in folders:
        (dataset / folder.name).symlink_to(folder, target_is_directory=True)
    return dataset


def trained_base(tmp_path_factory: pytest.TempPathFactory) -> TrainedBase:
    """Train the shared 2-product sequence (tiny synthetic products, PatchCore, 64 px) once per session."""
    if "base" not in _TRAINED:
        from flows.pipeline import execute

        root = tmp_path_factory.mktemp("trained_base")
        folders = tiny_products(root / "data", n_products=3)
        dataset = linked_dataset(root / "dataset", folders[:2])
        execute(tiny_config(root / "work", dataset), root / "work")
        _TRAINED["base"] = TrainedBase(work=root / "work", old=folders[:2], new=folders[2])
    return _TRAINED["base"]


def copy_base(base: TrainedBase, dest: Path, **promotion: float) -> Config:
    """A private copy of the trained bank + MLflow stores in ``dest`` and a config pointing at it."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base.work / "banks", dest / "banks")
    shutil.copy2(base.work / "mlflow.db", dest / "mlflow.db")
    return tiny_config(dest, base.new.parent, **promotion)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http_ok(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; fail with the server log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate the process group started for ``process`` (SIGTERM, then SIGKILL)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children left in the group (uvicorn workers, runners)
    except ProcessLookupError:
        pass
    process.wait(grace_s)


@contextmanager
def background(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in its own process group, logging to ``log_path``; always stopped on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        try:
            yield process
        finally:
            stop_process(process)


def sequential_runs(client: object, experiment_name: str = "contad-sequential") -> tuple[object, list[object]]:
    """(parent run, step runs in step order) of the one continual run in ``experiment_name``."""
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r}"
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = sorted((r for r in runs if r is not parent), key=lambda r: int(r.data.tags["contad.step"]))
    return parent, steps


@contextmanager
def mlflow_server(work: Path) -> Iterator[str]:
    """``mlflow server`` on a free 127.0.0.1 port (sqlite backend + local artifact root in ``work``); yields its URI."""
    port = free_port()
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
        "--artifacts-destination", str(work / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    with background(cmd, work / "mlflow-server.log", env) as process:
        uri = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{uri}/health", process, work / "mlflow-server.log")
        yield uri


FLOW_RUN_TIMEOUT_S = 420.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for_flow_run(client: object, deployment_id: object, log_path: Path, process: subprocess.Popen | None = None) -> object:
    """The first flow run of ``deployment_id`` once it reached a final state; fails early when the
    ``process`` running it (a worker) exits, and after ``FLOW_RUN_TIMEOUT_S`` with the tail of ``log_path``."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))  # type: ignore[attr-defined]
        if runs and runs[0].state is not None and runs[0].state.type.value in FINAL_STATES:
            return runs[0]
        time.sleep(2.0)
    raise TimeoutError(f"no finished add-product flow run after {FLOW_RUN_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")


def prefect_env(work: Path, api_url: str) -> dict[str, str]:
    """Environment of a throwaway ``prefect server`` (home and sqlite database under ``work``) and its clients."""
    return {
        "PREFECT_HOME": str(work / "prefect_home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{work / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }


@contextmanager
def prefect_server(work: Path) -> Iterator[str]:
    """``prefect server start`` on a free 127.0.0.1 port (database in ``work``); yields its API URL."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    cmd = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with background(cmd, work / "prefect-server.log", prefect_env(work, api_url)) as process:
        wait_http_ok(f"{api_url}/health", process, work / "prefect-server.log")
        yield api_url
