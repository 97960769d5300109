"""Synthetic products: determinism, layout, exact masks, object masks, product diversity, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import SynthConfig
from components.data.manifest import read_dataset
from components.data.synth import META_DIR, generate_products, object_mask_path, render_image
from components.data.synthetic.defects import PAINTERS, paint_defect
from components.data.synthetic.designs import DESIGNS, product_specs
from components.errors import DataError
from flows.cli import main

SMALL = SynthConfig(image_size=64, train_per_product=3, test_good_per_product=2, test_defect_per_type=1)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    generate_products(tmp_path / "a", 3, seed=5, cfg=SMALL)
    generate_products(tmp_path / "b", 3, seed=5, cfg=SMALL)
    generate_products(tmp_path / "c", 3, seed=6, cfg=SMALL)
    a, b, c = _hashes(tmp_path / "a"), _hashes(tmp_path / "b"), _hashes(tmp_path / "c")
    assert len(a) > 30 and a == b
    images = [k for k in a if k.endswith(".png") and not k.startswith(META_DIR)]
    assert sum(a[k] != c.get(k) for k in images) == len(images)  # another seed changes every image


def test_layout_masks_and_object_masks(tmp_path: Path) -> None:
    cfg = SynthConfig(image_size=128, train_per_product=2, test_good_per_product=1, test_defect_per_type=2)
    names = generate_products(tmp_path, 5, seed=0, cfg=cfg)
    assert len(set(names)) == 5
    df = read_dataset(tmp_path)
    assert sorted(df["product"].unique()) == sorted(names)  # .synth_meta is not a product
    bad = df[df["label"] == 1]
    assert len(bad) == 5 * 4 * 2 and (bad["mask_path"] != "").all()
    for path in bad["mask_path"]:
        mask = np.asarray(Image.open(path))
        assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 255}
    for product in names:
        info = json.loads((tmp_path / product / "product.json").read_text())
        rows = df[df["product"] == product]
        for image_path in rows["image_path"]:
            found = object_mask_path(tmp_path, Path(image_path))
            if info["kind"] == "object":
                assert found is not None
                obj = np.asarray(Image.open(found)) > 0
                assert 0.05 < obj.mean() < 0.6  # a part on a belt, not the whole frame
            else:
                assert found is None
    assert object_mask_path(tmp_path, Path("/elsewhere/x.png")) is None
    # regenerating fewer products removes the stale ones
    generate_products(tmp_path, 2, seed=0, cfg=cfg)
    assert sorted(read_dataset(tmp_path)["product"].unique()) == sorted(names[:2])
    assert not (tmp_path / META_DIR / names[3]).exists()


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: d.name)
def test_defect_masks_are_exact(design) -> None:  # noqa: ANN001
    """Every defect changes pixels only inside its mask, and changes most of the mask."""
    for k, kind in enumerate(design.defects):
        rng = np.random.default_rng(k)
        scene = design.render(rng, 96, design.style)
        for severity in (0.1, 1.0):
            image, mask, _ = paint_defect(kind, np.random.default_rng([k, int(severity * 10)]), scene, severity)
            changed = np.abs(image - scene.image).max(axis=-1) > 1e-6
            assert mask.sum() >= 8, (design.name, kind)
            assert not (changed & ~mask).any(), f"{design.name}/{kind} changed pixels outside its mask"
            assert changed[mask].mean() > 0.3, (design.name, kind, severity)


def test_all_painters_are_used_and_variants_are_named() -> None:
    used = {kind for design in DESIGNS for kind in design.defects}
    assert used == set(PAINTERS)
    specs = product_specs(len(DESIGNS) + 3, seed=0)
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    assert names[len(DESIGNS)] == f"{DESIGNS[0].name}_v2"
    assert specs[len(DESIGNS)].style.colours != DESIGNS[0].style.colours
    with pytest.raises(DataError):
        generate_products(Path("/tmp/never"), 0, seed=0, cfg=SMALL)


def test_products_are_distinguishable_and_normals_vary() -> None:
    """A nearest-centroid router on colour statistics separates the products; normal images differ."""
    specs = product_specs(len(DESIGNS), seed=0)

    def feature(image: np.ndarray) -> np.ndarray:
        pixels = image.reshape(-1, 3).astype(np.float32)
        return np.concatenate([pixels.mean(0), pixels.std(0)])

    centroids, tests = [], []
    for p, spec in enumerate(specs):
        train = [render_image(spec, np.random.default_rng([p, 0, i]), 96, None).image for i in range(3)]
        assert np.abs(train[0].astype(int) - train[1].astype(int)).mean() > 1.0  # natural variation
        centroids.append(np.mean([feature(x) for x in train], axis=0))
        tests += [(p, feature(render_image(spec, np.random.default_rng([p, 1, i]), 96, spec.design.defects[i]).image)) for i in range(2)]
    centroids_arr = np.stack(centroids)
    correct = [int(np.argmin(np.linalg.norm(centroids_arr - f, axis=1)) == p) for p, f in tests]
    assert np.mean(correct) >= 0.9


def test_synth_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--products", "2", "--seed", "1",
            "data.synth.image_size=64", "data.synth.train_per_product=2", "data.synth.test_good_per_product=1", "data.synth.test_defect_per_type=1"]
    assert main(args) == 0
    assert "woven_fabric" in capsys.readouterr().out
    assert sorted(read_dataset(out)["product"].unique()) == ["washer", "woven_fabric"]
    assert json.loads((out / "synth.json").read_text())["seed"] == 1
    assert main(["data", "synth", "--out", str(out), "--products", "0"]) == 2  # user error -> exit 2
