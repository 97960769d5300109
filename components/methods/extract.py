"""Batched, gradient-free feature extraction through a backbone, results on the CPU (the cache of
features reused across epochs and continual steps: ``components.methods.feature_cache``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from components.progress import progress_bar


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def batched(
    extract: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    desc: str | None = None,
) -> torch.Tensor:
    """``extract`` applied to ``images`` in batches of ``batch_size`` on ``device``; concatenated on CPU."""
    outputs = batched_views(lambda x: [extract(x)], images, batch_size, device, desc)
    return outputs[0] if outputs else torch.empty(0)


@torch.no_grad()
def batched_views(
    extract: Callable[[torch.Tensor], list[torch.Tensor]],
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    desc: str | None = None,
) -> list[torch.Tensor]:
    """``batched`` for an ``extract`` that returns one tensor per backbone view: each view's batches concatenated on CPU
    (no images: an empty list)."""
    outputs: list[list[torch.Tensor]] = []
    starts = range(0, images.shape[0], max(1, batch_size))
    for start in progress_bar(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False):
        parts = extract(images[start : start + batch_size].to(device))
        outputs = outputs or [[] for _ in parts]
        for out, part in zip(outputs, parts, strict=True):
            out.append(part.float().cpu())
    return [torch.cat(out) for out in outputs]
