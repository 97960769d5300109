"""Typed containers passed between data, methods and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageBatch:
    """Images of one or more products at model input size.

    images: (B, 3, H, W) float32, ImageNet-normalised.
    labels: (B,) int64, 0 = good, 1 = defective (None for training data).
    masks: (B, H, W) uint8 in {0, 1} ground-truth defect masks (None for training data).
    depth: (B, 3, H, W) float32 organised point clouds (x, y, z; invalid points all 0) aligned with
        ``images`` (nearest-resized), or None when the data has no 3-D modality.
    """

    images: torch.Tensor
    products: list[str]
    paths: list[str]
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    depth: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class TaskData:
    """Everything a continual method may see when it learns one task (normal images only).

    name: the task name (a product name; "a+b" when a protocol trains several products together).
    products: the products this task covers.
    train: normal training images (the held-out slice is NOT included here).
    label_maps: (N, H, W) int64 structure label maps aligned with ``train.images`` (0 = unassigned),
        from the offline mask cache; None when the method does not need them.
    heldout: normal images held out of ``train`` for early stopping and score thresholds.
    heldout_label_maps: label maps aligned with ``heldout.images`` (None when not needed).
    """

    name: str
    products: list[str]
    train: ImageBatch
    heldout: ImageBatch
    label_maps: torch.Tensor | None = None
    heldout_label_maps: torch.Tensor | None = None


@dataclass
class Prediction:
    """Output of a detector for a batch of images.

    image_scores: (B,) float32, higher = more anomalous.
    anomaly_maps: (B, H, W) float32 at model input resolution.
    routed_tasks: task name each image was routed to (the task used to score it).
    """

    image_scores: torch.Tensor
    anomaly_maps: torch.Tensor
    routed_tasks: list[str] = field(default_factory=list)
