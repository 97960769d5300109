"""End to end on synthetic RGB-D data: contad data synth --depth -> contad run method=ib_iumad -> report with depth panels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from tests.test_pipeline_helpers import shared_prefect_api

TINY_IB = [
    "method=ib_iumad", "promotion.min_new_image_auroc=0.0", "promotion.max_forgetting=1.0", "promotion.max_false_reject_rate=1.0", "data.image_size=64", "data.heldout_fraction=0.2", "tracking.enabled=false", "backbone.device=cpu",
    "reconstruction.hidden=16", "reconstruction.heads=2", "reconstruction.ffn=32", "ib_iumad.epochs=1", "ib_iumad.batch_size=4",
    "ib_iumad.mamba_state=4", "ib_iumad.head_hidden=8", "ib_iumad.bottleneck=8", "ib_iumad.fusion_heads=2",
    "ib_iumad.score_pool=8", "eval.overlays_per_task=1",
]


@pytest.fixture(scope="module")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return shared_prefect_api(request)


@pytest.mark.slow
def test_synthetic_rgbd_continual_run(prefect_api: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert main(["data", "synth", "--depth", "--out", str(data), "--products", "2", "data.synth.image_size=64",
                 "data.synth.train_per_product=5", "data.synth.test_good_per_product=2", "data.synth.test_defect_per_type=1"]) == 0
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), f"data.root={data}", *TINY_IB]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["method"] == "ib_iumad" and sorted(doc["tasks"]) == ["screw", "washer"]
    for product in doc["tasks"]:
        assert 0.0 <= doc["final"]["image_auroc"][product] <= 1.0
        assert doc["final"]["aupro"][product] is not None
    assert "thresholds" in doc  # from held-out training normals, scored with their point clouds
    assert (out / "figures" / "overlay_washer.png").is_file()

    # contad predict pairs every rgb/NAME.png with xyz/NAME.tiff and decides every test image (the params
    # file's defaults for the rest: the bank version's own configuration is used)
    predicted = tmp_path / "predicted"
    assert main(["predict", str(data / "washer" / "test"), "--bank", str(out / "banks"), "--out", str(predicted)]) == 0
    rows = [json.loads(line) for line in (predicted / "predictions.jsonl").read_text().splitlines()]
    n_rgb = len(list((data / "washer" / "test").glob("*/rgb/*.png")))
    assert len(rows) == n_rgb and not (predicted / "skipped.csv").exists()
    assert all(row["decision"] in ("OK", "NG") and "/rgb/" in row["path"] for row in rows)
    summary = json.loads((predicted / "summary.json").read_text())
    assert summary["measured"]["washer"]["images"] == n_rgb
