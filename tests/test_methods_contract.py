"""The method contract and deployed = evaluated, for EVERY registered method (``METHODS``; RGB-D ones on RGB-D data).

Each method learns two synthetic products through the pipeline's own ``train_task`` (tiled inputs for
methods that tile). Then:
- it predicts without product labels, routing every image to a learned task;
- the state saved by ``train_task`` scores like the same step learned in memory (save/load round trip);
- the deployed ``Detector``, built from the method directory ALONE while the command line's
  configuration differs (defaults: 224 px, ``data.tile: auto``), gives the evaluation's per-image
  scores to 1e-5 and the decisions of the calibrated thresholds, from files decoded as ``contad
  predict`` and the REST service decode them; the same through a bank store (``--bank``);
- an override that would change inference is refused, naming the key; ``decision.target_fpr`` is not.
Adding a method to the registry adds it here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.config import Config, SynthConfig, load_config
from components.data.loading import read_xyz, task_data, test_batch
from components.data.manifest import read_dataset
from components.decision import Detector, decode_image
from components.errors import ContadError
from components.eval.evaluate import predict_batch
from components.eval.thresholds import read_calibration
from components.memory.store import BankStore
from components.methods.loading import load_method
from components.methods.registry import METHODS, uses_structure_masks
from components.segment.task_maps import task_label_maps
from flows import pipeline
from flows.deployed import BankSource
from flows.pipeline_tasks import seed_everything

# Small settings per method (a method missing here runs with the common ones).
TINY: dict[str, list[str]] = {
    "ucad": ["ucad.key_size=16"],
    "mtrmb": ["mtrmb.epochs=1", "ucad.key_size=16", "masks.image_size=64", "masks.workers=1"],
    "patchcore_finetune": ["patchcore.coreset_size=64"],
    "patchcore_replay": ["patchcore.coreset_size=64", "patchcore.replay_buffer=4"],
    "patchcore_oracle": ["patchcore.coreset_size=64"],
    "patchcore_joint": [],
    "lemo": ["lemo.key_size=16"],
    "iuf": ["reconstruction.hidden=16", "reconstruction.heads=2", "reconstruction.ffn=32", "iuf.epochs=1", "iuf.min_steps=0",
            "iuf.batch_size=4", "iuf.scl_tail_index=2", "iuf.score_pool=4"],
    "ib_iumad": ["reconstruction.hidden=16", "reconstruction.heads=2", "reconstruction.ffn=32", "ib_iumad.epochs=1", "ib_iumad.batch_size=4",
                 "ib_iumad.mamba_state=4", "ib_iumad.head_hidden=8", "ib_iumad.bottleneck=8", "ib_iumad.fusion_heads=2", "ib_iumad.score_pool=8"],
}
COMMON = ["data.image_size=64", "data.heldout_fraction=0.25", "backbone.device=cpu", "eval.overlays_per_task=0", "tracking.enabled=false"]


def _synth(root: Path, depth: bool) -> Path:
    from components.data.synth import generate_products
    from components.data.synth_depth import generate_depth_products

    cfg = SynthConfig(image_size=64, train_per_product=8, test_good_per_product=2, test_defect_per_type=1)
    (generate_depth_products if depth else generate_products)(root, 2, 0, cfg)
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    base = tmp_path_factory.mktemp("contract")
    return {False: _synth(base / "rgb", False), True: _synth(base / "rgbd", True)}


def _config(name: str, work: Path, root: Path) -> Config:
    tiles = METHODS[name].tiles_inputs
    overrides = [f"method={name}", f"data.root={root}", f"masks.cache_dir={work / 'masks'}", f"banks.store_dir={work / 'banks'}",
                 *COMMON, *(["data.tile=32"] if tiles else ["data.tile=null"]), *TINY.get(name, [])]
    return load_config(None, overrides)


def _files(manifest: pd.DataFrame, product: str) -> pd.DataFrame:
    return manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract_and_deployed_equals_evaluated(name: str, datasets: dict[bool, Path], tmp_path: Path) -> None:
    cls = METHODS[name]
    root = datasets[cls.uses_depth]
    cfg = _config(name, tmp_path, root)
    manifest = read_dataset(root)
    products = sorted(manifest["product"].unique())
    if uses_structure_masks(cfg):
        pipeline.cache_masks.fn(cfg, manifest, products)
    torch.manual_seed(0)
    first = pipeline.train_task.fn(cfg, None, products[0], [products[0]], manifest, tmp_path / "s0" / "method")
    method_dir = pipeline.train_task.fn(cfg, first, products[1], [products[1]], manifest, tmp_path / "s1" / "method")

    method = load_method(cfg, method_dir)
    assert method.tasks == products
    task_of_product = {p: p for p in products}
    batches = {p: test_batch(manifest, p, cfg.data.image_size) for p in products}
    evaluated = {p: predict_batch(method, b, task_of_product, cfg.eval.batch_size) for p, b in batches.items()}
    for prediction in evaluated.values():
        assert set(prediction.routed_tasks) <= set(products)  # routed by content, to learned tasks only
    # the same second step learned in memory (train_task's seeding and data): the saved state scores identically
    seed_everything(cfg.seed, products[1])
    live = load_method(cfg, first)
    live.fit_task(task_data(manifest, products[1], [products[1]], cfg, task_label_maps(cfg, manifest, [products[1]])))
    for p, b in batches.items():
        again = predict_batch(live, b, task_of_product, cfg.eval.batch_size)
        torch.testing.assert_close(evaluated[p].image_scores, again.image_scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(evaluated[p].anomaly_maps, again.anomaly_maps, atol=1e-5, rtol=0)
        assert evaluated[p].routed_tasks == again.routed_tasks

    requested = Config()  # the command line's params: 224 px, tile auto, another method
    if cls.uses_task_labels:
        with pytest.raises(ContadError, match="needs the product label"):
            Detector.from_method_dir(method_dir, requested)
        return
    detector = Detector.from_method_dir(method_dir, requested)
    assert detector.config.data.image_size == cfg.data.image_size and detector.config.data.tile == cfg.data.tile
    calibration = read_calibration(method_dir)
    assert calibration is not None and set(calibration.samples) == set(products)
    store = BankStore(tmp_path / "banks")
    version = store.commit(method_dir, {"step": 1, "method": name}, make_current=True)
    bank_source = BankSource(str(tmp_path / "banks"), requested)
    via_bank = bank_source.load(bank_source.current())
    for product in products:
        rows = _files(manifest, product)
        rgbs = [decode_image(Path(p).read_bytes(), 10**8, p) for p in rows["image_path"]]
        depths = [read_xyz(p) for p in rows["depth_path"]] if cls.uses_depth else None
        for deployed in (detector, via_bank):
            verdicts = deployed.decide(rgbs, depths)
            scores = np.array([v.score for v in verdicts])
            np.testing.assert_allclose(scores, evaluated[product].image_scores.numpy(), atol=1e-5, rtol=0, err_msg=f"{name} {product}")
            assert [v.product for v in verdicts] == evaluated[product].routed_tasks
            assert [v.decision for v in verdicts] == [calibration.decide(float(s), t) for s, t in zip(scores, evaluated[product].routed_tasks)]
    assert via_bank.bank_version == version

    with pytest.raises(ContadError, match="data.image_size=224: .* trained and calibrated with data.image_size=64"):
        Detector.from_method_dir(method_dir, load_config(None, ["data.image_size=224"]))
    looser = Detector.from_method_dir(method_dir, load_config(None, ["decision.target_fpr=0.3"]))
    for task in products:
        assert looser.calibration.for_task(task).image <= detector.calibration.for_task(task).image
