"""``contad data synth``: procedural industrial products in the MVTec AD layout.

```
OUT/<product>/train/good/NNN.png
OUT/<product>/test/good/NNN.png
OUT/<product>/test/<defect>/NNN.png
OUT/<product>/ground_truth/<defect>/NNN_mask.png     (0/255, exact)
OUT/<product>/product.json                           (design, defect types, counts)
OUT/.synth_meta/<product>/<split>/<type>/NNN.png     (object products: exact foreground mask, 0/255)
OUT/synth.json, OUT/README.md
```
Same seed and config give byte-identical files. Every image draws its own random stream from
(seed, product, split, type, index), so images do not depend on generation order.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.atomic import atomic_directory, atomic_write_json, atomic_write_text
from components.config import SynthConfig
from components.data.synthetic.canvas import lighting_field, to_uint8
from components.data.synthetic.defects import paint_defect
from components.data.synthetic.designs import ProductSpec, product_specs
from components.errors import DataError
from components.progress import progress_bar

log = logging.getLogger(__name__)

META_DIR = ".synth_meta"
SYNTH_INDEX = "synth.json"
SEVERITY_RANGE = (0.1, 1.0)
SENSOR_NOISE = 0.012
LIGHTING_STRENGTH = 0.12
SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class SynthImage:
    """One generated image with its defect mask (None for good images) and object mask."""

    image: np.ndarray
    defect_mask: np.ndarray | None
    object_mask: np.ndarray | None


def _png_bytes(array: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps or text chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _mask_png(mask: np.ndarray) -> bytes:
    return _png_bytes((mask.astype(np.uint8) * 255))


def render_image(spec: ProductSpec, rng: np.random.Generator, size: int, defect: str | None) -> SynthImage:
    """Render one normal image of ``spec`` (optionally with ``defect``), then light and add sensor noise."""
    scene = spec.design.render(rng, size, spec.style)
    image, defect_mask, foreground = scene.image, None, scene.foreground
    if defect is not None:
        severity = float(rng.uniform(*SEVERITY_RANGE))
        image, defect_mask, foreground = paint_defect(defect, rng, scene, severity)
    return SynthImage(light_and_noise(rng, image), defect_mask, foreground)


def light_and_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera effects on a rendered (S, S, 3) float image: white balance, lighting field, sensor noise -> uint8."""
    size = image.shape[0]
    white_balance = (1.0 + rng.uniform(-0.02, 0.02, size=3)).astype(np.float32)
    image = image * lighting_field(rng, size, LIGHTING_STRENGTH)[..., None] * white_balance
    image = image + SENSOR_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
    return to_uint8(image)


def _image_rng(seed: int, product_index: int, split: str, type_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, product_index, SPLIT_CODES[split], type_index, index])


def _plan(spec: ProductSpec, cfg: SynthConfig) -> list[tuple[str, str, int, int]]:
    """(split, type, type_index, count) groups of one product."""
    groups = [("train", "good", 0, cfg.train_per_product), ("test", "good", 0, cfg.test_good_per_product)]
    groups += [("test", defect, k + 1, cfg.test_defect_per_type) for k, defect in enumerate(spec.design.defects)]
    return groups


