"""The one feature cache of frozen extractors (``components/methods/feature_cache``): content keys,
kinds, the size bound, one cache per extractor and sharing it with a wrapper."""

from __future__ import annotations

import torch
from torch import nn

from components.methods.feature_cache import FeatureCache, feature_cache, image_digest, module_digest, share_feature_cache

CPU = torch.device("cpu")


class Counting:
    """``images -> images * 2 (+ offset)`` per image, counting the images it is called on."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return images.flatten(1) * 2 + self.offset


def test_features_are_keyed_by_content_and_kind_and_computed_once() -> None:
    cache, extract = FeatureCache(), Counting()
    images = torch.arange(12.0).reshape(4, 3)
    out = cache.features("a", extract, images, 3, CPU)
    assert torch.equal(out, images * 2) and extract.seen == 4 and (cache.hits, cache.misses) == (0, 4)
    again = cache.features("a", extract, images[[2, 0]].clone() + 0.0, 3, CPU)  # new tensors, same content
    assert torch.equal(again, images[[2, 0]] * 2) and extract.seen == 4 and cache.hits == 2
    other = Counting(offset=1.0)
    assert torch.equal(cache.features("b", other, images[:1], 3, CPU), images[:1] * 2 + 1), "another kind is another feature"
    changed = images[:1].clone()
    changed[0, 0] += 1
    cache.features("a", extract, changed, 3, CPU)
    assert extract.seen == 5 and len(cache) == 6, "changed content is a miss"


def test_the_bound_evicts_oldest_first_and_a_call_larger_than_the_bound_still_returns_every_feature() -> None:
    images = torch.arange(40.0).reshape(10, 4)  # 4 float32 = 16 bytes of features per image
    cache, extract = FeatureCache(max_bytes=48), Counting()
    out = cache.features("a", extract, images, 4, CPU)
    assert torch.equal(out, images * 2), "every requested feature, although only 3 fit"
    assert len(cache) == 3 and cache.bytes == 48
    cache.features("a", extract, images[7:], 4, CPU)
    assert extract.seen == 10, "the newest three stayed"
    cache.features("a", extract, images[:1], 4, CPU)
    assert extract.seen == 11 and len(cache) == 3 and cache.bytes == 48


def test_duplicate_images_in_one_call_are_stored_once() -> None:
    cache = FeatureCache()
    images = torch.ones(3, 2)
    assert torch.equal(cache.features("a", Counting(), images, 2, CPU), images * 2)
    assert len(cache) == 1 and cache.bytes == 8


def test_one_cache_per_extractor_and_a_wrapper_can_share_its_inner_extractors() -> None:
    inner, other, wrapper = nn.Identity(), nn.Identity(), nn.Identity()
    assert feature_cache(inner) is feature_cache(inner) and feature_cache(inner) is not feature_cache(other)
    share_feature_cache(wrapper, inner)
    assert feature_cache(wrapper) is feature_cache(inner)


def test_digests_follow_content() -> None:
    image = torch.rand(3, 4, 4)
    assert image_digest(image) == image_digest(image.clone()) != image_digest(image.double())
    assert image_digest(image) != image_digest(image.reshape(3, 16))  # the shape counts
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert module_digest(a) != module_digest(b) and module_digest(None) == "none"
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b)
