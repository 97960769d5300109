"""Batched, gradient-free feature extraction through a backbone, results on the CPU, and the
per-backbone cache of test-image features reused across continual steps."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from components.progress import progress_bar


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def batched(
    extract: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    desc: str | None = None,
) -> torch.Tensor:
    """``extract`` applied to ``images`` in batches of ``batch_size`` on ``device``; concatenated on CPU."""
    outputs = []
    starts = range(0, images.shape[0], max(1, batch_size))
    for start in progress_bar(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
        outputs.append(extract(images[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


# Largest total size of the cached test features of one backbone (bytes); oldest entries go first.
FEATURE_CACHE_BYTES = 1 << 30


def image_digest(image: torch.Tensor) -> str:
    """Content digest of one image tensor (shape, dtype and values)."""
    data = image.detach().cpu().contiguous()
    header = f"{tuple(data.shape)}{data.dtype}".encode()
    return hashlib.blake2b(header + data.numpy().tobytes(), digest_size=16).hexdigest()


def module_digest(module: nn.Module | None) -> str:
    """Digest of a module's state (e.g. a task prompt); "none" for ``None``."""
    if module is None:
        return "none"
    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Backbone features of single images by (what was extracted, image digest), evicted oldest first.

    The backbone is frozen, so the features of a test image under a given extractor (un-prompted
    keys, un-prompted features, or features under one task's prompt) never change: evaluation after
    every continual step reuses them instead of re-encoding every learned product's test images.
    """

    def __init__(self, max_bytes: int = FEATURE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def features(self, kind: str, extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        """``extract`` of every image of ``images`` (batched), computed only for images not cached under ``kind``."""
        keys = [(kind, image_digest(image)) for image in images]
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = batched(extract, images[missing], batch_size, device)
            for i, feats in zip(missing, fresh, strict=True):
                self._put(keys[i], feats.clone())
        return torch.stack([self._store[key] for key in keys])

    def _put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        self._store[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def feature_cache(backbone: nn.Module) -> FeatureCache:
    """The feature cache attached to ``backbone`` (one per backbone object, so per run and configuration)."""
    cache = backbone.__dict__.get("_contad_feature_cache")
    if cache is None:
        cache = FeatureCache()
        backbone.__dict__["_contad_feature_cache"] = cache
    return cache
