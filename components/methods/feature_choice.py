"""Per-task patch-feature settings, chosen when a task is learned (``ucad.feature_choices``, ``patchcore.feature_choices``).

A method with one memory per task on the shared frozen backbone (UCAD, the PatchCore oracle) may let each task
take other patch features than ``backbone.*`` says (another pyramid level, span or channel reduction).
``FeatureViews`` holds the backbone's views with those settings (they share the network and the feature
cache; settings the backbone cannot take are refused up front). Every candidate (the backbone's own settings
first) is fitted and scored on the task's held-out training normals and synthetic defects pasted on them
(``choice_defects``: two rectangles and one stroke copy per normal; no test image), and ``chosen_index``
keeps a candidate other than the backbone's settings only when its image AUROC there is higher by the
method's margin or more (ties keep them); a task with fewer than ``MIN_CHOICE_NORMALS`` held-out normals does
not choose (``skip_reason``). Why: on the validation protocol a board scan with defects a few pixels wide
(pcb) separates far better with the stride-4 level while a texture with larger defects (magnetic_tile) loses
with it (benchmarks/RESULTS.md section 3), so one global setting gives one of them away.

Reports name settings with ``label`` ("backbone" or the keys a choice sets) and record what the choice
measured with ``choice_report``; the run's records read them back from each step's train log
(``features``, ``feature_choice``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.config import ConfigError, FeatureChoice
from components.errors import ContadError
from components.data.synthetic.pasted import synthetic_defect_batch
from components.eval.metrics import auroc
from components.methods.extract import batched_views, module_device
from components.methods.feature_cache import share_feature_cache
from components.types import ImageBatch

MIN_CHOICE_NORMALS = 4  # held-out normals a task needs for its feature choice (fewer: the backbone's settings)
CHOICE_VARIANTS = 3  # synthetic defects per held-out normal in that choice: 2 rectangles + 1 stroke copy


def label(choice: FeatureChoice | None) -> str:
    """How reports name a task's feature settings: "backbone" (its own) or the keys a choice sets."""
    return "backbone" if choice is None else choice.label()


class FeatureViews:
    """The backbone and its views with the feature settings of ``choices`` (config key ``key``, for errors)."""

    def __init__(self, backbone: PromptedBackbone, choices: list[FeatureChoice], key: str) -> None:
        self.backbone, self.key = backbone, key
        self._views: dict[str, PromptedBackbone] = {}
        self.candidates = self._candidates(choices)

    def _candidates(self, choices: list[FeatureChoice]) -> list[FeatureChoice | None]:
        """None (the backbone's settings) first, then each choice that makes other features (duplicates dropped)."""
        candidates: list[FeatureChoice | None] = [None]
        seen = {id(self.backbone)}
        for choice in choices:
            view = self.view(choice)
            if id(view) not in seen:
                seen.add(id(view))
                candidates.append(choice)
        return candidates

    def view(self, choice: FeatureChoice | None) -> PromptedBackbone:
        """The backbone with ``choice``'s feature settings (None: the backbone itself); shares its network and feature cache."""
        if choice is None:
            return self.backbone
        name = label(choice)
        if name not in self._views:
            try:
                view = self.backbone.with_features(choice.feature_layer, choice.feature_span, choice.feature_dim)
            except ConfigError as err:
                raise ConfigError(f"{self.key} ({name}): {err}") from err
            if view is not self.backbone:
                share_feature_cache(view, self.backbone)
            self._views[name] = view
        return self._views[name]


def features_of_views(backbone: PromptedBackbone, views: list[tuple[PromptedBackbone, TaskPrompt | None]], images: torch.Tensor,
                      batch_size: int, desc: str | None = None) -> list[torch.Tensor]:
    """(B, N, C) features of ``images`` for each (view, prompt) of ``views`` (views of ``backbone``), in batches: one network
    pass for all of them where the backbone can share it (untrained prompts), else one per view
    (``PromptedBackbone.features_of_views``)."""
    return batched_views(lambda x: backbone.features_of_views(x, views), images, batch_size, module_device(backbone), desc=desc)


def settings_meta(settings: list[FeatureChoice | None]) -> list[dict[str, Any] | None]:
    """Per-task feature settings as a saved state's metadata records them (None = the backbone's)."""
    return [None if c is None else c.model_dump(exclude_none=True) for c in settings]


def settings_from_meta(meta: dict[str, Any], tasks: int) -> list[FeatureChoice | None]:
    """The per-task feature settings of a saved state (states saved before per-task settings: the backbone's for every task)."""
    stored = meta.get("feature_settings") or [None] * tasks
    if len(stored) != tasks:
        raise ContadError(f"state has {tasks} tasks but {len(stored)} feature settings")
    return [None if c is None else FeatureChoice.model_validate(c) for c in stored]


def skip_reason(heldout_normals: int) -> str | None:
    """Why a task with ``heldout_normals`` held-out normals cannot choose (None: it can)."""
    if heldout_normals < MIN_CHOICE_NORMALS:
        return f"{heldout_normals} held-out normals (< {MIN_CHOICE_NORMALS})"
    return None


def choice_defects(heldout: ImageBatch, seed: int) -> ImageBatch:
    """The synthetic defects a task's candidates are judged on: ``CHOICE_VARIANTS`` per held-out normal."""
    return synthetic_defect_batch(heldout, CHOICE_VARIANTS, seed)


def synthetic_auroc(normal: torch.Tensor, defect: torch.Tensor) -> float:
    """Image AUROC of raw scores of held-out normals against those of their synthetic defects."""
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
    return auroc(labels, torch.cat([normal, defect]).double().numpy())


def chosen_index(aurocs: list[float], margin: float) -> int:
    """The candidate a task keeps: the best of ``aurocs[1:]`` when it beats the backbone's ``aurocs[0]`` by ``margin``, else 0."""
    if len(aurocs) < 2:
        return 0
    best = 1 + int(np.argmax(aurocs[1:]))  # the first of equals
    return best if aurocs[best] >= aurocs[0] + margin else 0


def choice_report(candidates: list[FeatureChoice | None], aurocs: list[float], chosen: int, margin: float,
                  normals: int, defects: int) -> dict[str, Any]:
    """What a task's choice measured, as its train log records it (``feature_choice``)."""
    return {"image_auroc": {label(c): a for c, a in zip(candidates, aurocs)}, "chosen": label(candidates[chosen]),
            "margin": margin, "normals": normals, "defects": defects}
