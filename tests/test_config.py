"""The typed config: params.yaml loads, overrides apply, unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import Config, ConfigError, config_to_dict, flatten_config, load_config
from tests.conftest import REPO_ROOT


def test_params_yaml_matches_defaults_keys() -> None:
    """params.yaml names every knob of the Config (no silent defaults) and nothing else."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    defaults = config_to_dict(Config())

    def keys(d: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in {"prompts"}:
                out |= keys(v, f"{prefix}{k}.")
            else:
                out.add(f"{prefix}{k}")
        return out

    assert keys(raw) == keys(defaults)
    load_config(REPO_ROOT / "params.yaml")


def test_overrides_types_and_lists(tmp_path: Path) -> None:
    cfg = load_config(REPO_ROOT / "params.yaml", ["data.products=grid,pcb", "ucad.epochs=7", "ucad.lr=0.5", "backbone.checkpoint=null", "method=patchcore_replay"])
    assert cfg.data.products == ["grid", "pcb"]
    assert cfg.ucad.epochs == 7 and cfg.ucad.lr == 0.5
    assert cfg.backbone.checkpoint is None
    assert cfg.method == "patchcore_replay"
    flow = load_config(REPO_ROOT / "params.yaml", ["ucad.feature_choices=[{feature_layer: 2}, {feature_span: 3, feature_dim: 96}]",
                                                    "data.products=[grid, pcb]"])
    assert [c.label() for c in flow.ucad.feature_choices] == ["feature_layer=2", "feature_span=3 feature_dim=96"]
    assert flow.data.products == ["grid", "pcb"]
    with pytest.raises(ConfigError, match=r"ucad.feature_choices=.*not a YAML list"):
        load_config(REPO_ROOT / "params.yaml", ["ucad.feature_choices=[{feature_layer: 2}"])
    with pytest.raises(ConfigError, match="ucad.feature_choices.0.feature_lyr"):
        load_config(REPO_ROOT / "params.yaml", ["ucad.feature_choices=[{feature_lyr: 2}]"])


@pytest.mark.parametrize("override, needle", [("ucad.nope=1", "ucad.nope: unknown key"), ("method=foo", "method"), ("ucad.epochs=abc", "ucad.epochs"), ("noequals", "key=value")])
def test_bad_overrides_are_named(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(REPO_ROOT / "params.yaml", [override])


def test_bad_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("data:\n  root: x\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"p\.yaml[\s\S]*data\.bogus: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flatten_is_primitive() -> None:
    flat = flatten_config(load_config(REPO_ROOT / "params.yaml"))
    assert flat["method"] == "ucad"
    assert flat["backbone.name"] == "efficientnet_lite0"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert "data.products" in flat and "masks.sam.checkpoint" in flat


def test_ib_iumad_training_and_scoring_knobs_are_validated() -> None:
    cfg = load_config(REPO_ROOT / "params.yaml")
    assert cfg.ib_iumad.combine == "max" and cfg.ib_iumad.score_calibration == "images" and cfg.ib_iumad.early_stopping_patience == 0
    cfg = load_config(REPO_ROOT / "params.yaml", ["ib_iumad.early_stopping_patience=8", "ib_iumad.score_calibration=cells", "ib_iumad.combine=sum"])
    assert cfg.ib_iumad.early_stopping_patience == 8 and cfg.ib_iumad.score_calibration == "cells" and cfg.ib_iumad.combine == "sum"
    for bad, key in [("ib_iumad.early_stopping_patience=-1", "early_stopping_patience"), ("ib_iumad.early_stopping_patience=x", "early_stopping_patience"),
                     ("ib_iumad.score_calibration=pixels", "score_calibration"), ("ib_iumad.combine=mean", "combine")]:
        with pytest.raises(ConfigError, match=rf"ib_iumad\.{key}"):
            load_config(REPO_ROOT / "params.yaml", [bad])


def test_iuf_score_calibration_defaults_to_position_and_is_validated() -> None:
    assert load_config(REPO_ROOT / "params.yaml").iuf.score_calibration == "position"
    assert load_config(REPO_ROOT / "params.yaml", ["iuf.score_calibration=none"]).iuf.score_calibration == "none"
    with pytest.raises(ConfigError, match=r"iuf\.score_calibration"):
        load_config(REPO_ROOT / "params.yaml", ["iuf.score_calibration=border"])
