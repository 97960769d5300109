"""Segment Anything: automatic masks painted into one label map (largest first)."""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.modeling import Sam

from components.config import MasksConfig, SAMConfig
from components.errors import ContadError, WeightsError
from components.segment.provider import MaskProvider, paint_masks

log = logging.getLogger(__name__)

FALLBACK_HINT = "or run offline without checkpoints with masks.provider=felzenszwalb"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_checkpoint(checkpoint: str | Path | None, key: str) -> Path:
    """The checkpoint path, or ``WeightsError`` naming ``key`` and the offline fallback."""
    if not checkpoint:
        raise WeightsError(f"{key} is not set (weights are never downloaded): point it to a local checkpoint, {FALLBACK_HINT}")
    path = Path(checkpoint)
    if not path.exists():
        raise WeightsError(f"{key}: checkpoint {path} does not exist (weights are never downloaded); {FALLBACK_HINT}")
    return path


def load_sam_checkpoint(model: Sam, checkpoint: str | Path, key: str = "masks.sam.checkpoint") -> Sam:
    """Load a SAM state dict from ``checkpoint`` into ``model`` (eval mode); errors name ``key``."""
    path = require_checkpoint(checkpoint, key)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise WeightsError(f"{key}: cannot read SAM checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{key}: {path} does not hold a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeightsError(f"{key}: {path} does not match the SAM architecture: {str(exc).splitlines()[0]}") from exc
    return model.eval()


def load_sam(cfg: SAMConfig) -> Sam:
    """Build the ``cfg.model_type`` SAM architecture and load ``cfg.checkpoint`` into it."""
    require_checkpoint(cfg.checkpoint, "masks.sam.checkpoint")
    if cfg.model_type not in sam_model_registry:
        raise ContadError(f"masks.sam.model_type: unknown SAM model type {cfg.model_type!r}; one of {sorted(sam_model_registry)}")
    model = sam_model_registry[cfg.model_type](checkpoint=None)
    return load_sam_checkpoint(model, cfg.checkpoint)


def check_min_region_area(cfg: SAMConfig) -> None:
    """segment-anything needs OpenCV to remove small regions; say so before running."""
    if cfg.min_mask_region_area > 0:
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise ContadError("masks.sam.min_mask_region_area > 0 needs opencv-python (not installed); set it to 0") from None


class SAMProvider(MaskProvider):
    """SAM automatic mask generator over a point grid; label map painted largest mask first."""

    name = "sam"

    def __init__(self, cfg: MasksConfig, model: Sam | None = None) -> None:
        super().__init__(cfg)
        check_min_region_area(cfg.sam)
        self.model = (model if model is not None else load_sam(cfg.sam)).eval()
        self.model.to(resolve_device(cfg.device))
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=cfg.sam.points_per_side,
            pred_iou_thresh=cfg.sam.pred_iou_thresh,
            stability_score_thresh=cfg.sam.stability_score_thresh,
            min_mask_region_area=cfg.sam.min_mask_region_area,
        )

    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        records = self.generator.generate(image)
        log.debug("sam: %d masks for a %s image", len(records), product)
        return paint_masks([r["segmentation"] for r in records], image.shape[:2])
