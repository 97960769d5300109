"""Small helpers shared by the backbones: device choice, freezing, input checks, normalisation."""

from __future__ import annotations

import torch
from torch import nn

from components.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``/``cuda``/``cuda:N`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"backbone.device: {name!r} is not a device (use auto, cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"backbone.device: {name!r} requested but CUDA is not available (use auto or cpu)")
    return device


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and switch to eval mode."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def check_images(images: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is a (B, 3, H, W) floating tensor."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"backbone input must be a (B, 3, H, W) float tensor, got {tuple(images.shape)} {images.dtype}")


def renormalise(
    images: torch.Tensor, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> torch.Tensor:
    """Convert ImageNet-normalised images to a backbone's own normalisation (no-op when identical)."""
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return images
    in_mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    in_std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    out_mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    out_std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    scale = in_std / out_std
    shift = (in_mean - out_mean) / out_std
    return images * scale + shift
