"""Backbone registry: names, devices."""

from __future__ import annotations

import pytest
import torch

from components.backbones.common import resolve_device
from components.backbones.registry import build_backbone
from components.config import BackboneConfig, ConfigError


def test_auto_device_is_cpu_without_cuda_and_backbone_lands_there() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA visible: auto resolves to cuda")
    assert resolve_device("auto") == torch.device("cpu")
    backbone = build_backbone(BackboneConfig(device="auto", pretrained=False), 64)
    assert all(p.device.type == "cpu" for p in backbone.parameters())
    assert all(p.device.type == "cpu" for p in backbone.new_prompt().parameters())


def test_unavailable_or_invalid_device_names_the_key() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="backbone.device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="backbone.device"):
        resolve_device("gpu-please")
