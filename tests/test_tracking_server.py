"""A 2-task continual sequence tracked on a real ``mlflow server`` (127.0.0.1, sqlite + local artifacts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.tracking_support import linked_dataset, mlflow_server, sequential_runs, tiny_config, tiny_products


@pytest.mark.integration
def test_continual_run_against_mlflow_server(tmp_path: Path) -> None:
    from flows.pipeline import execute

    folders = tiny_products(tmp_path / "data", n_products=2)
    dataset = linked_dataset(tmp_path / "dataset", folders)
    products = sorted(f.name for f in folders)

    with mlflow_server(tmp_path) as uri:
        cfg = tiny_config(tmp_path / "work", dataset, tracking_uri=uri)
        metrics_json = execute(cfg, tmp_path / "work")

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        parent, children = sequential_runs(client)  # exactly one parent run
        assert len(children) == 2
        assert parent.info.status == "FINISHED"
        assert parent.data.params["method"] == "patchcore_finetune" and parent.data.params["data.image_size"] == "64"
        assert [r.data.tags["mlflow.parentRunId"] for r in children] == [parent.info.run_id] * 2
        assert [r.data.tags["contad.task"] for r in children] == products
        history = client.get_metric_history(parent.info.run_id, f"image_auroc/{products[0]}")
        assert sorted(m.step for m in history) == [0, 1]
        assert parent.data.metrics["forgetting/image_auroc"] == pytest.approx(metrics_json["forgetting"]["image_auroc"])
        assert parent.data.metrics["average/image_auroc"] == pytest.approx(metrics_json["average"]["image_auroc"])
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"metrics.json", "report.md"} <= artifacts

        versions = sorted(client.search_model_versions("name = 'contad-detector'"), key=lambda v: int(v.version))
        assert [v.version for v in versions] == ["1", "2"]
        assert [v.run_id for v in versions] == [r.info.run_id for r in children]
        assert all(len(v.tags["bank_version"]) == 64 for v in versions)
        assert client.get_model_version_by_alias("contad-detector", "champion").version == "2"  # gate is open in tiny_config
        # The detector is an MLflow logged model (served through the tracking server's artifact proxy).
        assert all(v.source.startswith("models:/m-") for v in versions)
        import mlflow.artifacts

        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri("contad-detector", versions[0].version), dst_path=str(tmp_path / "model"), tracking_uri=uri))
        assert (model_dir / "MLmodel").is_file() and (model_dir / "artifacts").is_dir()
        assert client.get_logged_model(versions[0].source.removeprefix("models:/")).source_run_id == children[0].info.run_id
