"""From manifest rows to model-ready tensors and the per-task data a continual method sees.

Images: square resize to ``image_size`` (bilinear), grey -> RGB, ImageNet normalisation,
``(N, 3, S, S)`` float32. Masks: nearest resize, binarised (any non-zero pixel = defect),
``(N, S, S)`` uint8 in {0, 1}; an empty mask path gives an all-zero mask.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from components.config import Config
from components.data.manifest import untested_products
from components.errors import DataError
from components.progress import progress_bar
from components.types import ImageBatch, TaskData

log = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PROGRESS_MIN_ITEMS = 64


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode (16-bit/float images are scaled to 8 bit by their maximum)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def read_rgb(path: str, image_size: int | None = None) -> np.ndarray:
    """Decode an image as HxWx3 uint8 (optionally square-resized bilinearly); ``DataError`` if unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if image_size is not None:
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.array(rgb, dtype=np.uint8)


def read_mask(path: str, image_size: int | None = None) -> np.ndarray:
    """Decode a mask as HxW uint8 in {0, 1} (optionally nearest-resized); ``DataError`` if unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            grey = img if img.mode in ("L", "1", "I", "I;16", "F", "P") else img.convert("L")
            if image_size is not None:
                grey = grey.resize((image_size, image_size), Image.Resampling.NEAREST)
            arr = np.array(grey)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read mask {path}: {exc}") from exc
    return (arr > 0).astype(np.uint8)


def _progress(items: list[str], what: str) -> list[str] | tqdm:
    return progress_bar(items, desc=what, leave=False, disable=True if len(items) < PROGRESS_MIN_ITEMS else None)


def load_images(paths: list[str], image_size: int) -> torch.Tensor:
    """``(N, 3, S, S)`` float32 ImageNet-normalised images at ``S = image_size``."""
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.float32)
    for i, path in enumerate(_progress(list(paths), "loading images")):
        out[i] = torch.from_numpy(read_rgb(path, image_size)).permute(2, 0, 1).float().div_(255.0)
    return (out - IMAGENET_MEAN) / IMAGENET_STD


def load_masks(paths: list[str], image_size: int) -> torch.Tensor:
    """``(N, S, S)`` uint8 {0, 1} masks; an empty path gives zeros."""
    out = torch.zeros((len(paths), image_size, image_size), dtype=torch.uint8)
    for i, path in enumerate(_progress(list(paths), "loading masks")):
        if path:
            out[i] = torch.from_numpy(read_mask(path, image_size))
    return out


def read_xyz(path: str, image_size: int | None = None) -> np.ndarray:
    """An organised point cloud as (H, W, 3) float32 (optionally nearest-resized); ``DataError`` if unreadable."""
    import tifffile

    try:
        xyz = np.asarray(tifffile.imread(path), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a data problem
        raise DataError(f"cannot read xyz tiff {path}: {exc}") from exc
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise DataError(f"xyz tiff {path} has shape {xyz.shape}, expected (H, W, 3)")
    return resize_xyz(xyz, image_size) if image_size is not None else xyz


def resize_xyz(xyz: np.ndarray, image_size: int) -> np.ndarray:
    """(S, S, 3) nearest-resized point cloud: never mixes valid and invalid (0) points."""
    if xyz.shape[:2] == (image_size, image_size):
        return xyz
    rows = (np.arange(image_size) * xyz.shape[0] // image_size).clip(0, xyz.shape[0] - 1)
    cols = (np.arange(image_size) * xyz.shape[1] // image_size).clip(0, xyz.shape[1] - 1)
    return xyz[rows[:, None], cols[None, :]]


def xyz_tensor(clouds: list[np.ndarray], image_size: int) -> torch.Tensor:
    """``(N, 3, S, S)`` float32 from (H, W, 3) point clouds (nearest-resized, invalid points 0)."""
    out = torch.empty((len(clouds), 3, image_size, image_size), dtype=torch.float32)
    for i, xyz in enumerate(clouds):
        out[i] = torch.from_numpy(np.ascontiguousarray(resize_xyz(np.asarray(xyz, dtype=np.float32), image_size))).permute(2, 0, 1)
    return out


def load_depth(paths: list[str], image_size: int) -> torch.Tensor:
    """``(N, 3, S, S)`` float32 xyz point clouds (nearest-resized, invalid points 0)."""
    return xyz_tensor([read_xyz(path) for path in _progress(list(paths), "loading xyz")], image_size)


def depth_of(rows: pd.DataFrame, image_size: int) -> torch.Tensor | None:
    """xyz of ``rows`` when every row has a ``depth_path`` (RGB-D data), else None."""
    if rows.empty or "depth_path" not in rows or not rows["depth_path"].astype(bool).all():
        return None
    return load_depth(rows["depth_path"].tolist(), image_size)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation: ``(N, 3, H, W)`` in [0, 1]."""
    return (images * IMAGENET_STD.to(images.device) + IMAGENET_MEAN.to(images.device)).clamp(0.0, 1.0)


def _check_products(manifest: pd.DataFrame, products: list[str]) -> None:
    known = set(manifest["product"].unique())
    unknown = [p for p in products if p not in known]
    if unknown:
        raise DataError(f"product(s) {unknown} not in the manifest; available: {sorted(known)}")


