"""Per-product memory: coreset by ratio within a byte budget (JL-projected selection), memory reports,
and per-task score normalisation from held-out training normals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score

from components.config import MemoryConfig
from components.methods import coreset as coreset_module
from components.methods.coreset import budget_rows, k_center_greedy, memory_coreset, memory_rows
from components.methods.patchcore import PatchCoreOracle
from components.methods.ucad import UCAD
from tests.methods_support import PRODUCTS, ToyBackbone, product_images, toy_config, toy_task


def test_memory_rows_follow_the_ratio_and_the_budget() -> None:
    memory = MemoryConfig(budget_mb=1.0, coreset_ratio=0.1, projection_dim=8)
    assert budget_rows(1.0, 256) == 1024  # 1 MiB of float32 rows of 256 values
    assert memory_rows(5000, 256, memory) == 500  # 10% of the patches fit in the budget
    assert memory_rows(50_000, 256, memory) == 1024  # the budget caps the ratio
    assert memory_rows(50_000, 256, memory, reserved_bytes=512 * 1024) == 512  # key/prompt bytes come off the budget
    assert memory_rows(5000, 256, memory, size=40) == 40  # an explicit size wins below the budget
    assert memory_rows(30, 256, memory, size=400) == 30  # never more rows than patches
    assert len(memory_coreset(torch.randn(2000, 32), memory)) == 200


def test_projected_greedy_covers_almost_as_well_as_the_exact_one() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.randn(40, 128, generator=generator)
    sizes = torch.tensor([400] * 4 + [10] * 36)  # a few large clusters, many rare ones
    points = torch.cat([c + torch.randn(int(n), 128, generator=generator) for c, n in zip(centres, sizes)])

    def radius(index: torch.Tensor) -> float:
        return float(torch.cdist(points, points[index]).min(dim=1).values.max())

    exact = radius(k_center_greedy(points, 60))
    projected = radius(k_center_greedy(points, 60, projection_dim=32))
    random = radius(torch.randperm(len(points), generator=generator)[:60])
    assert projected <= 1.25 * exact  # the JL projection keeps the greedy cover
    assert random > 2.0 * projected  # a random sample misses rare clusters


def test_blockwise_preselection_keeps_the_cover_and_the_rare_clusters(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.randn(40, 128, generator=generator)
    sizes = torch.tensor([1000] * 4 + [10] * 36)
    points = torch.cat([c + torch.randn(int(n), 128, generator=generator) for c, n in zip(centres, sizes)])
    points = points[torch.randperm(len(points), generator=generator)]  # rare clusters scattered over the blocks

    def radius(index: torch.Tensor) -> float:
        return float(torch.cdist(points, points[index]).min(dim=1).values.max())

    monkeypatch.setattr(coreset_module, "PRESELECT_BLOCK_ROWS", 256)  # 17 blocks of ~256 rows
    exact = k_center_greedy(points, 60)
    assert torch.equal(k_center_greedy(points, 60, preselect_factor=16), exact)  # N <= f * (k + B): one greedy
    preselected = k_center_greedy(points, 60, start_index=1000, preselect_factor=12)  # 720 candidates, ~42 per block
    assert len(set(preselected.tolist())) == 60 and int(preselected[0]) == 1000
    assert torch.equal(preselected, k_center_greedy(points, 60, start_index=1000, preselect_factor=12))  # deterministic
    assert not torch.equal(preselected.sort().values, k_center_greedy(points, 60, start_index=1000).sort().values)  # two-stage
    random = radius(torch.randperm(len(points), generator=generator)[:60])
    assert radius(preselected) <= 1.25 * radius(exact)
    assert random > 2.0 * radius(preselected)  # every block keeps its own outliers, unlike a random subset
    with pytest.raises(ValueError, match="preselect_factor"):
        k_center_greedy(points, 60, preselect_factor=0)


def test_coreset_candidates_are_the_first_stage_of_the_two_stage_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    from components.methods.coreset import coreset_candidates

    generator = torch.Generator().manual_seed(1)
    points = torch.randn(3000, 48, generator=generator)
    monkeypatch.setattr(coreset_module, "PRESELECT_BLOCK_ROWS", 256)
    candidates = coreset_candidates(points, 40, projection_dim=16, seed=3, preselect_factor=4)
    assert 150 <= len(candidates) <= 200 and torch.equal(candidates, candidates.sort().values) and int(candidates[0]) == 0
    two_stage = k_center_greedy(points, 40, projection_dim=16, seed=3, preselect_factor=4)
    assert torch.equal(candidates[k_center_greedy(points[candidates], 40, projection_dim=16, seed=3)], two_stage)
    assert torch.equal(coreset_candidates(points, 40, preselect_factor=None), torch.arange(3000))  # no first stage
    assert torch.equal(coreset_candidates(points[:500], 40, preselect_factor=4), torch.arange(500))  # it would not save work


def _budget_config(method: str, budget_mb: float):  # noqa: ANN202 - test helper
    cfg = toy_config(method, knowledge_size=None, epochs=1)
    cfg.patchcore.coreset_size = None
    cfg.memory.coreset_ratio = 1.0
    cfg.memory.budget_mb = budget_mb
    return cfg


def test_ucad_and_patchcore_share_the_per_product_budget() -> None:
    budget_mb = 0.01  # 10 KiB per product: less than the 12 x 16 training patches of 24 values
    ucad = UCAD(_budget_config("ucad", budget_mb), ToyBackbone())
    oracle = PatchCoreOracle(_budget_config("patchcore_oracle", budget_mb), ToyBackbone())
    ucad_log = ucad.fit_task(toy_task("red", n_train=12, n_heldout=2))
    oracle_log = oracle.fit_task(toy_task("red", n_train=12, n_heldout=2))
    budget = budget_mb * 1024 * 1024
    rows = budget_rows(budget_mb, ToyBackbone.feature_dim)
    assert oracle.banks[0].features.shape[0] == rows < 12 * 16
    assert oracle_log["memory_bytes"] == rows * (ToyBackbone.feature_dim * 4 + 8)  # float32 rows + int64 origin
    # UCAD's key and prompt come off the same budget: key + prompt + knowledge fit in it.
    assert ucad_log["memory_bytes"] <= budget
    assert 0 < ucad.knowledge[0].shape[0] < rows


def test_normalised_scores_put_heldout_normals_near_one_and_keep_aurocs(tmp_path: Path) -> None:
    raw_cfg, norm_cfg = toy_config(normalise_scores=False), toy_config()
    raw, norm = UCAD(raw_cfg, ToyBackbone()), UCAD(norm_cfg, ToyBackbone())
    for method in (raw, norm):
        for product in PRODUCTS:
            method.fit_task(toy_task(product))
    for i, product in enumerate(PRODUCTS):
        other = [p for p in PRODUCTS if p != product][0]
        images = torch.cat([product_images(product, 5, seed=300 + i), product_images(product, 5, seed=400 + i, defect=other)])
        labels = [0] * 5 + [1] * 5
        raw_scores, norm_scores = raw.predict(images).image_scores, norm.predict(images).image_scores
        assert roc_auc_score(labels, raw_scores) == roc_auc_score(labels, norm_scores)
        scale = norm.score_stats[i]["mean"]
        assert torch.allclose(norm_scores * scale, raw_scores, rtol=1e-5)
        # the scale comes from the task's own held-out training normals, stored in the state
        heldout = toy_task(product).heldout.images
        assert abs(float(norm.predict(heldout).image_scores.mean()) - 1.0) < 1e-4
    stats_before = [dict(s) for s in norm.score_stats]
    norm.predict(product_images("red", 4, seed=999, defect="blue"))
    assert norm.score_stats == stats_before  # test images never change the normalisation
    norm.save(tmp_path / "m")
    loaded = UCAD(norm_cfg, ToyBackbone())
    loaded.load(tmp_path / "m")
    assert torch.equal(loaded.predict(heldout).image_scores, norm.predict(heldout).image_scores)


def test_oracle_normalises_each_task_by_its_heldout_normals(tmp_path: Path) -> None:
    oracle = PatchCoreOracle(toy_config("patchcore_oracle"), ToyBackbone())
    for product in ("red", "green"):
        oracle.fit_task(toy_task(product))
    for product in ("red", "green"):
        heldout = toy_task(product).heldout.images
        mean = float(oracle.predict(heldout, [product] * len(heldout)).image_scores.mean())
        assert abs(mean - 1.0) < 1e-4
    oracle.save(tmp_path / "o")
    loaded = PatchCoreOracle(toy_config("patchcore_oracle"), ToyBackbone())
    loaded.load(tmp_path / "o")
    assert loaded.score_stats == oracle.score_stats


def test_test_features_are_computed_once_per_image_and_prompt() -> None:
    method = UCAD(toy_config(epochs=1), ToyBackbone())
    method.fit_task(toy_task("red"))
    images = torch.cat([product_images("red", 4, seed=500), product_images("green", 4, seed=501)])
    first = method.predict(images)
    method.backbone.calls.update(key_features=0, features=0)
    again = method.predict(images)
    assert method.backbone.calls == {"key_features": 0, "features": 0}  # keys and prompted features reused
    assert torch.equal(first.image_scores, again.image_scores) and torch.equal(first.anomaly_maps, again.anomaly_maps)
    method.fit_task(toy_task("green"))
    method.backbone.calls.update(key_features=0, features=0)
    after = method.predict(images)
    assert method.backbone.calls["key_features"] == 0  # un-prompted keys: always reused
    assert method.backbone.calls["features"] == 1  # the green images under the new green prompt only
    assert after.routed_tasks == ["red"] * 4 + ["green"] * 4
    assert torch.equal(after.image_scores[:4], first.image_scores[:4])  # red: same prompt, same knowledge, same scale
    fresh = UCAD(toy_config(epochs=1), ToyBackbone())  # a new backbone object has its own (empty) cache
    fresh.load_state(method.state_tensors(), method.state_meta())
    assert torch.allclose(fresh.predict(images).image_scores, after.image_scores)


def test_patchcore_joint_reselects_one_bounded_bank_over_every_task_and_forgets_nothing(tmp_path: Path) -> None:
    from components.methods.patchcore import PatchCoreFinetune, PatchCoreJoint
    from components.methods.registry import build_method

    joint = build_method(toy_config("patchcore_joint"), ToyBackbone())
    assert isinstance(joint, PatchCoreJoint)
    red, green = toy_task("red", n_train=6), toy_task("green", n_train=6)
    first = joint.fit_task(red)
    finetune = PatchCoreFinetune(toy_config("patchcore_finetune"), ToyBackbone())
    finetune.fit_task(red)
    assert torch.equal(joint.bank.features, finetune.bank.features)  # one task: exactly PatchCore's coreset
    second = joint.fit_task(green)
    patches = 6 * 4 * 4  # 6 images x (32 / 8)^2 patches, all candidates (preselection would not save work here)
    assert [first["bank_size"], second["bank_size"]] == [48, 96]  # patchcore.coreset_size per task, not every patch
    assert second["candidate_rows"] == [patches, patches]
    assert second["memory_bytes"] == second["bank_bytes"] + 2 * patches * ToyBackbone.feature_dim * 4
    assert set(joint.bank.origin.tolist()) == {0, 1}
    good, bad = product_images("red", 6, seed=21), product_images("red", 6, seed=22, defect="blue")
    scores = joint.predict(torch.cat([good, bad])).image_scores
    assert roc_auc_score([0] * 6 + [1] * 6, scores.numpy()) == 1.0  # red still known after green
    assert set(joint.predict(good).routed_tasks) == {"red"}
    joint.save(tmp_path / "j")
    loaded = build_method(toy_config("patchcore_joint"), ToyBackbone())
    loaded.load(tmp_path / "j")
    assert torch.equal(loaded.predict(good).image_scores, joint.predict(good).image_scores)
    blue = toy_task("blue", n_train=6)
    loaded.fit_task(blue)  # re-selection after a reload sees every task's candidates
    joint.fit_task(blue)
    assert torch.equal(loaded.bank.features, joint.bank.features) and loaded.bank.features.shape[0] == 144


def test_patchcore_joint_loads_a_store_everything_state_and_trains_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A state of the earlier joint (every training patch, no candidates) still scores with its bank, and a
    further task re-selects exactly what the current joint (trained on the same tasks) selects."""
    from components.methods.patchcore import PatchCoreJoint

    monkeypatch.setattr(coreset_module, "PRESELECT_BLOCK_ROWS", 4)  # toy sizes: let the first stage preselect
    cfg = toy_config("patchcore_joint")
    cfg.memory.preselect_factor = 1
    red, green, blue = (toy_task(name, n_train=6) for name in ("red", "green", "blue"))
    current = PatchCoreJoint(cfg, ToyBackbone())
    current.fit_task(red)
    current.fit_task(green)
    assert [len(rows) for rows in current.candidates] == [48, 48]  # preselected: fewer than the 96 patches
    old = PatchCoreJoint(cfg, ToyBackbone())  # what the store-everything joint saved: every patch, in order
    feats = [old._features(task.train.images).flatten(0, 1) for task in (red, green)]
    old_tensors = {"bank/features": torch.cat(feats), "bank/origin": torch.cat([torch.full((len(f),), t) for t, f in enumerate(feats)])}
    old_meta = {"tasks": ["red", "green"]}
    loaded = PatchCoreJoint(cfg, ToyBackbone())
    loaded.load_state(old_tensors, old_meta)
    assert loaded.bank is not None and torch.equal(loaded.bank.features, old_tensors["bank/features"])  # scores as before
    assert loaded.task_rows == current.task_rows
    assert all(torch.equal(a, b) for a, b in zip(loaded.candidates, current.candidates, strict=True))
    loaded.fit_task(blue)
    current.fit_task(blue)
    assert torch.equal(loaded.bank.features, current.bank.features) and torch.equal(loaded.bank.origin, current.bank.origin)
    loaded.save(tmp_path / "j")  # and it saves in the current format
    again = PatchCoreJoint(cfg, ToyBackbone())
    again.load(tmp_path / "j")
    assert again.task_rows == current.task_rows and len(again.candidates) == 3
    empty = PatchCoreJoint(cfg, ToyBackbone())
    empty.load_state({}, {"tasks": []})  # an earlier state of no task: nothing to derive, nothing missing
    assert empty.bank is None and empty.task_rows == [] and empty.candidates == []
