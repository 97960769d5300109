"""infra/prefect.yaml on real processes (127.0.0.1): a Prefect server, the pools and deployments applied by
infra/deploy.sh, and a process worker on `contad-cpu` that runs add-product when `contad.product.added` arrives.

Plus fast checks of the deployment file, the GPU job template and the worker image's CUDA stack.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

INFRA = REPO_ROOT / "infra"


def _prefect_file() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def test_every_deployment_loads_its_flow_with_its_parameters() -> None:
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    doc = _prefect_file()
    names = {d["name"] for d in doc["deployments"]}
    assert {"continual-cpu", "continual-gpu", "add-product-cpu", "add-product-gpu", "predict-cpu", "predict-gpu", "stream-cpu", "stream-gpu"} <= names
    for deployment in doc["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"].split(":")[0]) + ":" + deployment["entrypoint"].split(":")[1])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment["parameters"]) <= accepted, (deployment["name"], set(deployment["parameters"]) - accepted)
        assert deployment["work_pool"]["name"] == ("contad-gpu" if deployment["name"].endswith("-gpu") else "contad-cpu")
        device = "cuda" if deployment["name"].endswith("-gpu") else "cpu"
        assert f"backbone.device={device}" in deployment["parameters"]["overrides"]
    triggered = [d["name"] for d in doc["deployments"] if d.get("triggers")]
    assert sorted(triggered) == ["add-product-cpu", "add-product-gpu"]
    for deployment in doc["deployments"]:
        for trigger in deployment.get("triggers") or []:
            assert trigger["expect"] == ["contad.product.added"]


def test_gpu_pool_template_requests_a_gpu_and_mounts_shared_storage() -> None:
    template = json.loads((INFRA / "contad-gpu-job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1
    assert template["variables"]["properties"]["image"]["default"] == "contad-worker:latest"
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == "{{ shared_volume_claim }}" and container["volumeMounts"][0]["name"] == pod["volumes"][0]["name"]
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])


def test_worker_image_has_one_cuda_major() -> None:
    """Base image, locked torch CUDA wheels and the `gpu` extra agree on one CUDA major version."""
    dockerfile = (INFRA / "Dockerfile.worker").read_text()
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.", dockerfile, re.M)
    assert base is not None
    lock = (REPO_ROOT / "requirements.lock").read_text()
    runtime = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.", lock, re.M)
    toolkit = re.search(r"^cuda-toolkit==(\d+)\.", lock, re.M)
    assert runtime is not None and toolkit is not None
    suffixes = set(re.findall(r"^nvidia-[\w-]+-cu(\d+)==", lock, re.M))
    assert {base.group(1), runtime.group(1), toolkit.group(1), *suffixes} == {base.group(1)}
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    gpu_extra = re.search(r"^gpu = \[(.*)\]", pyproject, re.M)
    assert gpu_extra is not None
    assert all(m == base.group(1) for m in re.findall(r"cu(\d+)", gpu_extra.group(1)))


# ---------------------------------------------------------------------------------- real processes
def _env(tmp: Path, api_url: str, params: Path) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(tmp / "prefect_home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT": str(Path(sys.executable).parent / "prefect"),
        "CONTAD_HOME": str(REPO_ROOT),
        "CONTAD_PARAMS": str(params),
        "CONTAD_RUNS": str(tmp / "runs"),
        "PYTHONPATH": str(REPO_ROOT),
    }


@pytest.mark.integration
def test_product_event_runs_add_product_on_a_pool_worker(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from components.config import config_to_dict
    from components.memory.store import BankStore
    from flows.add_product import add_product_command
    from flows.tracking import champion_version
    from tests.tracking_support import background, copy_base, free_port, trained_base, wait_for_flow_run, wait_http_ok

    base = trained_base(tmp_path_factory)
    cfg = copy_base(base, tmp_path / "work")
    store = BankStore(cfg.banks.store_dir)
    mlflow = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    before_bank, before_champion = store.current(), champion_version(mlflow, "contad-detector")
    params = tmp_path / "plant-params.yaml"
    params.write_text(yaml.safe_dump(config_to_dict(cfg)))

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _env(tmp_path, api_url, params)
    prefect = env["PREFECT"]
    server_log, deploy_log, worker_log = tmp_path / "server.log", tmp_path / "deploy.log", tmp_path / "worker.log"
    with background([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"], server_log, env) as server:
        wait_http_ok(f"{api_url}/health", server, server_log)
        with deploy_log.open("wb") as log:
            deployed = subprocess.run(["bash", str(INFRA / "deploy.sh"), "all"], env={**_os_environ(), **env}, stdout=log, stderr=subprocess.STDOUT, timeout=400)
        assert deployed.returncode == 0, deploy_log.read_text()[-4000:]
        worker_cmd = [prefect, "worker", "start", "--pool", "contad-cpu", "--type", "process", "--limit", "1", "--name", "contad-test-worker"]
        with background(worker_cmd, worker_log, env, cwd=tmp_path) as worker:
            with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                pools = {p.name: p for p in client.read_work_pools()}
                assert pools["contad-cpu"].type == "process" and pools["contad-gpu"].type == "kubernetes"
                gpu_limits = pools["contad-gpu"].base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                assert gpu_limits["nvidia.com/gpu"] == "{{ gpu_count }}"
                deployment = client.read_deployment_by_name("contad-add-product-params/add-product-cpu")
                assert deployment.parameters["params"] == str(params) and deployment.work_pool_name == "contad-cpu"
                client.read_deployment_by_name("contad-run/continual-cpu")
                assert add_product_command(cfg, base.new, name="pooled", out=None, via_server=True) == 0
                run = wait_for_flow_run(client, deployment.id, worker_log, worker)

    logs = worker_log.read_text()
    assert run.state.type.value == "COMPLETED", logs[-4000:]  # type: ignore[attr-defined]
    assert run.work_pool_name == "contad-cpu" and run.parameters["name"] == "pooled"  # type: ignore[attr-defined]
    # The worker picked the run up and executed it in its own subprocess, which printed where it ran.
    assert str(run.id) in logs and "contad-test-worker" in logs  # type: ignore[attr-defined]
    assert re.search(r"add-product 'pooled' from .* on worker process ", logs), logs[-4000:]
    bank = store.current()
    assert bank != before_bank and "pooled" in store.show(bank)["products"]
    champion = champion_version(mlflow, "contad-detector")
    assert champion is not None and champion != before_champion and champion[1] == bank
    assert (tmp_path / "runs" / "add-product" / "pooled" / "add_product.json").is_file()


def _os_environ() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_auto_device_picks_cuda_when_torch_sees_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from components.backbones.common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
