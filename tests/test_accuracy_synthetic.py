"""Accuracy targets on a 5-product synthetic sequence with the real EfficientNet-Lite0 backbone.

UCAD must route (almost) every test image to its own product and not forget; PatchCore-finetune,
which refits one bank per task, must visibly forget on the same data. Both run through the real
pipeline (``flows.pipeline.execute``: validation, masks, training, banks, evaluation, report).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.config import Config, load_config
from components.data.synth import generate_products
from tests.conftest import REPO_ROOT
from tests.test_pipeline_helpers import shared_prefect_api

pytestmark = pytest.mark.slow

SEQUENCE_OVERRIDES = [
    "data.synth.products=5",
    "data.synth.image_size=128",
    "data.synth.train_per_product=10",
    "data.synth.test_good_per_product=6",
    "data.synth.test_defect_per_type=2",
    "data.image_size=128",
    "masks.image_size=128",
    "masks.workers=1",
    "ucad.epochs=1",
    "ucad.batch_size=8",
    "eval.overlays_per_task=0",
    "tracking.enabled=false",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth5") / "data"
    cfg = load_config(REPO_ROOT / "params.yaml", SEQUENCE_OVERRIDES)
    generate_products(root, cfg.data.synth.products, cfg.data.synth.seed, cfg.data.synth)
    return root


def _run(method: str, root: Path, out: Path, request: pytest.FixtureRequest) -> dict:
    from flows.pipeline import execute, run_config

    shared_prefect_api(request)
    cfg: Config = load_config(
        REPO_ROOT / "params.yaml",
        [*SEQUENCE_OVERRIDES, f"method={method}", f"data.root={root}", f"masks.cache_dir={out.parent / 'masks'}"],
    )
    execute(run_config(cfg, out), out)
    return json.loads((out / "metrics.json").read_text())


def test_ucad_routes_and_does_not_forget(synth_root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    doc = _run("ucad", synth_root, tmp_path / "ucad", request)
    assert len(doc["tasks"]) == 5
    assert doc["routing_accuracy"] >= 0.98, doc["routing_accuracy"]
    assert doc["forgetting"]["image_auroc"] <= 0.01, doc["forgetting"]
    assert doc["average"]["image_auroc"] >= 0.65, doc["average"]  # small, subtle-defect sets at 128 px


def test_patchcore_finetune_forgets(synth_root: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    doc = _run("patchcore_finetune", synth_root, tmp_path / "finetune", request)
    assert doc["forgetting"]["image_auroc"] >= 0.05, doc["forgetting"]
