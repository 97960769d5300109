"""The contract every continual method implements (``ContinualMethod``), with its declared capabilities.

A method is one module: a ``ContinualMethod`` subclass registered in ``components.methods.registry``.
What it can do is declared as class attributes, read by the pipeline, tiling, streaming and serving
(never a list of method names elsewhere):

- ``uses_task_labels``: ``predict`` needs the true task of every image (the per-task oracle only);
  such a method cannot make label-free decisions and is never deployed.
- ``uses_depth``: ``predict`` needs ``depth=`` (B, 3, H, W) xyz and ``fit_task`` reads ``ImageBatch.depth``.
- ``tiles_inputs``: a method on the shared frozen backbone; ``data.tile: auto`` may tile
  high-resolution products for it (``components.data.tiling``).
- ``learns_online``: implements the streaming protocol (``score_one`` / ``learn_one``), used by ``contad stream``.
- ``frozen_task_memory``: a learned task's scoring state never changes afterwards, so calibration
  scores of a task (``calibration_scores``) stay valid at every later step.
- ``needs_structure_masks(cfg)``: whether training needs structure label maps under ``cfg``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from components.backbones.base import PromptedBackbone
from components.config import Config
from components.errors import ContadError
from components.types import Prediction, TaskData


@dataclass(frozen=True)
class StreamScore:
    """One streamed image scored by the current model: its score (``predict``'s scale), the task routing
    sends it to (None while no task has a key) and the method's own handle for ``learn_one``."""

    score: float
    routed: str | None
    handle: Any = field(default=None, repr=False)


class ContinualMethod(ABC):
    """A detector that learns products one task at a time and scores any seen product.

    Contract:
    - ``fit_task`` sees only ``TaskData`` (normal training images, held-out normals, label maps).
    - ``predict(images, true_tasks=None, depth=None)`` takes images with NO product label; it routes
      each image itself. Only a method declaring ``uses_task_labels`` may read ``true_tasks``; a
      method declaring ``uses_depth`` reads ``depth``, every other method ignores it.
    - ``save``/``load`` round-trip the whole state (safetensors + JSON, written atomically);
      scores are identical after a round trip.
    """

    name: ClassVar[str]
    uses_task_labels: ClassVar[bool] = False
    uses_depth: ClassVar[bool] = False
    tiles_inputs: ClassVar[bool] = False
    learns_online: ClassVar[bool] = False
    frozen_task_memory: ClassVar[bool] = False
    _fit_scores: tuple[str, torch.Tensor] | None = None  # (task, raw calibration scores) of the last fit_task; not saved

    def __init__(self, config: Config, backbone: PromptedBackbone) -> None:
        self.config = config
        self.backbone = backbone
        self.tasks: list[str] = []

    @classmethod
    def needs_structure_masks(cls, config: Config) -> bool:
        """Whether training under ``config`` needs structure label maps from the mask cache."""
        return False

    # ------------------------------------------------------------------ shared guards
    def _check_new(self, data: TaskData) -> None:
        """Refuse a task that is already learned or has no training images."""
        if data.name in self.tasks:
            raise ContadError(f"task {data.name!r} is already learned (tasks: {self.tasks})")
        if len(data.train) == 0:
            raise ContadError(f"task {data.name!r} has no training images")

    def _require_tasks(self) -> None:
        """Refuse to score before any task is learned."""
        if not self.tasks:
            raise ContadError(f"{self.name}: no task learned yet; train at least one task before predicting")

    # ------------------------------------------------------------------ the contract
    @abstractmethod
    def fit_task(self, data: TaskData) -> dict[str, Any]:
        """Learn one new task; returns a training log (losses per epoch, sizes, seconds)."""

    @abstractmethod
    def predict(self, images: torch.Tensor, true_tasks: list[str] | None = None, depth: torch.Tensor | None = None) -> Prediction:
        """Score (B, 3, H, W) images (+ (B, 3, H, W) xyz for ``uses_depth``); anomaly maps at input resolution."""

    def calibration_scores(self, data: TaskData) -> torch.Tensor | None:
        """Image scores of normal images of the task just learned that its scoring state did not fit on
        (e.g. each training image scored against the memory without its own patches), on the scale
        ``predict`` reports; None when the method has no such scores. Extra samples for its threshold.

        A method that has them records ``(task, raw scores)`` in ``_fit_scores`` during ``fit_task``;
        they are divided by the task's ``score_scale`` here (not saved with the state).
        """
        fitted = self._fit_scores
        if fitted is None or fitted[0] != data.name or not self.tasks or self.tasks[-1] != data.name:
            return None
        return fitted[1] / self.score_scale(len(self.tasks) - 1)

    def score_scale(self, task_index: int) -> float:
        """Divisor of task ``task_index``'s raw scores in ``predict`` (1.0: raw scores are reported)."""
        return 1.0

    # ------------------------------------------------------------------ operator feedback
    def extend_task(self, task: str, images: torch.Tensor, share: float = 1.0) -> dict[str, Any]:
        """Grow the memory of the learned ``task`` with (B, 3, H, W) normal ``images`` (operator feedback: false
        rejects marked good), incrementally: nothing is retrained and no other task's state changes. ``share``:
        the fraction of the images' memory rows to add (a coreset). Returns a log (rows added, new sizes)."""
        raise ContadError(f"method {self.name!r} cannot learn feedback incrementally (ucad can); retrain the product instead")

    # ------------------------------------------------------------------ streaming protocol (``learns_online``)
    def stream_task(self, task: str) -> None:
        """Make sure ``task`` exists so single images can be learned into it (a new task starts empty)."""
        raise ContadError(f"method {self.name!r} does not learn online (methods declaring learns_online do)")

    def score_one(self, image: torch.Tensor, task: str) -> StreamScore:
        """Score one (1, 3, H, W) image with the CURRENT model of ``task`` (before learning it), routed by content too."""
        raise ContadError(f"method {self.name!r} does not learn online (methods declaring learns_online do)")

    def learn_one(self, scored: StreamScore, task: str) -> float | None:
        """One online update of ``task`` with the image behind ``scored``; the training loss."""
        raise ContadError(f"method {self.name!r} does not learn online (methods declaring learns_online do)")

    def images_learned(self, task: str) -> int:
        """How many images ``task`` has learned online so far."""
        raise ContadError(f"method {self.name!r} does not learn online (methods declaring learns_online do)")

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