def test_batch(manifest: pd.DataFrame, product: str, image_size: int) -> ImageBatch:
    """All test images of ``product`` (sorted by path) with labels and ground-truth masks."""
    _check_products(manifest, [product])
    rows = manifest[(manifest["product"] == product) & (manifest["split"] == "test")].sort_values("image_path", kind="stable")
    if rows.empty:
        raise DataError(f"product {product!r} has no test images")
    paths = rows["image_path"].tolist()
    return ImageBatch(
        images=load_images(paths, image_size),
        products=rows["product"].tolist(),
        paths=paths,
        labels=torch.tensor(rows["label"].to_numpy(dtype=np.int64)),
        masks=load_masks(rows["mask_path"].tolist(), image_size),
        depth=depth_of(rows, image_size),
    )


test_batch.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into tests


def heldout_count(n_images: int, heldout_fraction: float) -> int:
    """How many of ``n_images`` normal training images are held out (>= 1 when n >= 2 and fraction > 0)."""
    if heldout_fraction <= 0 or n_images < 2:
        return 0
    return int(min(n_images - 1, max(1, round(n_images * heldout_fraction))))


def train_split(manifest: pd.DataFrame, products: list[str], heldout_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic split of the train/good rows of ``products`` into (train, held-out).

    Each product is split on its own (seeded by ``seed`` and the product name), so adding a
    product never changes another product's split. Both frames are sorted by (product, path).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction}")
    _check_products(manifest, products)
    train_parts, held_parts = [], []
    for product in products:
        rows = manifest[(manifest["product"] == product) & (manifest["split"] == "train") & (manifest["label"] == 0)]
        rows = rows.sort_values("image_path", kind="stable")
        if rows.empty:
            raise DataError(f"product {product!r} has no train/good images")
        rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(product.encode())])
        order = rng.permutation(len(rows))
        n_held = heldout_count(len(rows), heldout_fraction)
        held_parts.append(rows.iloc[np.sort(order[:n_held])])
        train_parts.append(rows.iloc[np.sort(order[n_held:])])
    train = pd.concat(train_parts).reset_index(drop=True)
    held = pd.concat(held_parts).reset_index(drop=True)
    return train, held


RESERVE_SALT = 0x5E5E  # seeds the reserved-normals draw apart from ``train_split``'s


def reserved_count(n_images: int, fraction: float) -> int:
    """How many of ``n_images`` train/good images are reserved: >= 1 but leaving >= 2 (one to train, one held out)."""
    if n_images < 3:
        return 0
    return int(min(n_images - 2, max(1, round(n_images * fraction))))


def reserve_normals(manifest: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off the reserved normals of every product without test images: ``(manifest without them, reserved rows)``.

    A product that arrives with normal images only cannot be scored by AUROC; its reserved normals
    (a seeded ``fraction`` of its train/good images, drawn per product before ``train_split``) are
    never trained on and never set a threshold, so the share of them the deployed detector rejects
    is an unbiased false-reject rate. Products with test images are untouched.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"promotion.reserved_normals_fraction must be in (0, 1), got {fraction}")
    reserved_index: list[int] = []
    for product in untested_products(manifest):
        rows = manifest[(manifest["product"] == product) & (manifest["split"] == "train") & (manifest["label"] == 0)]
        rows = rows.sort_values("image_path", kind="stable")
        rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(product.encode()), RESERVE_SALT])
        chosen = rng.permutation(len(rows))[: reserved_count(len(rows), fraction)]
        reserved_index += rows.index[np.sort(chosen)].tolist()
    reserved = manifest.loc[reserved_index]
    return manifest.drop(index=reserved_index), reserved.reset_index(drop=True)


def task_image_paths(manifest: pd.DataFrame, products: list[str], cfg: Config) -> list[str]:
    """Image paths of a task in the order ``task_data`` expects its ``label_maps``: train rows, then held-out rows."""
    train, held = train_split(manifest, products, cfg.data.heldout_fraction, cfg.seed)
    return train["image_path"].tolist() + held["image_path"].tolist()


def _batch(rows: pd.DataFrame, image_size: int) -> ImageBatch:
    paths = rows["image_path"].tolist()
    return ImageBatch(images=load_images(paths, image_size), products=rows["product"].tolist(), paths=paths, depth=depth_of(rows, image_size))


def task_data(manifest: pd.DataFrame, name: str, products: list[str], cfg: Config, label_maps: torch.Tensor | None) -> TaskData:
    """Normal training data of one task: train images, held-out images, their label maps.

    ``label_maps`` (or None) covers the train rows followed by the held-out rows, i.e. the
    paths of ``task_image_paths(manifest, products, cfg)``; it is split accordingly.
    """
    train, held = train_split(manifest, products, cfg.data.heldout_fraction, cfg.seed)
    train_maps = held_maps = None
    if label_maps is not None:
        expected = len(train) + len(held)
        if label_maps.ndim != 3 or label_maps.shape[0] != expected:
            raise DataError(
                f"task {name!r}: label_maps has shape {tuple(label_maps.shape)}, expected ({expected}, H, W) "
                f"= {len(train)} train + {len(held)} held-out images (order of task_image_paths)"
            )
        train_maps, held_maps = label_maps[: len(train)], label_maps[len(train) :]
    log.info("task %s: %d train + %d held-out normal images of %s", name, len(train), len(held), products)
    return TaskData(
        name=name,
        products=list(products),
        train=_batch(train, cfg.data.image_size),
        heldout=_batch(held, cfg.data.image_size),
        label_maps=train_maps,
        heldout_label_maps=held_maps,
    )
