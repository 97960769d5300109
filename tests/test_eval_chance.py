"""Chance bands of image AUROC: how far a detector that separates nothing strays from 0.5 on few test images,
and where runs, reports, the leaderboard and the standing say so."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.data.manifest import count_test_images
from components.eval.chance import EXACT_MAX_PAIRS, chance_band, null_auroc_distribution, within_chance
from components.eval.leaderboard import aggregate, leaderboard_markdown, summarise_run
from components.eval.metrics import auroc
from components.eval.report import run_markdown
from components.eval.standing import method_standing, standing_markdown, standing_sentence
from flows.bench import write_leaderboard
from tests.test_leaderboard import _fake_run

GRID = {"good": 3, "defective": 11}  # MVTec AD grid's test split in ../shared/data/real-ad


@pytest.mark.parametrize("n_good,n_defective", [(1, 1), (2, 3), (3, 5), (4, 4), (5, 2)])
def test_null_distribution_is_every_ranking_equally_likely(n_good: int, n_defective: int) -> None:
    """Enumerate every placement of the good images among the ranks: the AUROCs' histogram is the distribution."""
    n = n_good + n_defective
    found = np.zeros(n_good * n_defective + 1)
    for good_ranks in itertools.combinations(range(n), n_good):
        labels = np.ones(n, dtype=int)
        labels[list(good_ranks)] = 0
        found[round(auroc(labels, np.arange(n, dtype=float)) * n_good * n_defective)] += 1
    values, probabilities = null_auroc_distribution(n_good, n_defective)
    assert values == pytest.approx(np.arange(n_good * n_defective + 1) / (n_good * n_defective))
    assert probabilities == pytest.approx(found / found.sum())


def test_grid_band_and_the_normal_approximation_above_the_exact_limit() -> None:
    assert chance_band(GRID["good"], GRID["defective"]) == pytest.approx((2 / 11, 9 / 11))  # 0.18-0.82
    assert chance_band(11, 3) == chance_band(3, 11)  # symmetric in the roles
    lo99, hi99 = chance_band(3, 11, level=0.99)
    assert lo99 < 2 / 11 and hi99 > 9 / 11 and lo99 + hi99 == pytest.approx(1.0)
    exact = chance_band(50, 80)  # 4000 pairs: still exact
    approx = chance_band(50, 81)  # 4050 pairs: normal approximation
    assert 50 * 80 == EXACT_MAX_PAIRS and exact[0] == pytest.approx(approx[0], abs=0.005)
    big = chance_band(100, 192)  # magnetic_tile's test split: a narrow band
    assert 0.43 < big[0] < 0.45 and big[1] == pytest.approx(1 - big[0])


def test_within_chance_and_undefined_bands() -> None:
    assert within_chance(0.21, 3, 11) and within_chance(0.79, 3, 11)  # LeMO's grid seeds: both luck
    assert not within_chance(0.10, 3, 11) and not within_chance(0.90, 3, 11)
    assert not within_chance(0.6, 100, 192)
    assert all(math.isnan(v) for v in chance_band(0, 5)) and not within_chance(0.5, 0, 5)
    assert not within_chance(math.nan, 3, 11)
    with pytest.raises(ValueError, match="non-negative integers"):
        chance_band(-1, 5)
    with pytest.raises(ValueError, match="level"):
        chance_band(3, 11, level=1.0)


def test_test_images_are_counted_per_product() -> None:
    manifest = pd.DataFrame({"product": ["a", "a", "a", "a", "b", "b"], "split": ["train", "test", "test", "test", "train", "train"],
                             "label": [0, 0, 1, 1, 0, 0]})
    assert count_test_images(manifest) == {"a": {"good": 1, "defective": 2}}  # b has no test images


def _with_counts(run: Path, counts: dict[str, dict[str, int]]) -> None:
    doc = json.loads((run / "metrics.json").read_text())
    doc["test_images"] = counts
    (run / "metrics.json").write_text(json.dumps(doc))


