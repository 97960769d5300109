"""Dataset validation: a corrupted synthetic set reports every problem with its file; real data passes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import SynthConfig
from components.data.synth import generate_products
from components.data.validate import REPORT_NAME, validate_command, validate_dataset
from flows.cli import main

SMALL = SynthConfig(image_size=64, train_per_product=3, test_good_per_product=2, test_defect_per_type=2)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file() and p.name != REPORT_NAME}


def test_valid_synthetic_set_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_products(tmp_path / "data", 2, seed=0, cfg=SMALL)
    assert main(["data", "validate", str(tmp_path / "data"), "--out", str(tmp_path / "val")]) == 0
    assert not (tmp_path / "data" / REPORT_NAME).exists()  # never into the data
    report = json.loads((tmp_path / "val" / REPORT_NAME).read_text())
    assert report["ok"] and report["n_failures"] == 0
    assert any(e["expectation"] == "expect_column_values_to_be_in_set" for e in report["expectations"])
    assert "is valid" in capsys.readouterr().out


def test_corrupted_dataset_reports_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    fabric, washer = generate_products(root, 2, seed=0, cfg=SMALL)
    f, w = root / fabric, root / washer
    # 1. truncated PNG
    truncated = f / "test" / "hole" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    # 2. mask of the wrong size
    wrong_size = f / "ground_truth" / "stain" / "000_mask.png"
    Image.fromarray(np.full((32, 40), 255, np.uint8)).save(wrong_size)
    # 3. defective image without mask
    (f / "ground_truth" / "thread" / "001_mask.png").unlink()
    unmasked = f / "test" / "thread" / "001.png"
    # 4. empty train/good
    for p in (w / "train" / "good").iterdir():
        p.unlink()
    # 5. the same image in train and test
    leaked = f / "test" / "good" / "leak.png"
    shutil.copy(f / "train" / "good" / "001.png", leaked)
    # 6. non-binary and empty masks, a mask for a good image, an orphan mask
    grey = f / "ground_truth" / "cut" / "000_mask.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)).save(grey)
    empty = f / "ground_truth" / "cut" / "001_mask.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty)
    (f / "ground_truth" / "good").mkdir()
    good_mask = f / "ground_truth" / "good" / "000_mask.png"
    shutil.copy(empty, good_mask)
    orphan = f / "ground_truth" / "hole" / "077_mask.png"
    shutil.copy(f / "ground_truth" / "hole" / "000_mask.png", orphan)
    # 7. product names differing only by case
    shutil.copytree(f, root / fabric.upper())

    before = _tree_hashes(root)
    assert validate_command(root, tmp_path / REPORT_NAME) == 2
    assert _tree_hashes(root) == before  # nothing in the data was modified

    found = {(x["rule"], x["path"]) for x in json.loads((tmp_path / REPORT_NAME).read_text())["failures"]}
    expected = {
        ("image_unreadable", str(truncated)),
        ("mask_size_mismatch", str(wrong_size)),
        ("mask_missing", str(unmasked)),
        ("train_good_empty", str(w / "train" / "good")),
        ("train_test_overlap", str(leaked)),
        ("train_test_overlap", str(f / "train" / "good" / "001.png")),
        ("mask_not_binary", str(grey)),
        ("mask_empty", str(empty)),
        ("mask_for_good_image", str(good_mask)),
        ("orphan_mask", str(orphan)),
        ("duplicate_product", str(f)),
    }
    assert expected <= found, expected - found
    printed = capsys.readouterr().out
    for rule, path in expected:
        assert f"[{rule}] {path}" in printed


def test_unknown_layout_and_read_only_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junk = tmp_path / "junk"
    (junk / "nothing").mkdir(parents=True)
    report = validate_dataset(junk)
    assert not report.ok and report.failures[0].rule == "layout" and str(junk) in report.failures[0].message
    monkeypatch.chdir(tmp_path)
    os.chmod(junk, 0o555)
    try:
        assert validate_command(junk, None) == 2
    finally:
        os.chmod(junk, 0o755)
    assert not (junk / REPORT_NAME).exists()
    assert json.loads((tmp_path / "runs" / "validation" / f"junk_{REPORT_NAME}").read_text())["ok"] is False


@pytest.mark.realdata
def test_real_ad_passes(real_ad: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the shared folder is read-only: the report goes to runs/validation/
    before = {p.name for p in real_ad.iterdir()}
    assert main(["data", "validate", str(real_ad)]) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "validation" / f"{real_ad.resolve().name}_{REPORT_NAME}").read_text())
    assert report["ok"]
    assert {"grid", "hazelnut_toy", "magnetic_tile", "pcb"} <= set(report["products"])
    assert {p.name for p in real_ad.iterdir()} == before
