"""UCAD with a tiny deterministic backbone: prompts, sizes, routing, round trip, test-data isolation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.config import Config, ConfigError, FeatureChoice
from components.errors import ContadError
from components.methods.registry import build_method
from components.methods.ucad import UCAD
from tests.methods_support import IMAGE_SIZE, PRODUCTS, BlindAtDefaultToy, FineToy, ToyBackbone, label_maps_of, product_images, toy_config, toy_task


@pytest.fixture(scope="module")
def trained() -> UCAD:
    """UCAD trained on the three toy products in order."""
    method = UCAD(toy_config(), ToyBackbone())
    for product in PRODUCTS:
        method.fit_task(toy_task(product))
    return method


def test_key_and_knowledge_sizes_are_respected(trained: UCAD) -> None:
    assert trained.tasks == list(PRODUCTS)
    assert all(k.shape == (8, ToyBackbone.key_dim) for k in trained.keys)
    assert all(k.shape == (48, ToyBackbone.feature_dim) for k in trained.knowledge)
    small = UCAD(toy_config(key_size=10_000, knowledge_size=10_000), ToyBackbone())
    small.fit_task(toy_task("red", n_train=2, n_heldout=1))
    patches = 2 * (IMAGE_SIZE // 8) ** 2
    assert small.keys[0].shape[0] == 2 * (IMAGE_SIZE // 8) ** 2  # key grid has as many cells here
    assert small.knowledge[0].shape[0] == patches  # capped at the number of training patches


def test_routing_sends_every_test_image_to_its_product(trained: UCAD) -> None:
    images = torch.cat([product_images(p, 4, seed=50 + i) for i, p in enumerate(PRODUCTS)])
    truth = [p for p in PRODUCTS for _ in range(4)]
    pred = trained.predict(images)
    assert pred.routed_tasks == truth
    assert pred.image_scores.shape == (12,)
    assert pred.anomaly_maps.shape == (12, IMAGE_SIZE, IMAGE_SIZE)


def test_routing_uses_one_unprompted_pass_whatever_the_number_of_tasks(trained: UCAD) -> None:
    images = torch.cat([product_images(p, 4, seed=70 + i) for i, p in enumerate(PRODUCTS)])  # 12 images, batch 4
    trained.backbone.calls.update(key_features=0, features=0)
    trained.predict(images)
    assert trained.backbone.calls["key_features"] == 3  # ceil(12 / 4), not 3 tasks x 3 batches
    assert trained.backbone.calls["features"] == 3  # one prompted pass per image, grouped by task


def test_defects_score_higher_than_normals(trained: UCAD) -> None:
    for i, product in enumerate(PRODUCTS):
        other = [p for p in PRODUCTS if p != product][0]
        good = trained.predict(product_images(product, 5, seed=90 + i)).image_scores
        bad = trained.predict(product_images(product, 5, seed=95 + i, defect=other)).image_scores
        assert bad.min() > good.max(), product


def test_prompts_change_features_only_for_their_task() -> None:
    backbone = ToyBackbone()
    method = UCAD(toy_config(), backbone)
    method.fit_task(toy_task("red"))
    images = product_images("red", 3, seed=7)
    before = {name: t.clone() for name, t in method.state_tensors().items()}
    red_scores = method.predict(images).image_scores
    backbone_before = [p.clone() for p in backbone.parameters()]

    method.fit_task(toy_task("green"))
    red_prompt, green_prompt = method.prompts
    plain = backbone.features(images)
    assert not torch.allclose(backbone.features(images, red_prompt), plain)  # trained prompt steers features
    assert not torch.allclose(backbone.features(images, green_prompt), backbone.features(images, red_prompt))
    assert torch.allclose(backbone.features(images, backbone.new_prompt()), plain)  # fresh prompt = identity
    for name, tensor in before.items():  # learning "green" left every "red" tensor untouched
        assert torch.equal(method.state_tensors()[name], tensor), name
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, backbone.parameters(), strict=True))
    assert torch.equal(method.predict(images).image_scores, red_scores)


def test_saved_state_records_tasks_and_score_statistics_and_overwrites_atomically(trained: UCAD, tmp_path: Path) -> None:
    # identical scores after a round trip: tests/test_methods_contract.py (every method)
    out = trained.save(tmp_path / "ucad")
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "ucad" and meta["tasks"] == list(PRODUCTS)
    assert len(meta["state"]["score_stats"]) == 3 and meta["state"]["config"]["key_size"] == 8
    trained.save(out)  # overwriting an existing state is atomic and leaves no temp dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ucad"]


def test_load_errors_name_the_file(tmp_path: Path, trained: UCAD) -> None:
    fresh = UCAD(toy_config(), ToyBackbone())
    with pytest.raises(ContadError, match="model.safetensors"):
        fresh.load(tmp_path / "missing")
    out = trained.save(tmp_path / "state")
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ContadError, match="model.safetensors"):
        fresh.load(out)
    finetune = build_method(toy_config("patchcore_finetune"), ToyBackbone())
    finetune.fit_task(toy_task("red", n_train=2, n_heldout=1))
    other = finetune.save(tmp_path / "finetune")
    with pytest.raises(ContadError, match="patchcore_finetune"):
        fresh.load(other)
    with pytest.raises(ContadError, match="no task learned"):
        fresh.predict(product_images("red", 1, seed=0))
    with pytest.raises(ContadError, match="already learned"):
        trained.fit_task(toy_task("red"))


def test_early_stopping_keeps_the_best_heldout_prompt() -> None:
    method = UCAD(toy_config(epochs=4, early_stopping_patience=1, lr=0.05), ToyBackbone())
    log = method.fit_task(toy_task("red"))
    heldout = log["heldout_losses"]
    assert len(heldout) == len(log["epoch_losses"]) + 1  # initial prompt + one per epoch
    assert log["best_epoch"] == int(np.argmin(heldout))
    task = toy_task("red")
    grid = method._label_grid(task.heldout_label_maps, IMAGE_SIZE)
    assert method.heldout_loss(method.prompts[0], task.heldout.images, grid) == pytest.approx(min(heldout), rel=1e-5)


def test_without_label_maps_the_prompt_stays_training_free() -> None:
    method = UCAD(toy_config(), ToyBackbone())
    log = method.fit_task(toy_task("red", with_maps=False))
    assert log["prompt_trained"] is False
    assert all(torch.count_nonzero(p) == 0 for p in method.prompts[0].parameters())
    assert method.knowledge[0].shape[0] == 48


def _write_png(path: Path, image: torch.Tensor) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = ((image * 0.25 + 0.5).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(rgb).save(path)
    return str(path)


def _manifest(root: Path, test_variant: int) -> pd.DataFrame:
    """Same train rows; test rows (labels, masks, count) differ with ``test_variant``."""
    rows = []
    for i, p in enumerate(("red", "green")):
        for j, img in enumerate(product_images(p, 7, seed=i)):
            rows.append(dict(product=p, split="train", label=0, defect_type="good", image_path=_write_png(root / p / "train" / f"{j}.png", img), mask_path=""))
        n_test = 3 + test_variant
        for j, img in enumerate(product_images(p, n_test, seed=40 + i + test_variant, defect="blue")):
            mask = root / p / f"gt{test_variant}" / f"{j}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE), 255 * ((j + test_variant) % 2), np.uint8)).save(mask)
            label = (j + test_variant) % 2
            rows.append(dict(product=p, split="test", label=label, defect_type="x" if label else "good", image_path=_write_png(root / p / f"test{test_variant}" / f"{j}.png", img), mask_path=str(mask) if label else ""))
    frame = pd.DataFrame(rows)
    frame["depth_path"], frame["sha256"], frame["width"], frame["height"] = "", "", IMAGE_SIZE, IMAGE_SIZE
    return frame


def test_test_rows_never_touch_any_trained_parameter(tmp_path: Path) -> None:
    from components.data.loading import load_images, task_data, task_image_paths

    cfg = toy_config(early_stopping_patience=1, epochs=2)
    states = []
    for variant in (0, 1):
        manifest = _manifest(tmp_path / f"v{variant}", variant)
        if variant == 1:  # also shuffle the test rows' order and flip their labels
            test = manifest["split"] == "test"
            manifest.loc[test, "label"] = 1 - manifest.loc[test, "label"]
            manifest = pd.concat([manifest[~test], manifest[test].sample(frac=1.0, random_state=3)]).reset_index(drop=True)
        method = UCAD(cfg, ToyBackbone())
        for product in ("red", "green"):
            paths = task_image_paths(manifest, [product], cfg)
            maps = label_maps_of(load_images(paths, IMAGE_SIZE))
            method.fit_task(task_data(manifest, product, [product], cfg, maps))
        states.append(method.state_tensors())
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def _layer_config(**ucad: object) -> Config:
    cfg = toy_config(epochs=0, feature_choices=[FeatureChoice(feature_layer=2), FeatureChoice()], **ucad)  # the second = the backbone: dropped
    cfg.data.image_size = IMAGE_SIZE
    return cfg


def test_each_task_takes_the_feature_layer_that_separates_its_synthetic_defects(tmp_path: Path) -> None:
    method = UCAD(_layer_config(), BlindAtDefaultToy())
    red = toy_task("red", n_heldout=6)
    log = method.fit_task(red)
    choice = log["feature_choice"]
    assert log["features"] == choice["chosen"] == "feature_layer=2" and choice["normals"] == 6 and choice["defects"] == 18
    assert set(choice["image_auroc"]) == {"backbone", "feature_layer=2"}
    assert choice["image_auroc"]["backbone"] == 0.5 and choice["image_auroc"]["feature_layer=2"] > 0.52  # blind ties; the fine layer ranks
    assert method.knowledge[0].shape[1] == FineToy.feature_dim and _layers(method) == [2]
    fine_only = UCAD(toy_config(epochs=0), FineToy(IMAGE_SIZE))  # what the chosen layer alone learns from the same data
    fine_only.fit_task(red)
    assert torch.equal(method.knowledge[0], fine_only.knowledge[0])
    calibration = method.calibration_scores(red)  # leave-one-out scores of the chosen features (the loser's are never made)
    assert calibration is not None and torch.equal(calibration, fine_only.calibration_scores(red))

    method.config.ucad.feature_choice_margin = 1.0  # no gain is enough: the backbone's settings stay
    log = method.fit_task(toy_task("green", n_heldout=6))
    assert log["features"] == "backbone" and _layers(method) == [2, None]
    assert method.knowledge[1].shape[1] == ToyBackbone.feature_dim
    few = method.fit_task(toy_task("blue", n_heldout=3))  # too few held-out normals to choose on
    assert few["feature_choice"]["skipped"].startswith("3 held-out normals") and _layers(method) == [2, None, None]

    images = torch.cat([product_images("red", 3, seed=40), product_images("red", 3, seed=41, defect="blue"), product_images("green", 2, seed=42)])
    pred = method.predict(images)
    assert pred.routed_tasks == ["red"] * 6 + ["green"] * 2 and pred.anomaly_maps.shape == (8, IMAGE_SIZE, IMAGE_SIZE)
    assert pred.image_scores[3:6].min() > pred.image_scores[:3].max()  # the fine layer sees red's defects
    assert torch.equal(pred.image_scores[6:], torch.zeros(2))  # green's blind layer: what it was scored with

    from components.methods.state_io import load_method_state, save_method_state

    save_method_state(method, tmp_path / "m")
    loaded = UCAD(_layer_config(), BlindAtDefaultToy())
    load_method_state(loaded, tmp_path / "m")
    assert _layers(loaded) == [2, None, None]
    again = loaded.predict(images)
    assert torch.equal(again.image_scores, pred.image_scores) and torch.equal(again.anomaly_maps, pred.anomaly_maps)

    feedback = method.extend_task("red", product_images("red", 2, seed=43))
    assert feedback["knowledge_added"] == 2 * (IMAGE_SIZE // 4) ** 2  # the fine layer's patches


def _layers(method: UCAD) -> list[int | None]:
    return [None if c is None else c.feature_layer for c in method.feature_settings]


def test_a_feature_choice_the_backbone_cannot_make_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match=r"ucad.feature_choices \(feature_layer=2\): backbone ToyBackbone cannot"):
        UCAD(_layer_config(), ToyBackbone())
    with pytest.raises(ConfigError, match=r"ucad.feature_choices \(feature_layer=3\): backbone.feature_layer=3"):
        UCAD(toy_config(feature_choices=[FeatureChoice(feature_layer=3)]), BlindAtDefaultToy())


def test_the_choice_s_held_out_scores_are_the_statistics_a_fresh_scoring_gives() -> None:
    """The chosen candidate's held-out normal scores, made during the choice, become the task's score statistics:
    they must equal what scoring the held-out normals afresh with the kept task gives."""
    method = UCAD(_layer_config(), BlindAtDefaultToy())
    red = toy_task("red", n_heldout=6)
    method.fit_task(red)
    assert _layers(method) == [2]
    assert method.score_stats[0] == UCAD._heldout_stats(method, red, 0) and method.score_stats[0]["count"] == 6
