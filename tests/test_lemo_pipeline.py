"""LeMO through the real flows: ``contad run method=lemo`` and ``contad stream`` (Prefect flow contad-stream) on synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.memory.store import BankStore
from flows.cli import main
from tests.test_pipeline_helpers import make_tiny_products, shared_prefect_api

TINY_LEMO = ["method=lemo", "promotion.min_new_image_auroc=0.0", "promotion.max_forgetting=1.0", "promotion.max_false_reject_rate=1.0", "data.image_size=64", "data.heldout_fraction=0.2", "lemo.key_size=16", "eval.overlays_per_task=0", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return shared_prefect_api(request)


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_products(tmp_path_factory.mktemp("lemo") / "data", n_products=3)


@pytest.mark.slow
def test_contad_run_method_lemo_end_to_end(prefect_api: str, products: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), f"data.root={products}", *TINY_LEMO]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["method"] == "lemo" and len(doc["tasks"]) == 3
    assert doc["routing_accuracy"] == 1.0
    assert doc["forgetting"]["image_auroc"] <= 0.01, "per-task adapters and memories: no forgetting when routing is right"
    assert all(0.0 <= doc["final"]["image_auroc"][p] <= 1.0 for p in doc["tasks"])
    assert len(BankStore(out / "banks").list()) == 3


@pytest.mark.slow
def test_contad_stream_cli_writes_log_checkpoint_and_bank_version(prefect_api: str, products: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    product = sorted(p.name for p in products.iterdir() if (p / "train" / "good").is_dir())[0]
    images = sorted((products / product / "train" / "good").glob("*.png"))[:4]
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(str(p) for p in images))
    out = tmp_path / "stream"
    args = ["stream", str(listing), "--product", product, "--out", str(out), *TINY_LEMO, "stream.checkpoint_every=2", "stream.warmup=2"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["new_images"] == 4 and summary["total_images"] == 4
    assert len((out / "stream.jsonl").read_text().splitlines()) == 4
    assert BankStore(out / "banks").current() == summary["bank_version"]
    assert main(args) == 0, "a rerun resumes and finds nothing new"
    assert json.loads(capsys.readouterr().out)["new_images"] == 0
