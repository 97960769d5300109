"""Classical label maps separate the object from the background on synthetic object products.

Ground truth: the generator's exact object masks. Two honest criteria, no oracle merging:
- felzenszwalb (few, large segments): per image, the best single segment matches the object, or the
  complement of the segments touching the image border (the background) matches the object
  silhouette (holes filled: background seen through a washer's hole is a separate connected
  region no connected-component segmenter can join to the outer background).
- slic (~32 compact superpixels): boundary adherence, i.e. the union of superpixels lying mostly
  inside the object matches it, on average over the object images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_fill_holes

from components.config import MasksConfig, SynthConfig
from components.data import synth
from components.segment.registry import make_provider


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def best_segment_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    return max(iou(labels == label, mask) for label in np.unique(labels))


def silhouette_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return iou(~np.isin(labels, border), binary_fill_holes(mask))


def mostly_inside_union_iou(labels: np.ndarray, mask: np.ndarray) -> float:
    inside = [label for label in np.unique(labels) if mask[labels == label].mean() > 0.5]
    return iou(np.isin(labels, inside), mask)


@pytest.fixture(scope="module")
def object_images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(product, image, object mask at 224) for the train images of every synthetic object product."""
    root = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(train_per_product=3, test_good_per_product=1, test_defect_per_type=1)
    synth.generate_products(root, 5, 0, cfg)
    out = []
    for image_path in sorted(root.glob("*/train/good/*.png")):
        mask_path = synth.object_mask_path(root, image_path)
        if mask_path is None:
            continue
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(mask_path).convert("L").resize((224, 224), Image.Resampling.NEAREST)) > 127
        out.append((Path(image_path).parts[-4], image, mask))
    assert len({product for product, _, _ in out}) >= 2, "expected several synthetic object products"
    return out


def test_felzenszwalb_separates_objects(object_images: list) -> None:
    provider = make_provider(MasksConfig(provider="felzenszwalb"))  # the shipped defaults
    for product, image, mask in object_images:
        labels = provider.label_map(image, product)
        score = max(best_segment_iou(labels, mask), silhouette_iou(labels, mask))
        assert score >= 0.8, f"{product}: object/background IoU {score:.3f}"
        assert labels.max() <= 32, f"{product}: {labels.max()} segments is not a structural partition"


def test_slic_superpixels_adhere_to_object_boundaries(object_images: list) -> None:
    provider = make_provider(MasksConfig(provider="slic"))
    scores = [mostly_inside_union_iou(provider.label_map(image, product), mask) for product, image, mask in object_images]
    assert float(np.mean(scores)) >= 0.8, scores
