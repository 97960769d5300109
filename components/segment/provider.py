"""The mask-provider interface: an RGB image in, one integer structure label map out."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image

from components.config import MasksConfig

MAX_LABELS = 65535  # label maps are stored as uint16 PNGs at most


class MaskProvider(ABC):
    """Computes structure label maps at ``cfg.image_size`` (square), 0 = unassigned.

    Subclasses set ``name`` and implement ``_segment`` on an already resized image.
    """

    name: str = ""

    def __init__(self, cfg: MasksConfig) -> None:
        self.cfg = cfg

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    def config_section(self) -> dict[str, Any]:
        """The configuration that determines this provider's output (hashed into cache keys)."""
        return provider_config(self.name, self.cfg)

    def config_hash(self) -> str:
        """sha256 of the provider name, its config section and the label-map size."""
        return provider_config_hash(self.name, self.cfg)

    def label_map(self, image: np.ndarray, product: str) -> np.ndarray:
        """Label map (S, S) int32 of ``image`` (H, W, 3) uint8 with S = ``cfg.image_size``.

        Labels are consecutive from 1; 0 marks pixels no segment covers.
        """
        resized = resize_image(as_rgb_uint8(image), self.image_size)
        labels = self._segment(resized, product)
        return relabel_consecutive(labels)

    @abstractmethod
    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        """Integer label map (S, S) of an (S, S, 3) uint8 image; 0 = unassigned."""


def provider_config(name: str, cfg: MasksConfig) -> dict[str, Any]:
    """The config section(s) that determine provider ``name``'s label maps."""
    sections: dict[str, list[str]] = {
        "felzenszwalb": ["felzenszwalb"],
        "slic": ["slic"],
        "sam": ["sam"],
        "grounded_sam": ["grounded_sam", "sam"],
    }
    if name not in sections:
        raise ValueError(f"masks.provider: unknown provider {name!r}; one of {sorted(sections)}")
    return {key: getattr(cfg, key).model_dump(mode="json") for key in sections[name]}


def provider_config_hash(name: str, cfg: MasksConfig) -> str:
    """sha256 over provider ``name``, its config section(s) and ``cfg.image_size``.

    Computable without building the provider, so cache hits never load model weights.
    """
    payload = {"provider": name, "config": provider_config(name, cfg), "image_size": int(cfg.image_size)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Validate an image array and return it as (H, W, 3) uint8 (grey is repeated to RGB)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3), got shape {array.shape}")
    return np.ascontiguousarray(array[:, :, :3])


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Square bilinear resize of an (H, W, 3) uint8 image (no-op when already that size)."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Map the positive ids of ``labels`` onto 1..K (order kept), 0 stays 0; returns int32."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError("label maps must not contain negative ids")
    keys = np.union1d([0], np.unique(labels))  # sorted, 0 first -> 0 maps to 0, positives to 1..K
    if len(keys) - 1 > MAX_LABELS:
        raise ValueError(f"label map has {len(keys) - 1} segments; at most {MAX_LABELS} are supported")
    return np.searchsorted(keys, labels).astype(np.int32)


def paint_masks(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Paint binary masks into one label map, largest first so smaller masks stay on top.

    Mask i (in the given order) gets a provisional id; ids are made consecutive afterwards.
    Pixels covered by no mask stay 0.
    """
    labels = np.zeros(shape, dtype=np.int32)
    order = sorted(range(len(masks)), key=lambda i: int(np.count_nonzero(masks[i])), reverse=True)
    for rank, i in enumerate(order, start=1):
        mask = np.asarray(masks[i], dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask {i} has shape {mask.shape}, expected {shape}")
        labels[mask] = rank
    return relabel_consecutive(labels)
