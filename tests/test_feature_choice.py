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


def test_settings_round_trip_through_a_state_s_metadata() -> None:
    import pytest

    from components.errors import ContadError
    from components.methods.feature_choice import settings_from_meta, settings_meta

    settings = [FeatureChoice(feature_layer=2), None, FeatureChoice(feature_span=3, feature_dim=96)]
    meta = {"feature_settings": settings_meta(settings)}
    assert meta["feature_settings"] == [{"feature_layer": 2}, None, {"feature_span": 3, "feature_dim": 96}]
    assert settings_from_meta(meta, 3) == settings
    assert settings_from_meta({}, 2) == [None, None]  # a state saved before per-task settings: the backbone's
    with pytest.raises(ContadError, match="state has 2 tasks but 3 feature settings"):
        settings_from_meta(meta, 2)
