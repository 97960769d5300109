"""Test helpers for the methods tests: a tiny deterministic prompted backbone and toy products.

The toy backbone is a small fixed random CNN (stride 8) with a FiLM + additive spatial prompt on
its intermediate map, so method tests are fast and independent of pretrained weights.
Toy products are images with a product-specific colour and stripe texture; a defect is a square
of a different texture pasted in.
"""

from __future__ import annotations

import torch
from torch import nn

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.config import Config, ConfigError
from components.types import ImageBatch, TaskData

IMAGE_SIZE = 32


class ToyPrompt(TaskPrompt):
    """Channel scale/shift and an additive spatial map on the 16-channel stride-4 map; identity at init."""

    def __init__(self, channels: int, grid: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        self.spatial = nn.Parameter(torch.zeros(1, channels, grid, grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale.view(1, -1, 1, 1)) + self.shift.view(1, -1, 1, 1) + self.spatial


class ToyBackbone(PromptedBackbone):
    """Fixed random CNN: conv(3->16, /4) -> prompt -> conv(16->24, /2); keys: avg-pooled conv1."""

    feature_dim = 24
    key_dim = 16

    def __init__(self, image_size: int = IMAGE_SIZE, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.conv2 = nn.Conv2d(16, 24, kernel_size=3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * 0.3
            conv.bias.data = torch.randn(conv.bias.shape, generator=generator) * 0.1
        for param in self.parameters():
            param.requires_grad_(False)
        self.calls = {"key_features": 0, "features": 0}
        self.eval()

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return image_size // 8, image_size // 8

    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        self.calls["key_features"] += 1
        x = torch.relu(self.conv1(images))
        x = nn.functional.avg_pool2d(x, 2)
        return x.flatten(2).transpose(1, 2)

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        self.calls["features"] += 1
        x = torch.relu(self.conv1(images))
        if prompt is not None:
            x = prompt(x)
        x = torch.relu(self.conv2(x))
        return x.flatten(2).transpose(1, 2)

    def new_prompt(self) -> ToyPrompt:
        return ToyPrompt(16, self.image_size // 4)


# product id -> (base RGB colour, stripe period in px, stripe orientation)
PRODUCTS = {
    "red": ((0.8, 0.2, 0.2), 4, "h"),
    "green": ((0.2, 0.8, 0.3), 6, "v"),
    "blue": ((0.2, 0.3, 0.9), 8, "h"),
}


class FineToy(ToyBackbone):
    """The toy network's stride-4 map as patch features (16 channels): what a finer feature layer sees."""

    feature_dim = 16

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return image_size // 4, image_size // 4

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        self.calls["features"] += 1
        x = torch.relu(self.conv1(images))
        return (prompt(x) if prompt is not None else x).flatten(2).transpose(1, 2)


class BlindAtDefaultToy(ToyBackbone):
    """Its configured layer sees nothing (constant features: every score ties); layer 2 is ``FineToy``."""

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        self.calls["features"] += 1
        n = self.grid_size(images.shape[-1])
        return images.new_zeros(images.shape[0], n[0] * n[1], self.feature_dim)

    def with_features(self, layer: int | None = None, span: int | None = None, dim: int | None = None) -> PromptedBackbone:
        if (layer, span, dim) == (None, None, None):
            return self
        if (layer, span, dim) != (2, None, None):
            raise ConfigError(f"backbone.feature_layer={layer} is out of range")
        return FineToy(self.image_size)


def product_images(product: str, n: int, seed: int, defect: str | None = None, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(n, 3, size, size) noisy textured images of ``product``; ``defect`` pastes another product's texture."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.stack([_texture(product, size, generator) for _ in range(n)])
    if defect is not None:
        for i in range(n):
            patch = _texture(defect, size, generator)
            y, x = (int(v) for v in torch.randint(0, size - 12, (2,), generator=generator))
            images[i, :, y : y + 12, x : x + 12] = patch[:, y : y + 12, x : x + 12]
    return images


def _texture(product: str, size: int, generator: torch.Generator) -> torch.Tensor:
    colour, period, orientation = PRODUCTS[product]
    coords = torch.arange(size, dtype=torch.float32)
    phase = float(torch.rand(1, generator=generator)) * period
    wave = torch.sin(2 * torch.pi * (coords + phase) / period)
    stripes = wave[:, None].expand(size, size) if orientation == "h" else wave[None, :].expand(size, size)
    base = torch.tensor(colour).view(3, 1, 1) * (1.0 + 0.5 * stripes)
    return (base + 0.05 * torch.randn(3, size, size, generator=generator) - 0.5) / 0.25


def label_maps_of(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) int64 label maps: 1 + brightness quartile of each pixel (a stand-in segmenter)."""
    brightness = images.mean(dim=1)
    n = images.shape[0]
    flat = brightness.reshape(n, -1)
    edges = torch.quantile(flat, torch.tensor([0.25, 0.5, 0.75]), dim=1).T  # (N, 3)
    labels = 1 + (flat[:, :, None] > edges[:, None, :]).sum(dim=2)
    return labels.reshape(brightness.shape).long()


def toy_task(product: str, n_train: int = 12, n_heldout: int = 3, seed: int = 0, with_maps: bool = True) -> TaskData:
    """A ``TaskData`` of ``product`` with train/held-out normals and (optionally) label maps."""
    train = product_images(product, n_train, seed)
    held = product_images(product, n_heldout, seed + 1)
    return TaskData(
        name=product,
        products=[product],
        train=ImageBatch(images=train, products=[product] * n_train, paths=[f"{product}/train/{i}.png" for i in range(n_train)]),
        heldout=ImageBatch(images=held, products=[product] * n_heldout, paths=[f"{product}/held/{i}.png" for i in range(n_heldout)]),
        label_maps=label_maps_of(train) if with_maps else None,
        heldout_label_maps=label_maps_of(held) if with_maps else None,
    )


def toy_config(method: str = "ucad", **ucad: object) -> Config:
    """A small, fast config for the toy backbone."""
    cfg = Config(method=method)
    cfg.data.image_size = IMAGE_SIZE
    cfg.ucad.key_size = 8
    cfg.ucad.knowledge_size = 48
    cfg.ucad.epochs = 2
    cfg.ucad.batch_size = 4
    cfg.ucad.pairs_per_image = 16
    cfg.ucad.lr = 0.01
    cfg.patchcore.coreset_size = 48
    cfg.patchcore.replay_buffer = 5
    cfg.eval.smoothing_sigma = 1.0
    for key, value in ucad.items():
        setattr(cfg.ucad, key, value)
    return cfg
