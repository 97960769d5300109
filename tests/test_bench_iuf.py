"""``benchmarks/bench_iuf``: the validation set used to choose reconstruction defaults (``--validation``:
held-out normal TRAINING images + synthetic defects; it never reads a test image and never trains on
its normals) and the results table (a one-step joint row has no forgetting)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.bench_iuf import VALIDATION_FRACTION, VALIDATION_VARIANTS, main, table, validation_data
from components.data.synthetic.pasted import line_defects, synthetic_defects
from components.data.manifest import read_dataset
from components.errors import DataError
from tests.test_pipeline_helpers import make_tiny_products


def test_synthetic_defects_change_exactly_the_masked_rectangle() -> None:
    normals, donors = torch.zeros(3, 3, 64, 64), torch.ones(2, 3, 64, 64)
    images, masks = synthetic_defects(normals, donors, 2, torch.Generator().manual_seed(0))
    assert images.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64)
    for image, mask in zip(images, masks, strict=True):
        changed = (image != 0).any(dim=0)
        assert mask.sum() > 0 and torch.equal(changed, mask.bool())


def test_line_defects_paint_thin_strokes_inside_their_masks_in_the_images_extreme_values() -> None:
    gen = torch.Generator().manual_seed(0)
    normals = torch.linspace(-1.0, 1.0, 64).expand(2, 3, 64, 64).contiguous()  # a horizontal ramp
    images, masks = line_defects(normals, 3, gen)
    assert images.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        changed = (image != normals[i // 3]).any(dim=0)
        assert 0 < int(mask.sum()) < 0.15 * mask.numel(), "thin strokes, not patches"
        assert not (changed & ~mask.bool()).any(), "nothing outside the mask changes"
        painted = image[:, mask.bool()]
        extremes = torch.stack([normals[0].flatten(1).quantile(q, dim=1) for q in (0.01, 0.99)])
        assert all(any(torch.allclose(px, e) for e in extremes) for px in painted.T), "strokes take the image's darkest or brightest value"


def test_validation_data_holds_out_training_normals_and_reads_no_test_image(tmp_path: Path) -> None:
    root = make_tiny_products(tmp_path / "data", n_products=2)
    manifest = read_dataset(root)
    products = sorted(manifest["product"].unique())
    kept, batches = validation_data(manifest, products, 32)
    _, lines = validation_data(manifest, products, 32, "lines")
    assert all(torch.equal(lines[p].labels, batches[p].labels) and lines[p].paths == batches[p].paths for p in products)
    test_paths = set(manifest.loc[manifest["split"] == "test", "image_path"])
    for product in products:
        batch = batches[product]
        normals = [p for p, label in zip(batch.paths, batch.labels.tolist(), strict=True) if label == 0]
        n_train = int(((manifest["product"] == product) & (manifest["split"] == "train")).sum())
        assert len(normals) == max(1, round(n_train * VALIDATION_FRACTION))
        assert int(batch.labels.sum()) == VALIDATION_VARIANTS * len(normals)
        assert not set(normals) & test_paths, "validation normals come from the training split"
        assert not set(normals) & set(kept["image_path"]), "validation normals are not trained on"
        assert batch.masks is not None and all(int(m.sum()) > 0 for m in batch.masks[len(normals):])
    assert test_paths <= set(kept["image_path"]) and len(kept) == len(manifest) - sum(int((b.labels == 0).sum()) for b in batches.values())


def test_table_shows_undefined_forgetting_of_a_one_step_row_as_a_dash() -> None:
    doc = {"final": {"image_auroc": {"grid": 0.5, "pcb": 0.25}}, "average": {"image_auroc": 0.375, "pixel_auroc": 0.9},
           "forgetting": {"image_auroc": None, "pixel_auroc": None}, "bench_steps": [{"fit_wall_s": 10.2, "eval_wall_s": 1.0}]}
    row = table({"joint": doc}).splitlines()[-1]
    assert row == "| joint | 50.0 | – | – | 25.0 | 37.5 | 90.0 | – | – | [11] |"


def test_validation_data_refuses_a_product_with_a_single_training_image(tmp_path: Path) -> None:
    manifest = read_dataset(make_tiny_products(tmp_path / "data", n_products=2))
    product = sorted(manifest["product"].unique())[0]
    train = manifest[(manifest["product"] == product) & (manifest["split"] == "train")]
    single = manifest.drop(index=train.index[1:])
    with pytest.raises(DataError, match=f"product '{product}'.*too few normal training images"):
        validation_data(single, sorted(manifest["product"].unique()), 32)


def test_calibration_figure_of_a_trained_iuf_and_its_input_errors() -> None:
    from benchmarks.iuf_calibration_figure import calibration_figure, first_good_and_defect
    from components.methods.reconstruction import calibrate_positions, pooled_max_scores, upsample_maps
    from components.types import ImageBatch
    from tests.test_methods_iuf import task, tiny_iuf

    method = tiny_iuf()
    method.fit_task(task("red"))
    images = torch.cat([task("red", 2, seed=5).train.images, task("red", 2, seed=6).train.images])
    images[2:, :, 20:40, 20:40] = 3.0  # defective copies
    masks = torch.zeros(4, images.shape[-2], images.shape[-1], dtype=torch.uint8)
    masks[2:, 20:40, 20:40] = 1
    batch = ImageBatch(images, ["red"] * 4, [f"t{i}" for i in range(4)], labels=torch.tensor([0, 0, 1, 1]), masks=masks)
    assert first_good_and_defect(batch) == (0, 2)
    raw = method.raw_error_maps(images)  # the figure's raw maps are the ones predict calibrates
    expected = pooled_max_scores(upsample_maps(calibrate_positions(raw, method.score_profile()), tuple(images.shape[-2:]), 0.0), method.config.iuf.score_pool)
    torch.testing.assert_close(method.predict(images).image_scores, expected)
    png = calibration_figure(method, {"red": batch})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(ValueError, match="good and one defective"):
        first_good_and_defect(ImageBatch(images, ["red"] * 4, [f"t{i}" for i in range(4)], labels=torch.zeros(4, dtype=torch.long)))
    plain = tiny_iuf("iuf.score_calibration=none")
    plain.fit_task(task("red"))
    with pytest.raises(ValueError, match="no position profiles"):
        calibration_figure(plain, {"red": batch})


@pytest.mark.parametrize(("argv", "message"), [
    (["--figure", "iuf.score_calibration=none"], "--figure needs iuf.score_calibration=position (got none)"),
    (["--rows", "iuf_full,iuf_bogus"], "--rows: unknown ['iuf_bogus']"),
    (["--protocols", "3-1x1"], "--protocols: unknown ['3-1x1']"),
])
def test_main_refuses_bad_arguments_before_reading_any_data(argv: list[str], message: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.argv", ["bench_iuf", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
