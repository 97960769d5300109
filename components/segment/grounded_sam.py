"""Grounding DINO boxes from per-product text prompts, each box segmented by SAM."""

from __future__ import annotations

import logging
import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

from components.config import MasksConfig
from components.errors import WeightsError
from components.segment.provider import MaskProvider, paint_masks
from components.segment.sam import load_sam, require_checkpoint, resolve_device

log = logging.getLogger(__name__)

DINO_KEY = "masks.grounded_sam.dino_checkpoint"


def load_grounding_dino(checkpoint: str | None) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """Grounding DINO model and processor from a local transformers directory (never downloads)."""
    path = require_checkpoint(checkpoint, DINO_KEY)
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(path, local_files_only=True)
        processor = GroundingDinoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{DINO_KEY}: cannot load Grounding DINO from {path}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), processor


def text_query(prompts: list[str]) -> str:
    """Grounding DINO text: lower-case phrases, each terminated by a dot."""
    return " ".join(f"{p.strip().lower().rstrip('.')}." for p in prompts if p.strip())


class GroundedSAMProvider(MaskProvider):
    """Boxes detected from ``masks.grounded_sam.prompts[product]`` prompt SAM; masks painted largest first."""

    name = "grounded_sam"

    def __init__(
        self,
        cfg: MasksConfig,
        sam_model: Sam | None = None,
        detector: GroundingDinoForObjectDetection | None = None,
        processor: GroundingDinoProcessor | None = None,
    ) -> None:
        super().__init__(cfg)
        if (detector is None) != (processor is None):
            raise ValueError("pass both the Grounding DINO detector and its processor, or neither")
        if detector is None:
            detector, processor = load_grounding_dino(cfg.grounded_sam.dino_checkpoint)
        self.device = resolve_device(cfg.device)
        self.detector = detector.eval().to(self.device)
        self.processor = processor
        sam = sam_model if sam_model is not None else load_sam(cfg.sam)
        self.predictor = SamPredictor(sam.eval().to(self.device))

    def prompts_for(self, product: str) -> list[str]:
        """Text prompts of ``product``; default: the product name with underscores as spaces."""
        return list(self.cfg.grounded_sam.prompts.get(product) or [product.replace("_", " ")])

    @torch.no_grad()
    def detect(self, image: np.ndarray, product: str) -> torch.Tensor:
        """Boxes (K, 4) xyxy in pixels of ``image`` whose score passes ``box_threshold``."""
        knobs = self.cfg.grounded_sam
        inputs = self.processor(images=image, text=text_query(self.prompts_for(product)), return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        height, width = image.shape[:2]
        result = self.processor.post_process_grounded_object_detection(
            outputs,
            inputs["input_ids"],
            threshold=knobs.box_threshold,
            text_threshold=knobs.text_threshold,
            target_sizes=[(height, width)],
        )[0]
        boxes = result["boxes"].float().cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        return boxes[keep]

    @torch.no_grad()
    def segment_boxes(self, image: np.ndarray, boxes: torch.Tensor) -> list[np.ndarray]:
        """One SAM mask (H, W) bool per box."""
        if len(boxes) == 0:
            return []
        self.predictor.set_image(image)
        prompts = self.predictor.transform.apply_boxes_torch(boxes.to(self.device), image.shape[:2])
        masks, _, _ = self.predictor.predict_torch(point_coords=None, point_labels=None, boxes=prompts, multimask_output=False)
        return [m for m in masks[:, 0].cpu().numpy().astype(bool)]

    def _segment(self, image: np.ndarray, product: str) -> np.ndarray:
        boxes = self.detect(image, product)
        log.debug("grounded_sam: %d boxes for %s", len(boxes), product)
        return paint_masks(self.segment_boxes(image, boxes), image.shape[:2])
