"""The per-task feature choice's rule (components/methods/feature_choice.py), shared by UCAD and the PatchCore oracle."""

from __future__ import annotations

import torch

from components.config import FeatureChoice
from components.methods.feature_choice import FeatureViews, chosen_index, skip_reason, synthetic_auroc
from tests.methods_support import BlindAtDefaultToy


def test_a_candidate_replaces_the_backbone_s_settings_only_by_the_margin() -> None:
    assert chosen_index([0.80], 0.02) == 0  # nothing to choose from
    assert chosen_index([0.5, 0.75, 0.625], 0.25) == 1  # exactly the margin is enough (binary fractions: no rounding)
    assert chosen_index([0.5, 0.74, 0.625], 0.25) == 0  # below it the backbone's settings stay
    assert chosen_index([0.80, 0.90, 0.95], 0.02) == 2  # the best candidate, not the first good one
    assert chosen_index([0.80, 0.90, 0.90], 0.0) == 1  # equals: the first
    assert chosen_index([0.90, 0.90], 0.0) == 1 and chosen_index([0.90, 0.85], 0.0) == 0


def test_synthetic_auroc_and_too_few_normals() -> None:
    assert synthetic_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4, 0.5])) == 1.0
    assert synthetic_auroc(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2])) == 0.0  # never flipped
    assert skip_reason(3) == "3 held-out normals (< 4)" and skip_reason(4) is None


def test_views_drop_choices_that_make_the_backbone_s_own_features() -> None:
    backbone = BlindAtDefaultToy()
    views = FeatureViews(backbone, [FeatureChoice(), FeatureChoice(feature_layer=2), FeatureChoice(feature_layer=2)], "x.feature_choices")
    assert views.candidates == [None, FeatureChoice(feature_layer=2)]
    assert views.view(None) is backbone and views.view(FeatureChoice(feature_layer=2)) is views.view(FeatureChoice(feature_layer=2))
