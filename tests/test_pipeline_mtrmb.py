"""``contad run method=mtrmb`` end to end on synthetic products: routing, forgetting, recorded masks provider."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.config import load_config
from components.data.synth import generate_products
from tests.conftest import REPO_ROOT
from tests.test_pipeline_helpers import shared_prefect_api

pytestmark = pytest.mark.slow

OVERRIDES = [
    "data.synth.products=3",
    "data.synth.image_size=128",
    "data.synth.train_per_product=10",
    "data.synth.test_good_per_product=6",
    "data.synth.test_defect_per_type=2",
    "data.image_size=128",
    "masks.image_size=128",
    "masks.workers=1",
    "ucad.epochs=1",
    "eval.overlays_per_task=0",
]


def test_contad_run_mtrmb_routes_records_masks_and_texts(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from mlflow.tracking import MlflowClient

    from flows.cli import main as contad

    shared_prefect_api(request)
    root = tmp_path / "data"
    synth = load_config(REPO_ROOT / "params.yaml", OVERRIDES).data.synth
    products = sorted(generate_products(root, synth.products, synth.seed, synth))  # training order: alphabetical
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    code = contad([
        "run", "--out", str(out), "--params", str(REPO_ROOT / "params.yaml"), *OVERRIDES, "method=mtrmb",
        f"data.root={root}", f"masks.cache_dir={tmp_path / 'masks'}", f"tracking.uri=sqlite:///{db}",
        f"text.prompts.{products[0]}=a photo of a special product",
    ])
    assert code == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["method"] == "mtrmb" and doc["tasks"] == products
    assert doc["routing_accuracy"] >= 0.98, doc["routing_accuracy"]
    assert doc["forgetting"]["image_auroc"] <= 0.01, doc["forgetting"]
    # Grounding DINO / SAM weights are not configured: the fallback is used and recorded everywhere.
    assert doc["masks_provider_used"] == "felzenszwalb" and doc["masks_provider_requested"] == "grounded_sam"
    assert "masks.grounded_sam.dino_checkpoint" in doc["masks_fallback_reason"]
    assert "structure masks used: `felzenszwalb` (fallback: `grounded_sam`" in (out / "report.md").read_text()
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("contad.method") == "mtrmb"]
    assert parent and parent[0].data.params["masks_provider_used"] == "felzenszwalb"
    last_step = sorted((out / "steps").iterdir())[-1]
    state = json.loads((last_step / "method" / "model.json").read_text())["state"]
    assert state["text"]["sentences"] == ["a photo of a special product", *(f"a photo of a {p.replace('_', ' ')}" for p in products[1:])]
