"""Classical providers, label-map painting, config hashing and the provider registry."""

from __future__ import annotations

import numpy as np
import pytest

from components.config import MasksConfig, load_config
from components.errors import WeightsError
from components.segment.classical import FelzenszwalbProvider, SLICProvider
from components.segment.provider import paint_masks, provider_config_hash, relabel_consecutive
from components.segment.registry import make_provider
from tests.segment_support import object_image


def best_segment_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the single segment that best matches ``mask``."""
    best = 0.0
    for label in np.unique(labels):
        segment = labels == label
        union = np.logical_or(segment, mask).sum()
        best = max(best, float(np.logical_and(segment, mask).sum() / union))
    return best


def test_relabel_consecutive_keeps_zero_and_order() -> None:
    labels = np.array([[0, 7, 7], [3, 0, 42]])
    out = relabel_consecutive(labels)
    assert out.dtype == np.int32
    assert out.tolist() == [[0, 2, 2], [1, 0, 3]]


def test_relabel_rejects_negative_ids() -> None:
    with pytest.raises(ValueError, match="negative"):
        relabel_consecutive(np.array([[-1, 2]]))


def test_paint_masks_largest_first_small_on_top() -> None:
    big = np.zeros((6, 6), bool)
    big[:4, :4] = True
    small = np.zeros((6, 6), bool)
    small[1:3, 1:3] = True
    labels = paint_masks([small, big], (6, 6))  # order given must not matter
    assert labels[1, 1] != labels[0, 0]  # the small mask stays visible on top of the big one
    assert labels[0, 0] > 0 and labels[1, 1] > 0
    assert (labels[4:, :] == 0).all() and (labels[:, 4:] == 0).all()  # uncovered = 0
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    assert (labels == labels[1, 1]).sum() == 4


@pytest.mark.parametrize("provider_cls", [FelzenszwalbProvider, SLICProvider])
def test_classical_label_map_shape_dtype_deterministic(provider_cls: type) -> None:
    cfg = MasksConfig(provider=provider_cls.name, image_size=96)
    image, _ = object_image(size=130)
    provider = provider_cls(cfg)
    first = provider.label_map(image[:, :120], "p")  # non-square input
    second = provider_cls(cfg).label_map(image[:, :120], "p")
    assert first.shape == (96, 96) and first.dtype == np.int32
    assert np.array_equal(first, second)
    ids = np.unique(first)
    assert ids.min() >= 1 and ids.tolist() == list(range(1, len(ids) + 1))  # every pixel assigned, consecutive
    assert len(ids) >= 2


def test_classical_accepts_grey_and_rejects_float() -> None:
    provider = FelzenszwalbProvider(MasksConfig(image_size=64))
    image, _ = object_image(size=64)
    assert provider.label_map(image[:, :, 0], "p").shape == (64, 64)
    with pytest.raises(ValueError, match="uint8"):
        provider.label_map(image.astype(np.float32), "p")


@pytest.mark.parametrize("provider", ["felzenszwalb", "slic"])
def test_classical_separates_object_from_background(provider: str) -> None:
    cfg = MasksConfig(provider=provider, image_size=128)
    for seed in range(3):
        image, mask = object_image(size=128, seed=seed)
        labels = make_provider(cfg).label_map(image, "p")
        if provider == "felzenszwalb":
            assert best_segment_iou(labels, mask) >= 0.8
        else:  # superpixels over-segment: the segments mostly inside the object must cover it
            inside = [lab for lab in np.unique(labels) if mask[labels == lab].mean() > 0.5]
            union = np.isin(labels, inside)
            assert np.logical_and(union, mask).sum() / np.logical_or(union, mask).sum() >= 0.8


def test_config_hash_tracks_only_the_providers_own_section() -> None:
    base = MasksConfig()
    h = provider_config_hash("felzenszwalb", base)
    assert FelzenszwalbProvider(base).config_hash() == h
    assert provider_config_hash("felzenszwalb", base.model_copy(update={"slic": base.slic.model_copy(update={"n_segments": 99})})) == h
    assert provider_config_hash("felzenszwalb", base.model_copy(update={"workers": 7})) == h
    assert provider_config_hash("felzenszwalb", base.model_copy(update={"image_size": 112})) != h
    assert provider_config_hash("felzenszwalb", MasksConfig(felzenszwalb={"scale": 5.0})) != h
    assert provider_config_hash("slic", base) != h
    assert provider_config_hash("grounded_sam", base) != provider_config_hash("grounded_sam", MasksConfig(sam={"points_per_side": 8}))


def test_make_provider_classical_from_params_yaml() -> None:
    cfg = load_config("params.yaml").masks
    assert make_provider(cfg).name == cfg.provider
    assert make_provider(cfg.model_copy(update={"provider": "slic"})).name == "slic"


def test_missing_sam_checkpoint_names_key_and_fallback(tmp_path) -> None:
    with pytest.raises(WeightsError, match=r"masks\.sam\.checkpoint.*masks\.provider=felzenszwalb"):
        make_provider(MasksConfig(provider="sam"))
    with pytest.raises(WeightsError, match=r"masks\.sam\.checkpoint: checkpoint .*missing\.pth does not exist"):
        make_provider(MasksConfig(provider="sam", sam={"checkpoint": str(tmp_path / "missing.pth")}))


def test_missing_grounding_dino_checkpoint_names_key_and_fallback(tmp_path) -> None:
    with pytest.raises(WeightsError, match=r"masks\.grounded_sam\.dino_checkpoint.*masks\.provider=felzenszwalb"):
        make_provider(MasksConfig(provider="grounded_sam"))
    empty = tmp_path / "gdino"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"masks\.grounded_sam\.dino_checkpoint: cannot load Grounding DINO"):
        make_provider(MasksConfig(provider="grounded_sam", grounded_sam={"dino_checkpoint": str(empty)}))
