"""``contad data synth --depth``: procedural RGB + xyz object products in the MVTec 3D-AD layout.

```
OUT/<product>/train/good/{rgb/NNN.png, xyz/NNN.tiff}
OUT/<product>/test/good/{rgb, xyz}
OUT/<product>/test/<defect>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}   (gt 0/255, exact)
OUT/<product>/product.json        (design, defect types and the modality each shows in)
OUT/synth.json, OUT/README.md
```
``xyz`` is float32 (H, W, 3), invalid points all zero. Defect types: geometry only (``dent``,
``bump``, ``cut_edge``, ``missing_part``: the RGB image is untouched), colour only (``stain``: the
height field is untouched) and both (``hole``: the belt shows through and the height drops).
Same seed and config give byte-identical files; every image has its own random stream.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import tifffile

from components.atomic import atomic_directory, atomic_write_json, atomic_write_text
from components.config import SynthConfig
from components.data.synth import SEVERITY_RANGE, SYNTH_INDEX, _mask_png, _png_bytes, _put, _remove_stale_products, check_synth_request, light_and_noise
from components.data.synthetic.defects import paint_defect
from components.data.synthetic.designs import DESIGNS, ProductSpec, product_specs
from components.data.synthetic.geometry import DEFAULT_HEIGHT_M, GEOMETRY_PAINTERS, HEIGHT_M, height_field, to_xyz
from components.progress import progress_bar

log = logging.getLogger(__name__)

DEFECT_MODALITY = {
    "dent": "geometry", "bump": "geometry", "cut_edge": "geometry", "missing_part": "geometry",
    "stain": "colour", "hole": "both",
}
DEPTH_DEFECTS = tuple(DEFECT_MODALITY)
OBJECT_DESIGNS = tuple(d for d in DESIGNS if d.kind == "object")
SPLIT_CODES = {"train": 10, "test": 11}  # distinct from the RGB generator's streams


def depth_product_specs(n_products: int, seed: int) -> list[ProductSpec]:
    """The first ``n_products`` object products: each object design once, then colour/scale variants."""
    return product_specs(n_products, seed, OBJECT_DESIGNS, stream=7927, scale_range=(0.85, 1.1))


def render_rgbd(spec: ProductSpec, rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(rgb uint8 (S, S, 3), xyz float32 (S, S, 3), exact defect mask or None) of one image.

    Scene, defect and sensors draw from separate child streams of ``rng``: with the same ``rng``
    a geometry-only defect leaves the RGB image bit-identical to the good image, and a colour-only
    defect leaves the point cloud bit-identical.
    """
    scene_rng, defect_rng, camera_rng, scanner_rng = rng.spawn(4)
    scene = spec.design.render(scene_rng, size, spec.style)
    part_height = HEIGHT_M.get(spec.design.name, DEFAULT_HEIGHT_M) * spec.style.scale
    height = height_field(scene_rng, scene.foreground, part_height)
    image, mask = scene.image, None
    if defect is not None:
        severity = float(defect_rng.uniform(*SEVERITY_RANGE))
        if DEFECT_MODALITY[defect] == "geometry":
            height, mask = GEOMETRY_PAINTERS[defect](defect_rng, height, scene.foreground, severity, part_height)
        else:
            image, mask, _ = paint_defect(defect, defect_rng, scene, severity)
            if DEFECT_MODALITY[defect] == "both":
                height = np.where(mask, 0.0, height).astype(np.float32)
    xyz, _ = to_xyz(scanner_rng, height, part_height)
    return light_and_noise(camera_rng, image), xyz, mask


def tiff_bytes(xyz: np.ndarray) -> bytes:
    """Deterministic zlib-compressed float32 TIFF of an (H, W, 3) organised point cloud."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, xyz.astype(np.float32), compression="zlib", photometric="rgb", metadata=None)
    return buffer.getvalue()


def _groups(cfg: SynthConfig) -> list[tuple[str, str, int, int]]:
    groups = [("train", "good", 0, cfg.train_per_product), ("test", "good", 0, cfg.test_good_per_product)]
    return groups + [("test", defect, k + 1, cfg.test_defect_per_type) for k, defect in enumerate(DEPTH_DEFECTS)]


def _write_product(out: Path, spec: ProductSpec, product_index: int, seed: int, cfg: SynthConfig) -> None:
    groups = _groups(cfg)
    with atomic_directory(out / spec.name) as product_dir:
        items = [(split, kind, type_index, i) for split, kind, type_index, count in groups for i in range(count)]
        for split, kind, type_index, i in progress_bar(items, desc=f"synth {spec.name} (rgb+xyz)", leave=False):
            rng = np.random.default_rng([seed, product_index, SPLIT_CODES[split], type_index, i])
            rgb, xyz, mask = render_rgbd(spec, rng, cfg.image_size, None if kind == "good" else kind)
            folder, stem = product_dir / split / kind, f"{i:03d}"
            _put(folder / "rgb" / f"{stem}.png", _png_bytes(rgb))
            _put(folder / "xyz" / f"{stem}.tiff", tiff_bytes(xyz))
            if mask is not None:
                _put(folder / "gt" / f"{stem}.png", _mask_png(mask))
        info = {
            "name": spec.name, "design": spec.design.name, "kind": "object", "variant": spec.variant,
            "description": spec.design.description, "defect_types": list(DEPTH_DEFECTS),
            "defect_modality": DEFECT_MODALITY, "counts": {f"{s}/{k}": c for s, k, _, c in groups},
            "image_size": cfg.image_size, "seed": seed, "severity_range": list(SEVERITY_RANGE), "layout": "mvtec3d",
        }
        atomic_write_json(product_dir / "product.json", info)


def _readme(specs: list[ProductSpec], seed: int) -> str:
    lines = [
        "# Synthetic RGB + xyz products (contad data synth --depth)",
        "",
        f"Procedurally generated, seed {seed}. MVTec 3D-AD layout: `<product>/{{train,test}}/<type>/rgb/NNN.png`,",
        "`xyz/NNN.tiff` (float32 HxWx3, metres, invalid points = 0), `gt/NNN.png` (0/255, exact).",
        "",
        "| defect type | visible in |",
        "|---|---|",
        *(f"| {d} | {m} |" for d, m in DEFECT_MODALITY.items()),
        "",
        "Products: " + ", ".join(f"{s.name} ({s.design.description})" for s in specs),
    ]
    return "\n".join(lines) + "\n"


def generate_depth_products(out: Path, n_products: int, seed: int, cfg: SynthConfig) -> list[str]:
    """Write ``n_products`` RGB + xyz object products under ``out``; returns their names."""
    check_synth_request(n_products, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = depth_product_specs(n_products, seed)
    names = [s.name for s in specs]
    _remove_stale_products(out, set(names))
    for index, spec in enumerate(specs):
        log.info("generating RGB-D product %d/%d: %s", index + 1, len(specs), spec.name)
        _write_product(out, spec, index, seed, cfg)
    atomic_write_json(out / SYNTH_INDEX, {"generator": "contad data synth --depth", "seed": seed, "products": names, "config": cfg.model_dump(mode="json")})
    atomic_write_text(out / "README.md", _readme(specs, seed))
    return names
