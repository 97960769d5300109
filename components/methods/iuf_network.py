"""IUF's network pieces apart from the continual logic (Tang et al., ECCV 2024; paper: ../papers/iuf.txt).

- ``ObjectDiscriminator`` (OASA, Eqs. 3-4): a small transformer on the raw image trained with
  cross-entropy on the product label; its per-block outputs are the category maps C_l that multiply
  the query input of reconstruction-encoder layer l. Its class head GROWS as products arrive.
- ``semantic_compression_loss`` (Eqs. 5-7): sum of the tail singular values of the token-averaged
  latents, computed on live (non-detached) tensors so it really trains the network.
- ``ActivationSpan`` / ``project_update`` (Eqs. 10-12): the singular directions of old products'
  input activations of a linear layer, and the Omega-weighted projection of a weight update.
- ``retain_`` (Eq. 9 in the authors' code form): theta <- (1 - r) theta + r theta_old.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from components.methods.reconstruction import EncoderLayer

# The discriminator embeds an image pooled to (4h, 4w) with 4 x 4 patches: one token per grid cell.
EMBED_PATCH = 4


class GrowingHead(nn.Module):
    """A linear class head whose output rows are appended as new classes arrive (old rows untouched)."""

    def __init__(self, dim: int, classes: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(classes, dim))
        self.bias = nn.Parameter(torch.zeros(classes))

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    def grow(self, new_classes: int, generator: torch.Generator | None = None) -> None:
        """Append ``new_classes`` rows (small random weights, zero bias); existing logits are unchanged."""
        rows = torch.randn(new_classes, self.dim, generator=generator) * (1.0 / math.sqrt(self.dim))
        device = self.weight.device
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), rows.to(device)]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), torch.zeros(new_classes, device=device)]))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.linear(pooled, self.weight, self.bias)


class ObjectDiscriminator(nn.Module):
    """OASA discriminator D (Eq. 3): raw image -> category maps [(B, N, dim)] per block + class logits.

    Patch embedding (image pooled to 4h x 4w, 4 x 4 conv, LayerNorm, ReLU; LayerNorm instead of the
    code's BatchNorm so later products cannot shift running statistics), learned positions,
    ``blocks`` post-norm transformer blocks, mean-pooled growing head.
    """

    def __init__(self, grid: tuple[int, int], dim: int, heads: int, blocks: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Conv2d(3, dim, kernel_size=EMBED_PATCH, stride=EMBED_PATCH)
        self.embed_norm = nn.LayerNorm(dim)
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderLayer(dim, heads, ffn, dropout) for _ in range(blocks))
        self.head = GrowingHead(dim)

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        """Images average-pooled to the patch embedding's input size (4h x 4w); pooling them again is the identity."""
        h, w = self.grid
        return F.adaptive_avg_pool2d(images, (EMBED_PATCH * h, EMBED_PATCH * w))

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.pool(images)
        x = F.relu(self.embed_norm(self.embed(x).flatten(2).transpose(1, 2)))
        maps = []
        for block in self.blocks:
            x = block(x, self.pos)
            maps.append(x)
        return maps, self.head(x.mean(dim=1))


def tail_mask(sigma: torch.Tensor, tail_index: int, threshold: float) -> torch.Tensor:
    """Boolean mask of the singular values penalised by Eq. 7: index >= ``tail_index`` or normalised value < ``threshold``."""
    index = torch.arange(sigma.shape[0], device=sigma.device)
    mask = index >= tail_index
    if threshold > 0:
        mask |= (sigma.detach() / sigma.detach().sum().clamp_min(1e-12)) < threshold
    return mask


def semantic_compression_loss(latent: torch.Tensor, window: torch.Tensor | None, tail_index: int, threshold: float) -> torch.Tensor:
    """Eqs. 5-7 on one (B, N, C) latent: token-average -> M^ (B, C), stack ``window`` rows, SVD, tail sum.

    ``window`` holds detached M^ rows of earlier batches so the SVD sees more rows than one batch
    (a single batch has at most B non-zero singular values); gradient flows through the batch's rows.
    The tail sum is divided by the number of rows, so the scale does not depend on the window size.
    """
    m_hat = latent.mean(dim=1)  # Eq. 5
    rows = m_hat if window is None or window.numel() == 0 else torch.cat([m_hat, window.to(m_hat)])
    sigma = torch.linalg.svdvals(rows)  # Eq. 6, descending
    mask = tail_mask(sigma, tail_index, threshold)
    return (sigma * mask).sum() / rows.shape[0]  # Eq. 7


def omega(dim: int, span_rank: int) -> torch.Tensor:
    """Eq. 11 weights of the ``dim`` basis directions: ln(c) / ln(dim) for the c-th direction inside the
    old span (c = 1..span_rank: the top direction is frozen), 1 outside the span (free)."""
    weights = torch.ones(dim)
    if dim >= 2 and span_rank > 0:
        ranks = torch.arange(1, span_rank + 1, dtype=torch.float32)
        weights[:span_rank] = torch.log(ranks) / math.log(dim)
    return weights


class ActivationSpan:
    """Second moments of one linear layer's input activations, summed over old tasks (each task weight 1)."""

    def __init__(self, dim: int, moment: torch.Tensor | None = None) -> None:
        self.dim = dim
        self.moment = torch.zeros(dim, dim, dtype=torch.float64) if moment is None else moment.double().clone()

    def add_task(self, activations: torch.Tensor) -> None:
        """Add one task's activations (n, dim) as their mean outer product X^T X / n."""
        x = activations.reshape(-1, self.dim).double()
        self.moment += x.T @ x / max(1, x.shape[0])

    def basis(self, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(V (dim, dim) singular directions by decreasing singular value, Omega (dim,)).

        The old span is the smallest set of top directions holding ``energy`` of the total squared
        singular values (eigenvalues of X^T X); directions outside it get Omega = 1.
        """
        eigvals, eigvecs = torch.linalg.eigh(self.moment)
        order = torch.argsort(eigvals, descending=True)
        eigvals, eigvecs = eigvals[order].clamp_min(0), eigvecs[:, order]
        total = float(eigvals.sum())
        if total <= 0:
            return eigvecs.float(), torch.ones(self.dim)
        cumulative = torch.cumsum(eigvals, 0) / total
        rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
        return eigvecs.float(), omega(self.dim, min(rank, self.dim))


def project_update(delta: torch.Tensor, basis: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eqs. 10-12 for a weight update (out, in): dTheta = dW V; dW* = (Omega * dTheta) V^T."""
    coords = delta @ basis.to(delta)  # Eq. 10: coordinates in the old channel space
    return (coords * weights.to(delta)) @ basis.to(delta).T  # Eqs. 11-12


@torch.no_grad()
def retain_(param: torch.Tensor, old: torch.Tensor, rate: float) -> None:
    """Eq. 9 (authors' code form): ``param <- (1 - rate) param + rate old`` in place."""
    param.mul_(1.0 - rate).add_(old.to(param), alpha=rate)


def linear_layers(network: nn.Module, patterns: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``network`` whose names match one of the fnmatch ``patterns``."""
    return {n: m for n, m in network.named_modules() if isinstance(m, nn.Linear) and any(fnmatch.fnmatch(n, p) for p in patterns)}


def projected_step(optimizer: torch.optim.Optimizer, modules: dict[str, nn.Linear], bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Optimizer step; the weight update of every layer in ``bases`` replaced by its Eq. 12 projection."""
    before = {n: modules[n].weight.detach().clone() for n in bases}
    optimizer.step()
    with torch.no_grad():
        for name, (basis, weights) in bases.items():
            weight = modules[name].weight
            weight.copy_(before[name] + project_update(weight - before[name], basis, weights))


@contextmanager
def input_activations(modules: dict[str, nn.Linear]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect the (rows, in_features) inputs of every module in ``modules`` while the block runs (CPU)."""
    collected: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    hooks = [m.register_forward_hook(lambda _m, inp, _out, n=n: collected[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).cpu())) for n, m in modules.items()]
    try:
        yield collected
    finally:
        for hook in hooks:
            hook.remove()
