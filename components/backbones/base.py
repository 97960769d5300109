"""The prompted-backbone interface every continual method builds on."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from components.config import ConfigError


class TaskPrompt(nn.Module):
    """Learnable per-task prompt parameters for one backbone (created by ``new_prompt``)."""


class PromptedBackbone(nn.Module, ABC):
    """A frozen feature extractor that can be steered by a per-task prompt.

    All backbone weights are frozen (``requires_grad=False``); only ``TaskPrompt`` parameters train.
    Inputs are (B, 3, H, W) ImageNet-normalised float tensors at ``image_size``.
    """

    feature_dim: int  # C of ``features``
    key_dim: int  # C of ``key_features``

    @abstractmethod
    def grid_size(self, image_size: int) -> tuple[int, int]:
        """Patch grid (h, w) of ``features`` for a square input of ``image_size``."""

    @abstractmethod
    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        """Un-prompted mid-layer patch features (B, N, key_dim) used for task keys/routing."""

    @abstractmethod
    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        """Patch features (B, N, feature_dim) at the configured layer, prompted when given."""

    @abstractmethod
    def new_prompt(self) -> TaskPrompt:
        """A freshly initialised prompt for a new task (identity/no-op at initialisation is ideal)."""

    def features_of_views(self, images: torch.Tensor, views: list[tuple["PromptedBackbone", TaskPrompt | None]]) -> list[torch.Tensor]:
        """``view.features(images, prompt)`` for each (view, prompt) of ``views`` (views from ``with_features``, sharing
        this backbone's network). Backbones that can make them in one pass of the network override this; the result
        must equal the separate calls."""
        return [view.features(images, prompt) for view, prompt in views]

    def with_features(self, layer: int | None = None, span: int | None = None, dim: int | None = None) -> "PromptedBackbone":
        """This backbone with other patch-feature settings (``backbone.feature_layer`` / ``feature_span`` /
        ``feature_dim``; None keeps its own), sharing the frozen network; itself when nothing changes.

        Backbones without that choice raise ``ConfigError`` (``ucad.feature_choices`` names itself around it).
        """
        raise ConfigError(f"backbone {type(self).__name__} cannot take other feature settings per task")
