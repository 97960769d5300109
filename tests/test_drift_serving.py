"""Drift watch in ``contad serve-api``: ``/metrics`` in Prometheus text, a brightness drift alarms and emits
``contad.product.drift`` to a real Prefect server, and an undrifted line does not.

A UCAD detector learns one synthetic product (64 px, 40 training normals: 40 calibration normals),
served from its bank store. Its 80 good test images are sent as they are, then (to a freshly started
service: a new line state) brightened by 0.15 (the drift of benchmarks/bench_stream.py; about half
are then rejected): the undrifted windows stay under the KS critical value, a drifted one crosses
it; the alarm reaches the Prefect server's event store and MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prefect.settings import PREFECT_API_URL, temporary_settings
from prometheus_client.parser import text_string_to_metric_families

from components.config import SynthConfig, load_config
from components.data.manifest import read_dataset
from components.memory.store import BankStore
from flows import pipeline
from flows.api import create_app
from flows.deployed import BankSource
from flows.monitoring import DRIFT_EVENT
from tests.api_support import running_server
from tests.tracking_support import prefect_server

pytestmark = pytest.mark.integration
WINDOW = 10
BRIGHTNESS = 0.15
PNG = {"Content-Type": "image/png"}


def _png(rgb: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def _drift_events(api_url: str, product: str, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        page = httpx.post(f"{api_url}/events/filter", json={"filter": {"event": {"name": [DRIFT_EVENT]}}, "limit": 50}, timeout=30).json()
        events = [e for e in page.get("events", []) if e["resource"]["prefect.resource.id"] == f"contad.product.{product}"]
        if events or time.monotonic() > deadline:
            return events
        time.sleep(1.0)


def test_brightness_drift_alarms_and_reaches_prefect_and_mlflow(tmp_path: Path) -> None:
    from components.data.synth import generate_products

    root = tmp_path / "data"
    generate_products(root, 1, 0, SynthConfig(image_size=64, train_per_product=40, test_good_per_product=80, test_defect_per_type=1))
    cfg = load_config(None, [f"data.root={root}", "data.image_size=64", "data.tile=null", "backbone.device=cpu", "eval.overlays_per_task=0",
                             "ucad.key_size=16", f"banks.store_dir={tmp_path / 'banks'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                             f"drift.window={WINDOW}", "drift.alpha=0.01"])
    manifest = read_dataset(root)
    product = str(manifest["product"].iloc[0])
    method_dir = pipeline.train_task.fn(cfg, None, product, [product], manifest, tmp_path / "s0" / "method")
    BankStore(tmp_path / "banks").commit(method_dir, {"step": 1, "method": "ucad"}, make_current=True)
    goods = sorted(manifest[(manifest["split"] == "test") & (manifest["label"] == 0)]["image_path"])
    rgbs = [np.asarray(Image.open(p).convert("RGB")) for p in goods]

    (tmp_path / "prefect").mkdir()
    with prefect_server(tmp_path / "prefect") as api_url, temporary_settings(updates={PREFECT_API_URL: api_url}):
        app = create_app(cfg, BankSource(str(tmp_path / "banks"), cfg))
        with running_server(app) as url:
            for rgb in rgbs:
                assert httpx.post(f"{url}/v1/predict", content=_png(rgb), headers=PNG, timeout=60).status_code == 200
            clean = _metrics(url)
            windows = clean[("contad_drift_windows_total", (("product", product),))]
            assert windows >= 3
            assert clean.get(("contad_drift_alarms_total", (("product", product),)), 0.0) == 0.0  # undrifted: no false alarm
            assert clean[("contad_requests_total", (("endpoint", "/v1/predict"), ("status", "200")))] == len(rgbs)
            assert sum(v for (name, _), v in clean.items() if name == "contad_decisions_total") == len(rgbs)

        app = create_app(cfg, BankSource(str(tmp_path / "banks"), cfg))
        with running_server(app) as url:
            for rgb in rgbs:
                brighter = np.clip(rgb.astype(np.float32) + 255 * BRIGHTNESS, 0, 255).astype(np.uint8)
                assert httpx.post(f"{url}/v1/predict", content=_png(brighter), headers=PNG, timeout=60).status_code == 200
            drifted = _metrics(url)
            assert drifted[("contad_drift_alarms_total", (("product", product),))] >= 1
            assert drifted[("contad_drift_windows_total", (("product", product),))] >= 1
        events = _drift_events(api_url, product)
    assert events, f"no {DRIFT_EVENT} event reached the Prefect server"
    payload = events[0]["payload"]
    assert payload["alarm"] is True and payload["statistic"] > payload["critical"] and payload["bank_version"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(f"{cfg.tracking.experiment_prefix}-monitoring")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # one drift-watch run per service
    logged = {r.info.run_id: client.get_metric_history(r.info.run_id, f"drift_alarm.{product}") for r in runs}
    assert sorted(len(h) for h in logged.values())[1] >= windows  # every completed window was logged
    assert sorted(max(m.value for m in h) for h in logged.values()) == [0.0, 1.0]
