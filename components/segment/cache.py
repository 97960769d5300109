"""Content-addressed cache of structure label maps, filled offline and reused by every run.

Layout: ``CACHE_DIR/<provider>-<config hash[:16]>/`` holds, per image, ``<image sha256>.png``
(the label map, uint8 or uint16 when it has more than 255 labels) and ``<image sha256>.json``
(its index entry: provider, config, image hash, label count, png sha256), plus ``index.json``
(all entries of that configuration). Every file is written atomically, the PNG before its
entry, so an interrupted build keeps all finished work and a half-written entry reads as
missing or corrupt and is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from components.atomic import atomic_write_bytes, atomic_write_json, is_stale_temporary
from components.config import Config, MasksConfig
from components.errors import DataError
from components.progress import progress_bar
from components.segment.provider import MaskProvider, as_rgb_uint8, provider_config, provider_config_hash
from components.segment.registry import make_provider

if TYPE_CHECKING:  # torch is imported lazily: process-pool workers of classical providers never need it
    import torch

log = logging.getLogger(__name__)

CPU_PROVIDERS = frozenset({"felzenszwalb", "slic"})
INDEX_FLUSH_EVERY = 50  # entries between index.json rewrites during a build


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_label_png(label_map: np.ndarray) -> bytes:
    """PNG bytes of a non-negative label map: 8-bit when ids fit, else 16-bit."""
    labels = np.asarray(label_map)
    top = int(labels.max(initial=0))
    if labels.min(initial=0) < 0 or top > 65535:
        raise ValueError(f"label ids must be in [0, 65535], got [{labels.min()}, {top}]")
    array = labels.astype(np.uint8 if top <= 255 else np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_label_png(data: bytes) -> np.ndarray:
    """Label map (H, W) int32 from PNG bytes written by ``encode_label_png``."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img).astype(np.int32)


