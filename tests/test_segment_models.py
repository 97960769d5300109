"""SAM and Grounded-SAM providers end to end with miniature random-weight models (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import MasksConfig
from components.errors import WeightsError
from components.segment.cache import MaskCache
from components.segment.grounded_sam import GroundedSAMProvider, load_grounding_dino, text_query
from components.segment.sam import SAMProvider, load_sam_checkpoint
from components.segment.tiny_models import tiny_grounding_dino, tiny_sam
from tests.segment_support import CountingProvider, object_image, write_png

# Random weights give random quality scores: thresholds at 0 keep every mask so painting is exercised.
SAM_CFG = MasksConfig(provider="sam", image_size=64, sam={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0})
GSAM_CFG = MasksConfig(provider="grounded_sam", image_size=64, grounded_sam={"box_threshold": 0.0, "text_threshold": 0.0, "prompts": {"screw": ["screw head", "thread"]}})


@pytest.fixture(scope="module")
def dino() -> tuple:
    return tiny_grounding_dino()


def test_sam_provider_label_map(tmp_path: Path) -> None:
    image, _ = object_image(size=100)
    labels = SAMProvider(SAM_CFG, model=tiny_sam()).label_map(image, "p")
    assert labels.shape == (64, 64) and labels.dtype == np.int32
    ids = np.unique(labels)
    assert ids.max() >= 1  # masks were painted
    assert ids[ids > 0].tolist() == list(range(1, int(ids.max()) + 1))


def test_sam_checkpoint_round_trip(tmp_path: Path) -> None:
    source = tiny_sam(seed=1)
    checkpoint = tmp_path / "sam_tiny.pth"
    torch.save(source.state_dict(), checkpoint)
    target = tiny_sam(seed=2)
    assert not torch.equal(source.mask_decoder.iou_token.weight, target.mask_decoder.iou_token.weight)
    loaded = load_sam_checkpoint(target, checkpoint)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    image, _ = object_image(size=64)
    assert np.array_equal(SAMProvider(SAM_CFG, model=source).label_map(image, "p"), SAMProvider(SAM_CFG, model=loaded).label_map(image, "p"))


def test_sam_checkpoint_errors_name_the_key(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save(tiny_sam(embed_dim=16).state_dict(), wrong)
    with pytest.raises(WeightsError, match=r"masks\.sam\.checkpoint: .*does not match the SAM architecture"):
        load_sam_checkpoint(tiny_sam(), wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"masks\.sam\.checkpoint: cannot read SAM checkpoint"):
        load_sam_checkpoint(tiny_sam(), garbage)


def test_text_query_and_default_prompts(dino: tuple) -> None:
    assert text_query(["Screw head", " thread. "]) == "screw head. thread."
    provider = GroundedSAMProvider(GSAM_CFG, sam_model=tiny_sam(), detector=dino[0], processor=dino[1])
    assert provider.prompts_for("screw") == ["screw head", "thread"]
    assert provider.prompts_for("metal_nut") == ["metal nut"]


def test_grounded_sam_boxes_and_label_map(dino: tuple) -> None:
    provider = GroundedSAMProvider(GSAM_CFG, sam_model=tiny_sam(), detector=dino[0], processor=dino[1])
    image, _ = object_image(size=64)
    boxes = provider.detect(image, "screw")
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and boxes.max() <= 64
    labels = provider.label_map(object_image(size=90)[0], "screw")
    assert labels.shape == (64, 64) and labels.dtype == np.int32 and labels.max() >= 1


def test_grounded_sam_no_boxes_gives_unassigned_map(dino: tuple) -> None:
    cfg = GSAM_CFG.model_copy(update={"grounded_sam": GSAM_CFG.grounded_sam.model_copy(update={"box_threshold": 1.0})})
    provider = GroundedSAMProvider(cfg, sam_model=tiny_sam(), detector=dino[0], processor=dino[1])
    labels = provider.label_map(object_image(size=64)[0], "screw")
    assert labels.shape == (64, 64) and (labels == 0).all()


def test_grounding_dino_loads_from_local_directory(dino: tuple, tmp_path: Path) -> None:
    model, processor = dino
    model.save_pretrained(tmp_path / "gdino")
    processor.save_pretrained(tmp_path / "gdino")
    loaded, loaded_processor = load_grounding_dino(str(tmp_path / "gdino"))
    inputs = loaded_processor(images=object_image(size=64)[0], text="a screw.", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).pred_boxes, model(**inputs).pred_boxes, atol=1e-5)


@pytest.mark.parametrize("kind", ["sam", "grounded_sam"])
def test_model_providers_through_cache(kind: str, dino: tuple, tmp_path: Path) -> None:
    if kind == "sam":
        cfg, inner = SAM_CFG, SAMProvider(SAM_CFG, model=tiny_sam())
    else:
        cfg, inner = GSAM_CFG, GroundedSAMProvider(GSAM_CFG, sam_model=tiny_sam(), detector=dino[0], processor=dino[1])
    provider = CountingProvider(inner)
    image_path = write_png(tmp_path / "img.png", object_image(size=80)[0])
    cache = MaskCache(tmp_path / "cache", cfg, provider=provider)
    first = cache.get(image_path, "screw")
    assert first.shape == (64, 64) and first.dtype == np.int32 and provider.calls == 1
    assert np.array_equal(cache.get(image_path, "screw"), first) and provider.calls == 1  # hit
    assert cache.directory.name.startswith(f"{kind}-")
    png = next(cache.directory.glob("*.png"))
    png.write_bytes(png.read_bytes()[:40])  # truncate: corrupt
    assert np.array_equal(cache.get(image_path, "screw"), first) and provider.calls == 2  # rebuilt
    assert cache.status(png.stem).state == "ok"