def _write_product(out: Path, spec: ProductSpec, product_index: int, seed: int, cfg: SynthConfig) -> None:
    """Generate one product folder (and its object masks) atomically."""
    is_object = spec.design.kind == "object"
    groups = _plan(spec, cfg)
    total = sum(count for *_, count in groups)
    with ExitStack() as stack:
        product_dir = stack.enter_context(atomic_directory(out / spec.name))
        meta_dir = stack.enter_context(atomic_directory(out / META_DIR / spec.name)) if is_object else None
        progress = progress_bar(total=total, desc=f"synth {spec.name}", leave=False)
        for split, kind, type_index, count in groups:
            for i in range(count):
                rng = _image_rng(seed, product_index, split, type_index, i)
                item = render_image(spec, rng, cfg.image_size, None if kind == "good" else kind)
                stem = f"{i:03d}"
                _put(product_dir / split / kind / f"{stem}.png", _png_bytes(item.image))
                if item.defect_mask is not None:
                    _put(product_dir / "ground_truth" / kind / f"{stem}_mask.png", _mask_png(item.defect_mask))
                if meta_dir is not None and item.object_mask is not None:
                    _put(meta_dir / split / kind / f"{stem}.png", _mask_png(item.object_mask))
                progress.update(1)
        progress.close()
        atomic_write_json(product_dir / "product.json", _product_info(spec, groups, seed, cfg))
    if not is_object:
        shutil.rmtree(out / META_DIR / spec.name, ignore_errors=True)  # left over from an earlier run


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _product_info(spec: ProductSpec, groups: list[tuple[str, str, int, int]], seed: int, cfg: SynthConfig) -> dict:
    return {
        "name": spec.name,
        "design": spec.design.name,
        "kind": spec.design.kind,
        "variant": spec.variant,
        "description": spec.design.description,
        "defect_types": list(spec.design.defects),
        "colours": [[round(c, 4) for c in colour] for colour in spec.style.colours],
        "scale": round(spec.style.scale, 4),
        "counts": {f"{split}/{kind}": count for split, kind, _, count in groups},
        "image_size": cfg.image_size,
        "seed": seed,
        "severity_range": list(SEVERITY_RANGE),
        "object_masks": f"{META_DIR}/{spec.name}" if spec.design.kind == "object" else None,
    }


def _readme(specs: list[ProductSpec], seed: int) -> str:
    lines = [
        "# Synthetic industrial products (contad data synth)",
        "",
        f"Procedurally generated, seed {seed}. MVTec AD layout: `<product>/train/good`, `test/good`,",
        "`test/<defect>`, `ground_truth/<defect>/<stem>_mask.png` (0/255, exact). Defect severity is drawn",
        f"per image in {list(SEVERITY_RANGE)} (size and contrast), so defects range from obvious to subtle.",
        f"Object products also have exact foreground masks under `{META_DIR}/<product>/<split>/<type>/<stem>.png`.",
        "",
        "| product | kind | design | defect types |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.design.kind} | {s.design.description} | {', '.join(s.design.defects)} |" for s in specs]
    return "\n".join(lines) + "\n"


def _remove_stale_products(out: Path, keep: set[str]) -> None:
    """Delete products a previous synth run wrote into ``out`` that this run does not produce."""
    index = out / SYNTH_INDEX
    if not index.is_file():
        return
    try:
        previous = json.loads(index.read_text()).get("products", [])
    except (ValueError, AttributeError):
        return
    for name in previous:
        if name not in keep and isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.rmtree(out / META_DIR / name, ignore_errors=True)


def check_synth_request(n_products: int, cfg: SynthConfig) -> None:
    """``DataError`` naming the option or key when a synthetic data request cannot be generated."""
    if n_products < 1:
        raise DataError(f"--products must be >= 1, got {n_products}")
    if cfg.image_size < 64:
        raise DataError(f"data.synth.image_size must be >= 64, got {cfg.image_size}")
    if cfg.train_per_product < 2:
        raise DataError(f"data.synth.train_per_product must be >= 2, got {cfg.train_per_product}")


def generate_products(out: Path, n_products: int, seed: int, cfg: SynthConfig) -> list[str]:
    """Write ``n_products`` synthetic products under ``out``; returns their names."""
    check_synth_request(n_products, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = product_specs(n_products, seed)
    names = [spec.name for spec in specs]
    _remove_stale_products(out, set(names))
    for product_index, spec in enumerate(specs):
        log.info("generating product %d/%d: %s (%s)", product_index + 1, len(specs), spec.name, spec.design.description)
        _write_product(out, spec, product_index, seed, cfg)
    index = {"generator": "contad data synth", "seed": seed, "products": names, "config": cfg.model_dump(mode="json")}
    atomic_write_json(out / SYNTH_INDEX, index)
    atomic_write_text(out / "README.md", _readme(specs, seed))
    return names


def object_mask_path(root: Path, image_path: Path) -> Path | None:
    """The exact foreground mask of a synthetic object image, or None (texture product / not synthetic)."""
    root, image_path = Path(root).resolve(), Path(image_path).resolve()
    try:
        relative = image_path.relative_to(root)
    except ValueError:
        return None
    candidate = root / META_DIR / relative.with_suffix(".png")
    return candidate if candidate.is_file() else None
