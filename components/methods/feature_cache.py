"""Features of a frozen extractor, computed once per image content and reused (bounded, oldest out first).

Every method on a frozen network (the prompted backbone of UCAD / MTRMB / PatchCore, the multi-stage
CNN of IUF / IB-IUMAD) gets the same features for the same image from the same extractor, so a
feature is stored under (what was extracted, digest of the image's content): evaluation after every
continual step reuses test features, and the epochs of a reconstruction method reuse its training
features. One ``FeatureCache`` per extractor object (``feature_cache``), so per run and configuration;
``kind`` separates what is extracted from one object (keys, un-prompted features, features under one
prompt: ``module_digest``). Content keys, not paths: a path says nothing about what was loaded from it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from components.methods.extract import batched

# Largest total size of the cached features of one extractor (bytes); oldest entries go first.
FEATURE_CACHE_BYTES = 1 << 30


def image_digest(image: torch.Tensor) -> str:
    """Content digest of one image tensor (shape, dtype and values)."""
    data = image.detach().cpu().contiguous()
    header = f"{tuple(data.shape)}{data.dtype}".encode()
    return hashlib.blake2b(header + data.numpy().tobytes(), digest_size=16).hexdigest()


def module_digest(module: nn.Module | None) -> str:
    """Digest of a module's state (e.g. a task prompt), to name a ``kind``; "none" for ``None``."""
    if module is None:
        return "none"
    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Features of single images by (kind, image digest), at most ``max_bytes`` in all, evicted oldest first."""

    def __init__(self, max_bytes: int = FEATURE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def features(self, kind: str, extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int,
                 device: torch.device, desc: str | None = None) -> torch.Tensor:
        """``extract`` of every image of ``images`` stacked (on the CPU); only the images not cached under
        ``kind`` are extracted, in batches of ``batch_size`` on ``device`` (``desc``: progress bar)."""
        keys = [(kind, image_digest(image)) for image in images]
        found = {i: self._store[key] for i, key in enumerate(keys) if key in self._store}
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            fresh = batched(extract, images[missing], batch_size, device, desc=desc)
            for i, feats in zip(missing, fresh, strict=True):
                found[i] = feats.clone()
                self._put(keys[i], found[i])
        return torch.stack([found[i] for i in range(len(keys))])

    def _put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        if key in self._store:  # the same image twice in one call
            return
        self._store[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self._store) > 1:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


_ATTRIBUTE = "_contad_feature_cache"


def feature_cache(extractor: object) -> FeatureCache:
    """The feature cache attached to ``extractor`` (created on first use; one per extractor object)."""
    cache = extractor.__dict__.get(_ATTRIBUTE)
    if cache is None:
        cache = FeatureCache()
        extractor.__dict__[_ATTRIBUTE] = cache
    return cache


def share_feature_cache(wrapper: object, inner: object) -> None:
    """Make ``wrapper`` (an extractor built around ``inner``) use ``inner``'s feature cache."""
    wrapper.__dict__[_ATTRIBUTE] = feature_cache(inner)
