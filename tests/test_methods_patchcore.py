"""PatchCore baselines: finetune forgets, replay keeps a fixed buffer, the oracle needs true tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from components.config import ConfigError, FeatureChoice
from components.errors import ContadError
from components.methods.patchcore import PatchCoreFinetune, PatchCoreOracle, PatchCoreReplay
from components.methods.registry import METHODS, build_method
from components.methods.ucad import UCAD
from tests.methods_support import IMAGE_SIZE, BlindAtDefaultToy, FineToy, ToyBackbone, product_images, toy_config, toy_task


def _red_scores(method: object) -> tuple[float, float]:
    """(image AUROC, mean normal score) on "red" where the defect is a pasted patch of "green" texture."""
    good = product_images("red", 10, seed=11)
    bad = product_images("red", 10, seed=12, defect="green")
    scores = method.predict(torch.cat([good, bad]), ["red"] * 20).image_scores
    return float(roc_auc_score([0] * 10 + [1] * 10, scores.numpy())), float(scores[:10].mean())


def test_finetune_forgets_what_the_oracle_remembers() -> None:
    finetune = PatchCoreFinetune(toy_config("patchcore_finetune"), ToyBackbone())
    oracle = PatchCoreOracle(toy_config("patchcore_oracle"), ToyBackbone())
    for method in (finetune, oracle):
        for product in ("red", "green"):
            method.fit_task(toy_task(product))
    oracle_auroc, oracle_normal = _red_scores(oracle)
    finetune_auroc, finetune_normal = _red_scores(finetune)
    assert oracle_auroc == 1.0
    assert finetune_auroc <= 0.85  # the bank now only knows "green": the pasted defect looks normal
    assert finetune_normal > 1.5 * oracle_normal  # normal "red" images look anomalous after the refit
    assert finetune.bank is not None and finetune.bank.features.shape == (48, ToyBackbone.feature_dim)
    assert set(finetune.predict(product_images("red", 2, seed=1)).routed_tasks) == {"green"}


def test_replay_keeps_an_equal_share_buffer_and_round_trips(tmp_path: Path) -> None:
    cfg = toy_config("patchcore_replay")
    replay = PatchCoreReplay(cfg, ToyBackbone())
    logs = [replay.fit_task(toy_task(p)) for p in ("red", "green", "blue")]
    assert [log["replayed_images"] for log in logs] == [0, 5, 5]
    assert [len(b) for b in replay.buffer_images] == [2, 2, 1]  # 5 images over 3 tasks
    restored = PatchCoreReplay(cfg, ToyBackbone())
    restored.load(replay.save(tmp_path / "replay"))  # the buffer is part of the state (scores: tests/test_methods_contract.py)
    assert [len(b) for b in restored.buffer_images] == [2, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(replay.buffer_images, restored.buffer_images, strict=True))


def test_replay_buffer_images_come_from_the_task_training_images() -> None:
    replay = PatchCoreReplay(toy_config("patchcore_replay"), ToyBackbone())
    task = toy_task("red")
    replay.fit_task(task)
    for img in replay.buffer_images[0]:
        assert any(torch.equal(img, t) for t in task.train.images)


def test_oracle_needs_true_tasks(tmp_path: Path) -> None:
    oracle = PatchCoreOracle(toy_config("patchcore_oracle"), ToyBackbone())
    assert oracle.uses_task_labels
    for product in ("red", "green"):
        oracle.fit_task(toy_task(product, n_train=6))
    images = torch.cat([product_images("red", 2, seed=3), product_images("green", 2, seed=4)])
    truth = ["red", "red", "green", "green"]
    with pytest.raises(ContadError, match="true task"):
        oracle.predict(images)
    with pytest.raises(ContadError, match="never learned"):
        oracle.predict(images, ["red", "red", "blue", "blue"])
    pred = oracle.predict(images, truth)
    assert pred.routed_tasks == truth and pred.anomaly_maps.shape == (4, IMAGE_SIZE, IMAGE_SIZE)


def test_reweighting_scales_the_max_patch_score() -> None:
    cfg = toy_config("patchcore_finetune")
    plain = PatchCoreFinetune(cfg, ToyBackbone())
    plain.fit_task(toy_task("red"))
    cfg_rw = toy_config("patchcore_finetune")
    cfg_rw.patchcore.reweight = True
    weighted = PatchCoreFinetune(cfg_rw, ToyBackbone())
    weighted.fit_task(toy_task("red"))
    images = product_images("red", 4, seed=9, defect="green")
    raw, rw = plain.predict(images).image_scores, weighted.predict(images).image_scores
    assert (rw <= raw + 1e-6).all() and (rw > 0).all() and not torch.allclose(rw, raw)


def test_registry_builds_every_configured_method() -> None:
    from components.config import ConfigError, load_config

    assert [load_config(None, [f"method={name}"]).method for name in METHODS] == list(METHODS)  # the config knows the registry
    with pytest.raises(ConfigError, match="unknown method 'patchcore_x'"):
        load_config(None, ["method=patchcore_x"])
    for name, cls in [("ucad", UCAD), ("patchcore_finetune", PatchCoreFinetune), ("patchcore_replay", PatchCoreReplay), ("patchcore_oracle", PatchCoreOracle)]:
        method = build_method(toy_config(name), ToyBackbone())
        assert type(method) is cls and method.name == name
    cfg = toy_config("ucad")
    object.__setattr__(cfg, "method", "nope")
    with pytest.raises(ContadError, match="unknown method"):
        build_method(cfg, ToyBackbone())


def _oracle_with_choices(margin: float = 0.02) -> PatchCoreOracle:
    cfg = toy_config("patchcore_oracle")
    cfg.data.image_size = IMAGE_SIZE
    cfg.patchcore.feature_choices = [FeatureChoice(feature_layer=2), FeatureChoice()]  # the second = the backbone: dropped
    cfg.patchcore.feature_choice_margin = margin
    return PatchCoreOracle(cfg, BlindAtDefaultToy())


def test_the_oracle_chooses_each_task_s_features_as_ucad_does(tmp_path: Path) -> None:
    """``patchcore.feature_choices``: a task whose configured layer sees nothing takes layer 2, and its bank, scores,
    leave-one-out calibration and held-out statistics are those of an oracle built on layer 2 alone."""
    oracle = _oracle_with_choices()
    assert oracle.views.candidates == [None, FeatureChoice(feature_layer=2)]
    red = toy_task("red", n_heldout=6)
    log = oracle.fit_task(red)
    assert log["features"] == log["feature_choice"]["chosen"] == "feature_layer=2"
    assert log["feature_choice"]["image_auroc"]["backbone"] == 0.5 and log["feature_choice"]["normals"] == 6
    fine_only = PatchCoreOracle(toy_config("patchcore_oracle"), FineToy(IMAGE_SIZE))  # the chosen layer alone, same data
    fine_only.fit_task(red)
    assert torch.equal(oracle.banks[0].features, fine_only.banks[0].features)
    assert torch.equal(oracle.calibration_scores(red), fine_only.calibration_scores(red))
    assert oracle.score_stats[0] == fine_only.score_stats[0] and oracle.score_stats[0]["count"] == 6

    oracle.config.patchcore.feature_choice_margin = 1.0  # no gain is enough: the backbone's settings stay
    assert oracle.fit_task(toy_task("green", n_heldout=6))["features"] == "backbone"
    few = oracle.fit_task(toy_task("blue", n_heldout=3))
    assert few["feature_choice"]["skipped"].startswith("3 held-out normals")
    assert [c and c.feature_layer for c in oracle.feature_settings] == [2, None, None]

    images = torch.cat([product_images("red", 3, seed=40), product_images("red", 3, seed=41, defect="blue"), product_images("green", 2, seed=42)])
    tasks = ["red"] * 6 + ["green"] * 2
    pred = oracle.predict(images, tasks)
    assert pred.image_scores[3:6].min() > pred.image_scores[:3].max()  # layer 2 sees red's defects
    assert torch.equal(pred.image_scores[:6], fine_only.predict(images[:6], tasks[:6]).image_scores)
    assert torch.equal(pred.image_scores[6:], torch.zeros(2))  # green's blind layer: what it was scored with

    restored = _oracle_with_choices()
    restored.load(oracle.save(tmp_path / "oracle"))
    assert [c and c.feature_layer for c in restored.feature_settings] == [2, None, None]
    again = restored.predict(images, tasks)
    assert torch.equal(again.image_scores, pred.image_scores) and torch.equal(again.anomaly_maps, pred.anomaly_maps)


def test_the_oracle_refuses_feature_choices_its_backbone_cannot_make() -> None:
    cfg = toy_config("patchcore_oracle")
    cfg.patchcore.feature_choices = [FeatureChoice(feature_layer=2)]
    with pytest.raises(ConfigError, match=r"patchcore.feature_choices \(feature_layer=2\): backbone ToyBackbone cannot"):
        PatchCoreOracle(cfg, ToyBackbone())