def test_leaderboard_marks_cells_inside_the_chance_band(tmp_path: Path) -> None:
    counts = {"a": GRID, "b": {"good": 100, "defective": 192}}
    runs = [_fake_run(tmp_path, "ucad", 0, {"a": 0.95, "b": 0.88}), _fake_run(tmp_path, "lemo", 0, {"a": 0.21, "b": 0.69})]
    for run in runs:
        _with_counts(run, counts)
    rows = aggregate([summarise_run(r) for r in runs])
    text = leaderboard_markdown(rows, "Sequence `x`", [], counts)
    assert "| lemo | 21.0 ° | 69.0 |" in text and "| ucad | 95.0 | 88.0 |" in text
    assert "a 18.2–81.8 (3 good / 11 defective), b 44." in text
    assert "°" not in leaderboard_markdown(rows, "Sequence `x`", [])  # runs without counts: no marks, no note


def test_standing_tells_luck_from_inversion(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    for method, seed, aurocs in [("ucad", 0, {"a": 0.9, "b": 0.8}), ("lemo", 0, {"a": 0.2, "b": 0.3})]:
        _with_counts(_fake_run(out / "real-ad", method, seed, aurocs), {"a": GRID, "b": {"good": 100, "defective": 192}})
    write_leaderboard(out, tmp_path / "LEADERBOARD.md")
    assert json.loads((tmp_path / "LEADERBOARD.json").read_text())["real-ad"]["test_images"]["a"] == GRID
    (standing,) = method_standing(tmp_path / "LEADERBOARD.json", "lemo")
    line = standing_sentence(standing)
    assert "below chance on b" in line  # 0.30 on 292 images: below its band, a real inversion
    assert "inside the chance band of its few test images on a" in line  # 0.20 on 3 good images: luck
    assert "Chance band per product" in "\n".join(standing_markdown([standing], "lemo", "x.json"))


def test_report_names_products_inside_their_chance_band() -> None:
    doc = {"method": "lemo", "protocol": "sequential", "tasks": ["a", "b"], "matrix": {}, "average": {}, "forgetting": {},
           "final": {"image_auroc": {"a": 0.21, "b": 0.69}}, "test_images": {"a": GRID, "b": {"good": 100, "defective": 192}}}
    from components.eval.report import chance_band_lines

    text = "\n".join(chance_band_lines(doc))
    assert "`a` 18.2–81.8 (3 good / 11 defective; **21.0 is inside**)" in text
    assert "`b` 44." in text and "69.0 is inside" not in text
    assert chance_band_lines({**doc, "test_images": {}}) == []  # older metrics.json: nothing claimed
    assert "Chance band" not in run_markdown({**doc, "test_images": {}}, {})


def test_predict_summary_says_when_a_measured_auroc_is_luck() -> None:
    from flows.predict import summary_text

    measured = {"images": 14, "good": 3, "defective": 11, "false_reject_rate": 0.0, "escape_rate": 0.5}
    summary = {"target_fpr": 0.01, "routed": {}, "promises": [], "measured": {
        "grid": {**measured, "image_auroc": 0.21, "chance_band": list(chance_band(3, 11))},
        "pcb": {**measured, "good": 60, "defective": 150, "image_auroc": 0.9, "chance_band": list(chance_band(60, 150))},
        "washer": {**measured, "defective": 0, "image_auroc": None, "chance_band": None}}}
    lines = summary_text(summary).splitlines()
    assert "image AUROC 0.2100 (inside the chance band 0.18-0.82 of 3 good / 11 defective images: no evidence of detection)" in lines[1]
    assert lines[2].endswith("image AUROC 0.9000") and lines[3].endswith("image AUROC -")


def test_runs_without_counts_take_them_from_the_data_their_run_record_names(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "data"
    for rel in ("a/train/good/0.png", "a/test/good/0.png", "a/test/good/1.png", "a/test/scratch/0.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (16, 16), 128).save(root / rel)
    (root / "a/ground_truth/scratch").mkdir(parents=True)
    Image.new("L", (16, 16), 255).save(root / "a/ground_truth/scratch/0_mask.png")
    run = _fake_run(tmp_path / "bench", "ucad", 0, {"a": 0.9})  # metrics.json without test_images (older runs)
    (run / "run.json").write_text(json.dumps({"config": {"data": {"root": str(root)}}}))
    assert summarise_run(run)["test_images"] == {"a": {"good": 2, "defective": 1}}
    (run / "run.json").write_text(json.dumps({"config": {"data": {"root": str(tmp_path / "gone")}}}))
    assert summarise_run(run)["test_images"] == {}  # advice only: unreadable data leaves the marks out