def read_rgb(image_bytes: bytes, source: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB image from encoded bytes; ``DataError`` naming ``source`` when undecodable."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            return as_rgb_uint8(np.asarray(img.convert("RGB")))
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad input file
        raise DataError(f"{source}: cannot decode image for structure masks: {exc}") from exc


def read_image_bytes(image_path: str | Path) -> bytes:
    path = Path(image_path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image for structure masks: {exc}") from exc


@dataclass(frozen=True)
class EntryStatus:
    """State of one cache entry: ``ok``, ``missing`` or ``corrupt`` (with the reason)."""

    state: str
    reason: str = ""
    label_map: np.ndarray | None = None


class MaskCache:
    """Label maps of one provider configuration, keyed by image content.

    The provider is built on the first miss only, so a fully cached run never loads weights.
    ``provider`` may be injected (tests, pre-built models).
    """

    def __init__(self, cache_dir: str | Path, cfg: MasksConfig, provider: MaskProvider | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.cfg = cfg
        self.provider_name = provider.name if provider is not None else cfg.provider
        self.config_hash = provider.config_hash() if provider is not None else provider_config_hash(cfg.provider, cfg)
        self._provider = provider
        self.has_injected_provider = provider is not None
        self.directory = self.cache_dir / f"{self.provider_name}-{self.config_hash[:16]}"

    @property
    def provider(self) -> MaskProvider:
        if self._provider is None:
            self._provider = make_provider(self.cfg)
        return self._provider

    def png_path(self, image_sha256: str) -> Path:
        return self.directory / f"{image_sha256}.png"

    def entry_path(self, image_sha256: str) -> Path:
        return self.directory / f"{image_sha256}.json"

    def status(self, image_sha256: str) -> EntryStatus:
        """Check the entry of an image hash end to end (index fields, PNG hash, decoded shape)."""
        entry_path, png_path = self.entry_path(image_sha256), self.png_path(image_sha256)
        if not entry_path.exists() and not png_path.exists():
            return EntryStatus("missing")
        try:
            entry = json.loads(entry_path.read_text())
            png = png_path.read_bytes()
        except (OSError, ValueError) as exc:
            return EntryStatus("corrupt", f"unreadable: {exc}")
        expected = {"provider": self.provider_name, "config_hash": self.config_hash, "image_sha256": image_sha256}
        for key, value in expected.items():
            if entry.get(key) != value:
                return EntryStatus("corrupt", f"{key} is {entry.get(key)!r}, expected {value!r}")
        if sha256_hex(png) != entry.get("png_sha256"):
            return EntryStatus("corrupt", "PNG does not match its recorded sha256")
        try:
            label_map = decode_label_png(png)
        except Exception as exc:  # noqa: BLE001 - any decoder failure means corrupt
            return EntryStatus("corrupt", f"PNG does not decode: {exc}")
        size = int(self.cfg.image_size)
        if label_map.shape != (size, size) or int(label_map.max(initial=0)) != entry.get("labels"):
            return EntryStatus("corrupt", f"label map shape {label_map.shape} / labels disagree with the entry")
        return EntryStatus("ok", label_map=label_map)

    def lookup(self, image_sha256: str, source: str | Path = "") -> np.ndarray | None:
        """The cached label map, or None when missing or corrupt (corruption is logged)."""
        status = self.status(image_sha256)
        if status.state == "corrupt":
            log.warning("mask cache entry %s (%s) is corrupt: %s; rebuilding", self.entry_path(image_sha256), source, status.reason)
        return status.label_map

    def compute(self, image_bytes: bytes, image_sha256: str, product: str, source: str | Path = "") -> np.ndarray:
        """Run the provider on an image and write its entry (PNG, then the JSON entry)."""
        label_map = self.provider.label_map(read_rgb(image_bytes, source), product)
        png = encode_label_png(label_map)
        atomic_write_bytes(self.png_path(image_sha256), png)
        entry = {
            "provider": self.provider_name,
            "config_hash": self.config_hash,
            "config": provider_config(self.provider_name, self.cfg),
            "image_size": int(self.cfg.image_size),
            "image_sha256": image_sha256,
            "image_path": str(source),
            "product": product,
            "labels": int(label_map.max(initial=0)),
            "png_sha256": sha256_hex(png),
        }
        atomic_write_json(self.entry_path(image_sha256), entry)
        return label_map

    def get(self, image_path: str | Path, product: str) -> np.ndarray:
        """Label map (S, S) int32 of an image file; computed on a miss, rebuilt when corrupt."""
        image_bytes = read_image_bytes(image_path)
        image_sha256 = sha256_hex(image_bytes)
        cached = self.lookup(image_sha256, image_path)
        if cached is not None:
            return cached
        return self.compute(image_bytes, image_sha256, product, image_path)

    def entries(self) -> Iterator[dict[str, Any]]:
        """Valid-looking JSON entries on disk (unparseable ones are skipped)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            if path.name == "index.json":
                continue
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):
                continue

    def write_index(self) -> Path:
        """Rewrite ``index.json`` (atomically) from the per-image entries."""
        index = {
            "provider": self.provider_name,
            "config_hash": self.config_hash,
            "config": provider_config(self.provider_name, self.cfg),
            "image_size": int(self.cfg.image_size),
            "entries": {
                e["image_sha256"]: {k: e[k] for k in ("product", "image_path", "labels", "png_sha256") if k in e}
                for e in self.entries()
                if "image_sha256" in e
            },
        }
        return atomic_write_json(self.directory / "index.json", index)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a killed writer; returns how many.

        Only files whose writer process is gone (``components.atomic.is_stale_temporary``): a
        concurrent builder's in-flight temporaries are left alone.
        """
        if not self.directory.is_dir():
            return 0
        stale = [path for path in self.directory.glob(".*.tmp") if is_stale_temporary(path)]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def label_maps_for(paths: Sequence[str], products: Sequence[str], cfg: MasksConfig, cache_dir: str | Path, image_size: int) -> torch.Tensor:
    """Label maps (N, image_size, image_size) int64 of image files, through the cache (nearest-resized)."""
    import torch

    from components.segment.grid import nearest_resize_label_map

    if len(paths) != len(products):
        raise ValueError(f"{len(paths)} paths but {len(products)} products")
    if not paths:
        return torch.zeros((0, image_size, image_size), dtype=torch.int64)
    cache = MaskCache(cache_dir, cfg)
    maps = torch.from_numpy(np.stack([cache.get(p, prod) for p, prod in zip(paths, products)])).long()
    if maps.shape[-2:] != (image_size, image_size):
        maps = nearest_resize_label_map(maps, (image_size, image_size))
    return maps


@dataclass
class BuildSummary:
    """What a cache build did."""

    total: int = 0
    cached: int = 0
    built: int = 0
    rebuilt: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "cached": self.cached, "built": self.built, "rebuilt": self.rebuilt}


@dataclass(frozen=True)
class PendingImage:
    image_path: str
    product: str
    image_sha256: str


def plan_build(cache: MaskCache, items: Sequence[tuple[str, str]], summary: BuildSummary) -> list[PendingImage]:
    """Images whose entry is missing or corrupt (each image hashed, each entry verified)."""
    pending: list[PendingImage] = []
    seen: set[str] = set()
    for image_path, product in progress_bar(items, desc="checking mask cache", unit="img", leave=False):
        image_sha256 = sha256_hex(read_image_bytes(image_path))
        if image_sha256 in seen:
            summary.cached += 1  # identical bytes: one entry serves both
            continue
        seen.add(image_sha256)
        status = cache.status(image_sha256)
        if status.state == "ok":
            summary.cached += 1
            continue
        if status.state == "corrupt":
            log.warning("mask cache entry for %s is corrupt (%s); rebuilding", image_path, status.reason)
            summary.rebuilt += 1
        else:
            summary.built += 1
        pending.append(PendingImage(image_path, product, image_sha256))
    return pending


_WORKER_CACHE: MaskCache | None = None


def _init_worker(cache_dir: str, cfg: MasksConfig) -> None:
    global _WORKER_CACHE
    _WORKER_CACHE = MaskCache(cache_dir, cfg)


def _build_in_worker(item: PendingImage) -> str:
    assert _WORKER_CACHE is not None, "worker not initialised"
    _build_one(_WORKER_CACHE, item)
    return item.image_sha256


def _build_one(cache: MaskCache, item: PendingImage) -> None:
    image_bytes = read_image_bytes(item.image_path)
    image_sha256 = sha256_hex(image_bytes)
    if image_sha256 != item.image_sha256:
        log.warning("%s changed while building the mask cache; caching its current content", item.image_path)
    cache.compute(image_bytes, image_sha256, item.product, item.image_path)


def _build_serial(cache: MaskCache, pending: list[PendingImage], progress: tqdm) -> None:
    for done, item in enumerate(pending, start=1):
        _build_one(cache, item)
        progress.update(1)
        if done % INDEX_FLUSH_EVERY == 0:
            cache.write_index()


def _build_parallel(cache: MaskCache, pending: list[PendingImage], workers: int, progress: tqdm) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(str(cache.cache_dir), cache.cfg)) as pool:
        futures: set[Future[str]] = {pool.submit(_build_in_worker, item) for item in pending}
        done_count = 0
        try:
            while futures:
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    future.result()
                    done_count += 1
                    progress.update(1)
                    if done_count % INDEX_FLUSH_EVERY == 0:
                        cache.write_index()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def build_cache(cache: MaskCache, items: Sequence[tuple[str, str]], workers: int = 1) -> BuildSummary:
    """Fill ``cache`` for (image_path, product) items: skip valid entries, rebuild corrupt ones.

    Classical providers run in a process pool of ``workers``; model providers run in-process.
    Every entry is written as it completes, so an interrupted build resumes where it stopped.
    """
    summary = BuildSummary(total=len(items))
    cache.directory.mkdir(parents=True, exist_ok=True)
    removed = cache.remove_stale_temporaries()
    if removed:
        log.info("removed %d temporary files left by an interrupted build", removed)
    pending = plan_build(cache, items, summary)
    log.info("mask cache %s: %d images, %d cached, %d to build, %d corrupt to rebuild",
             cache.directory, summary.total, summary.cached, summary.built, summary.rebuilt)
    parallel = workers > 1 and len(pending) > 1 and cache.provider_name in CPU_PROVIDERS and not cache.has_injected_provider
    try:
        with progress_bar(total=len(pending), desc=f"masks ({cache.provider_name})", unit="img") as progress:
            if parallel:
                _build_parallel(cache, pending, min(workers, len(pending)), progress)
            else:
                _build_serial(cache, pending, progress)
    finally:
        cache.write_index()
    return summary


def build_command(cfg: Config | MasksConfig, data_dir: Path, cache_dir: Path) -> int:
    """``contad masks build DATA_DIR --out CACHE_DIR``: label maps of every training image."""
    from components.data.manifest import read_dataset

    masks_cfg = cfg.masks if isinstance(cfg, Config) else cfg
    products = list(cfg.data.products) if isinstance(cfg, Config) and cfg.data.products else None
    manifest = read_dataset(Path(data_dir), products=products)
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        raise DataError(f"{data_dir}: no training images to build structure masks for")
    items = list(zip(train["image_path"].astype(str), train["product"].astype(str)))
    cache = MaskCache(cache_dir, masks_cfg)
    try:
        summary = build_cache(cache, items, workers=masks_cfg.workers)
    except KeyboardInterrupt:
        log.warning("interrupted: finished entries are kept in %s; rerun the same command to resume", cache.directory)
        return 130
    log.info("mask cache %s: %s", cache.directory, summary.as_dict())
    print(f"mask cache {cache.directory}: {summary.total} images, {summary.cached} cached, "
          f"{summary.built} built, {summary.rebuilt} rebuilt")
    return 0
