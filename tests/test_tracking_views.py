"""What a person sees of one continual run in MLflow and Prefect, read back from the stores.

One 3-product PatchCore sequence (tiny synthetic products) runs once for the module against a real
``prefect server`` on 127.0.0.1 (sqlite, torn down after) with a local sqlite MLflow store; the tests
read back the MLflow store and the Prefect API: per-step average/forgetting/BWT curves, full params
on step runs, logged models with signatures behind every registered version, version tags and
descriptions, Prefect task-run names by step and product, the markdown artifact, tags and the
cross-links between the two runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.config import Config, flatten_config
from flows.run_links import run_key
from tests.tracking_support import linked_dataset, prefect_server, sequential_runs, tiny_config, tiny_products

pytestmark = pytest.mark.integration


@dataclass
class TrackedRun:
    cfg: Config
    metrics: dict[str, Any]  # metrics.json of the run
    products: list[str]
    flow_run: Any
    task_runs: list[Any]
    artifacts: list[Any]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import execute

    root = tmp_path_factory.mktemp("views")
    folders = tiny_products(root / "data", n_products=3)
    cfg = tiny_config(root / "work", linked_dataset(root / "dataset", folders))
    with prefect_server(root) as api_url, temporary_settings(updates={PREFECT_API_URL: api_url}):
        # Prefect keeps one events worker per process whatever the API URL: one left by an earlier test's
        # server would carry this run's task-run events to that (dead) server. Drain it so a new one
        # is made for this server, and drain again so every task-run event has arrived before reading.
        EventsWorker.drain_all(timeout=30)
        metrics = execute(cfg, root / "work")
        EventsWorker.drain_all(timeout=30)
        with get_client(sync_client=True) as client:
            (flow_run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["continual_run"])))
            task_runs = _settled_task_runs(client, FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
        APILogHandler().flush()  # send the run's last log lines while the server is still up
    return TrackedRun(cfg, metrics, sorted(f.name for f in folders), flow_run, task_runs, artifacts)


def _settled_task_runs(client: Any, flow_run_filter: Any, timeout_s: float = 60.0) -> list[Any]:
    """The flow run's task runs once the server has them all (task-run records arrive asynchronously,
    through Prefect's event pipeline, after the flow returns): polls until the count stops growing."""
    import time

    deadline, previous = time.monotonic() + timeout_s, -1
    while True:
        task_runs = client.read_task_runs(flow_run_filter=flow_run_filter)
        if (task_runs and len(task_runs) == previous) or time.monotonic() > deadline:
            return task_runs
        previous = len(task_runs)
        time.sleep(2.0)


def _client(cfg: Config) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)


def _runs(cfg: Config) -> tuple[Any, list[Any]]:
    """(parent run, step runs in step order)."""
    return sequential_runs(_client(cfg))


def test_average_forgetting_bwt_are_curves_over_every_step(tracked: TrackedRun) -> None:
    client = _client(tracked.cfg)
    parent, _ = _runs(tracked.cfg)
    for group, steps in (("average", [0, 1, 2]), ("forgetting", [1, 2]), ("bwt", [1, 2])):  # no old product at step 0
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            history = sorted(client.get_metric_history(parent.info.run_id, f"{group}/{metric}"), key=lambda m: m.step)
            assert [m.step for m in history] == steps, (group, metric)
            assert history[-1].value == pytest.approx(tracked.metrics[group][metric])  # the last point is metrics.json's
    # Step 1's forgetting is the drop of the first product between steps 0 and 1 (Chaudhry FM with one old product).
    first = tracked.metrics["tasks"][0]
    matrix = tracked.metrics["matrix"]["image_auroc"]
    step1 = [m for m in client.get_metric_history(parent.info.run_id, "forgetting/image_auroc") if m.step == 1]
    assert step1[0].value == pytest.approx(matrix[0][0] - matrix[1][0]), first


