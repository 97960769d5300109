"""Layout readers: tiny fixtures of every supported layout, built on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from components.data.manifest import MANIFEST_COLUMNS, detect_layout, read_dataset, read_product
from components.errors import DataError


def _png(path: Path, value: int = 128, size: tuple[int, int] = (20, 16), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (20, 16), on: int = 255) -> Path:
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[2:6, 3:8] = on
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def make_mvtec(root: Path, products: tuple[str, ...] = ("bottle", "screw")) -> Path:
    for k, product in enumerate(products):
        d = root / product
        for i in range(3):
            _png(d / "train" / "good" / f"{i:03d}.png", 10 + i + k * 20, mode="L")
        _png(d / "test" / "good" / "000.png", 90 + k, mode="L")
        _png(d / "test" / "scratch" / "000.png", 200 + k, mode="L")
        _mask(d / "ground_truth" / "scratch" / "000_mask.png")
    (root / ".synth_meta" / "bottle" / "train" / "good").mkdir(parents=True)
    _png(root / ".synth_meta" / "bottle" / "train" / "good" / "000.png", 1)
    (root / "runs").mkdir()  # a non-product folder is ignored
    (root / "README.md").write_text("x")
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    assert detect_layout(root) == "mvtec"
    df = read_dataset(root)
    assert list(df.columns) == MANIFEST_COLUMNS
    assert sorted(df["product"].unique()) == ["bottle", "screw"]
    assert len(df) == 10
    bad = df[df["label"] == 1]
    assert set(bad["defect_type"]) == {"scratch"}
    assert all(Path(p).name == "000_mask.png" and Path(p).is_absolute() for p in bad["mask_path"])
    assert (df[df["label"] == 0]["mask_path"] == "").all()
    assert (df["width"] == 20).all() and (df["height"] == 16).all()
    assert df["sha256"].str.len().eq(64).all()
    assert not df["image_path"].str.contains(".synth_meta").any()
    # only the requested products, unknown ones are an error naming the root
    assert set(read_dataset(root, products=["screw"])["product"]) == {"screw"}
    with pytest.raises(DataError, match="nope"):
        read_dataset(root, products=["nope"])
    # one product folder
    one = read_product(root / "bottle", "my-bottle")
    assert set(one["product"]) == {"my-bottle"} and len(one) == 5


def test_mvtec_single_product_root_and_visa_converted_masks(tmp_path: Path) -> None:
    d = tmp_path / "candle"
    _png(d / "train" / "good" / "a.JPG", 5)
    _png(d / "test" / "bad" / "b.JPG", 50)
    _mask(d / "ground_truth" / "bad" / "b.png", on=1)  # VisA-converted: same stem, values {0,1}
    df = read_dataset(d)
    assert set(df["product"]) == {"candle"}
    assert df.loc[df["label"] == 1, "mask_path"].iloc[0].endswith("ground_truth/bad/b.png")


def test_visa_csv_layout(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    lines = ["object,split,label,image,mask"]
    for product in ("candle", "pcb1"):
        for i in range(2):
            rel = f"{product}/Data/Images/Normal/{i:04d}.JPG"
            _png(root / rel, 10 + i)
            lines.append(f"{product},train,normal,{rel},")
        rel = f"{product}/Data/Images/Anomaly/000.JPG"
        _png(root / rel, 200)
        mrel = f"{product}/Data/Masks/Anomaly/000.png"
        _mask(root / mrel, on=1)
        lines.append(f"{product},test,anomaly,{rel},{mrel}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    assert detect_layout(root) == "visa"
    df = read_dataset(root)
    assert len(df) == 6
    assert set(df[df["label"] == 1]["defect_type"]) == {"bad"}
    assert (df[df["label"] == 1]["mask_path"] != "").all()
    (root / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\ncandle,train,weird,x.png,\n")
    with pytest.raises(DataError, match="1cls.csv:2"):
        read_dataset(root)


def test_mvtec3d_layout(tmp_path: Path) -> None:
    root = tmp_path / "mvtec3d"
    d = root / "cookie"
    for split, kind in (("train", "good"), ("validation", "good"), ("test", "good"), ("test", "crack")):
        _png(d / split / kind / "rgb" / "000.png", 40)
        (d / split / kind / "xyz").mkdir(parents=True)
        tifffile.imwrite(d / split / kind / "xyz" / "000.tiff", np.zeros((16, 20, 3), dtype=np.float32))
        if kind != "good":
            _mask(d / split / kind / "gt" / "000.png")
    assert detect_layout(root) == "mvtec3d"
    df = read_dataset(root)
    assert len(df) == 4
    assert (df["split"] == "train").sum() == 2
    assert df["depth_path"].str.endswith(".tiff").all()
    crack = df[df["defect_type"] == "crack"].iloc[0]
    assert crack["label"] == 1 and crack["mask_path"].endswith("gt/000.png")


def test_eyecandies_layout(tmp_path: Path) -> None:
    root = tmp_path / "eyecandies"
    d = root / "CandyCane"
    for split in ("train", "val", "test_public"):
        data = d / split / "data"
        for sid in ("000", "001"):
            for light in range(6):
                _png(data / f"{sid}_image_{light}.png", 10 * light)
            _png(data / f"{sid}_depth.png", 3, mode="L")
            if split == "test_public":
                _mask(data / f"{sid}_mask.png", on=255 if sid == "001" else 0)
                (data / f"{sid}_metadata.yaml").write_text(f"anomalous: {int(sid == '001')}\n")
    assert detect_layout(root) == "eyecandies"
    df = read_dataset(root)
    assert len(df) == 6
    assert df["image_path"].str.endswith("_image_5.png").all()
    assert df["depth_path"].str.endswith("_depth.png").all()
    bad = df[df["label"] == 1]
    assert len(bad) == 1 and bad.iloc[0]["mask_path"].endswith("001_mask.png")


def test_folder_layout(tmp_path: Path) -> None:
    root = tmp_path / "widget"
    for i in range(10):
        _png(root / "normal" / f"n{i}.png", i)
    _png(root / "abnormal" / "a0.png", 100)
    _png(root / "abnormal" / "dent" / "a1.png", 101)
    _mask(root / "mask" / "a0_mask.png")
    _mask(root / "mask" / "dent" / "a1.png")
    assert detect_layout(root) == "folder"
    df = read_dataset(root)
    assert set(df["product"]) == {"widget"}
    assert (df["split"] == "train").sum() + ((df["split"] == "test") & (df["label"] == 0)).sum() == 10
    assert ((df["split"] == "test") & (df["label"] == 0)).sum() >= 1
    bad = df[df["label"] == 1].set_index("defect_type")
    assert set(bad.index) == {"abnormal", "dent"}
    assert (bad["mask_path"] != "").all()
    assert df.equals(read_dataset(root))  # deterministic


def test_unknown_layout_names_path(tmp_path: Path) -> None:
    (tmp_path / "junk" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "junk")):
        read_dataset(tmp_path / "junk")
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="layout"):
        read_dataset(tmp_path, layout="weird")


@pytest.mark.realdata
def test_real_ad_manifest(real_ad: Path) -> None:
    df = read_dataset(real_ad)
    assert {"grid", "hazelnut_toy", "magnetic_tile", "pcb"} <= set(df["product"])
    bad = df[df["label"] == 1]
    assert (bad["mask_path"] != "").all()
    assert (df[df["label"] == 0]["mask_path"] == "").all()
    assert (df["width"] > 0).all()
