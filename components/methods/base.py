"""The interface shared by UCAD and the PatchCore baselines."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from components.backbones.base import PromptedBackbone
from components.config import Config
from components.types import Prediction, TaskData


class ContinualMethod(ABC):
    """A detector that learns products one task at a time and scores any seen product.

    Contract:
    - ``fit_task`` sees only ``TaskData`` (normal training images, held-out normals, label maps).
    - ``predict`` takes images with NO product label; it routes each image itself. Only the
      per-task oracle baseline may use ``true_tasks`` (and says so in ``uses_task_labels``).
    - ``save``/``load`` round-trip the whole state (safetensors + JSON, written atomically);
      scores are identical after a round trip.
    """

    name: ClassVar[str]
    uses_task_labels: ClassVar[bool] = False
    uses_depth: ClassVar[bool] = False  # True: ``predict`` also takes ``depth=`` (B, 3, H, W) xyz, ``fit_task`` reads ``ImageBatch.depth``

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        self.config = config
        self.backbone = backbone
        self.tasks: list[str] = []

    @abstractmethod
    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """Learn one new task; returns a training log (losses per epoch, sizes, seconds)."""

    @abstractmethod
    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None) -> Prediction:
        """Score (B, 3, H, W) images; anomaly maps at input resolution."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """All learned tensors (keys, prompts, knowledge...) by name."""

    @abstractmethod
    def state_meta(self) -> dict[str, Any]:
        """JSON-able metadata (task names, config, sizes) needed to rebuild the state."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore the state produced by ``state_tensors``/``state_meta``."""

    def save(self, directory: str | Path) -> Path:
        """Atomically write ``model.safetensors`` + ``model.json`` into ``directory``."""
        from components.methods.state_io import save_method_state

        return save_method_state(self, directory)

    def load(self, directory: str | Path) -> None:
        """Load a state written by ``save``; raises with the file path on a bad/missing file."""
        from components.methods.state_io import load_method_state

        load_method_state(self, directory)