def test_step_runs_carry_the_full_config(tracked: TrackedRun) -> None:
    parent, steps = _runs(tracked.cfg)
    from components.data.manifest import read_dataset
    from components.data.tiling import resolve_tiling

    manifest = read_dataset(Path(tracked.cfg.data.root))
    resolved = resolve_tiling(tracked.cfg, manifest, sorted(manifest["product"].unique()))  # what the run records
    assert resolved.data.tile is None  # tiny 64 px products: data.tile=auto resolves to one pass
    expected = {k: str(v) for k, v in flatten_config(resolved).items()}
    assert [r.data.tags["contad.task"] for r in steps] == tracked.metrics["tasks"]
    for index, run in enumerate(steps):
        assert run.data.params == {**expected, "step": str(index), "task": run.data.tags["contad.task"]}
    assert parent.data.params["banks.store_dir"] == tracked.cfg.banks.store_dir


def test_versions_are_logged_models_with_signature_tags_and_description(tracked: TrackedRun) -> None:
    client = _client(tracked.cfg)
    _, steps = _runs(tracked.cfg)
    versions = sorted(client.search_model_versions("name = 'contad-detector'"), key=lambda v: int(v.version))
    assert len(versions) == 3
    learned: list[str] = []
    for version, run in zip(versions, steps):
        learned.append(run.data.tags["contad.task"])
        model_id = version.source.removeprefix("models:/")
        model = client.get_logged_model(model_id)
        assert str(model.status.value) == "READY" and model.source_run_id == run.info.run_id == version.run_id
        assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model_id, int(run.data.tags["contad.step"]))]
        mlmodel = yaml.safe_load((Path(url2pathname(urlparse(model.artifact_location).path)) / "MLmodel").read_text())
        assert mlmodel["model_id"] == model_id and set(mlmodel["signature"]) >= {"inputs", "outputs", "params"}
        assert model.params["method"] == "patchcore_finetune"
        tags = version.tags
        assert tags["products"] == ", ".join(learned) and tags["n_products"] == str(len(learned))
        assert tags["gate"] == "passed" and tags["gate_reasons"] == "-"
        assert len(tags["bank_version"]) == 64 and tags["bank_version"].startswith(tags["bank_version_short"])
        assert all(f"`{p}`" in version.description for p in learned)
        assert tags["bank_version"] in version.description and "Promotion gate: **passed**" in version.description
        assert run.data.tags["contad.model_version"] == str(version.version) and run.data.tags["contad.gate"] == "passed"


def test_prefect_task_runs_are_named_by_step_and_product(tracked: TrackedRun) -> None:
    names = {t.name for t in tracked.task_runs}
    a, b, c = tracked.metrics["tasks"]
    expected = {
        f"train step 0 · {a}", f"train step 1 · {b}", f"train step 2 · {c}",
        "evaluate step 0 · 1 products", "evaluate step 2 · 3 products",
        f"version step 1 · {b}", f"register step 1 · {b}", f"gate step 2 · {c}",
        "publish to MLflow and Prefect",
    }
    assert expected <= names, sorted(names)
    assert any(n.startswith("report") for n in names) and any(n.startswith("masks") or n.startswith("validate") for n in names)
    assert tracked.flow_run.name == "patchcore_finetune · sequential · dataset → work"
    assert all({"method:patchcore_finetune", "protocol:sequential"} <= set(t.tags) for t in tracked.task_runs)


def test_prefect_and_mlflow_runs_link_each_other(tracked: TrackedRun) -> None:
    parent, _ = _runs(tracked.cfg)
    flow_run = tracked.flow_run
    assert {"method:patchcore_finetune", "protocol:sequential", f"mlflow-run:{parent.info.run_id}"} <= set(flow_run.tags)
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert parent.data.tags["prefect.flow_run_name"] == flow_run.name
    assert parent.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run.id}")


def test_prefect_markdown_artifact_has_the_final_table_and_mlflow_run(tracked: TrackedRun) -> None:
    parent, _ = _runs(tracked.cfg)
    (artifact,) = [a for a in tracked.artifacts if a.type == "markdown"]
    work = Path(tracked.cfg.banks.store_dir).parent  # the run directory
    assert artifact.key == run_key("patchcore_finetune", "sequential", work) and artifact.key.startswith("contad-patchcore-finetune-sequential-work-")
    text = str(artifact.data)
    for product in tracked.metrics["tasks"]:
        final = tracked.metrics["final"]["image_auroc"][product]
        assert f"| {product} | {100 * final:.1f} |" in text
    assert f"| **forgetting (FM)** | {100 * tracked.metrics['forgetting']['image_auroc']:.1f} |" in text
    assert parent.info.run_id in text and "mlflow ui --backend-store-uri sqlite:///" in text
