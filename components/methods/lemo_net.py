"""LeMO's network and loss (Gao et al., "Learning Memory for Online Anomaly Detection"), apart from the continual logic.

- ``LeMOAdapter``: CoordConv (x/y coordinate channels appended to the frozen multi-stage patch
  features) followed by the paper's "non-linear projector, implemented as a 1 x 1 convolution",
  giving the embedding z (B, N, D), L2-normalised per patch (see ``LeMOAdapter``).
- ``qr_prototypes`` / ``kmeans_prototypes``: the K learnable memory prototypes P (K, D), initialised
  with "decoupled noise" (reduced QR of Gaussian noise: unit-norm, mutually orthogonal rows) or with
  k-means of the first image's embeddings (the paper's alternative).
- ``anonce_loss``: the AnoNCE loss of Eq. 2 with margin r and temperature tau.
- ``prototype_scores``: S(i,j) = min_k |z_ij - p_k| weighted by the softmin weight of the nearest
  prototype (the paper's score A).
- ``prototype_shares``: the share of patches whose nearest prototype is each prototype (collapse check).
- ``enhance_prototypes``: the feature-enhanced memory update (ODC-style re-clustering with
  balancing), used by ``lemo.memory_update=feature_enhanced``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COORD_CHANNELS = 2


def coord_channels(batch: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(B, 2, h, w) CoordConv channels: x and y positions scaled to [-1, 1]."""
    h, w = grid
    ys = torch.linspace(-1.0, 1.0, h, device=device).view(1, 1, h, 1).expand(batch, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=device).view(1, 1, 1, w).expand(batch, 1, h, w)
    return torch.cat([xs, ys], dim=1)


class LeMOAdapter(nn.Module):
    """CoordConv + 1x1 convolution: frozen patch features (B, N, C) -> embeddings z (B, N, D).

    ``init="identity"`` starts as the identity on the feature channels (coordinate weights zero,
    so z starts at the pretrained features); ``init="random"`` is PyTorch's default convolution
    initialisation (CFA's). z is L2-normalised per patch so that it lives on the scale of the
    unit-norm QR prototypes (otherwise every patch is far from every prototype and the score
    degenerates to the feature norm).
    """

    def __init__(self, in_dim: int, out_dim: int, init: str, generator: torch.Generator) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim + COORD_CHANNELS, out_dim, kernel_size=1)
        with torch.no_grad():
            if init == "identity":
                if out_dim != in_dim:
                    raise ValueError(f"identity adapter init needs lemo.adapter_dim == feature dim ({in_dim}), got {out_dim}")
                self.proj.weight.zero_()
                self.proj.weight[:, :in_dim, 0, 0] = torch.eye(in_dim)
                self.proj.bias.zero_()
            elif init == "random":
                bound = 1.0 / (in_dim + COORD_CHANNELS) ** 0.5
                self.proj.weight.uniform_(-bound, bound, generator=generator)
                self.proj.bias.uniform_(-bound, bound, generator=generator)
            else:
                raise ValueError(f"unknown adapter init {init!r} (identity | random)")

    def forward(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = features.shape
        x = features.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        x = torch.cat([x, coord_channels(b, grid, x.device)], dim=1)
        z = self.proj(x).flatten(2).transpose(1, 2)
        return F.normalize(z, dim=2)


def qr_prototypes(k: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(K, D) "decoupled noise" prototypes: P = Q^T of the reduced QR of A ~ N(0, 1)^(D x K); needs K <= D."""
    if k > dim:
        raise ValueError(f"QR prototypes need lemo.prototypes ({k}) <= embedding dim ({dim})")
    noise = torch.randn(dim, k, generator=generator)
    q, _ = torch.linalg.qr(noise, mode="reduced")  # (D, K), orthonormal columns
    return q.T.contiguous()


def kmeans_prototypes(embeddings: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 20) -> torch.Tensor:
    """(K, D) k-means centres of one image's embeddings (N, D) (seeded k-means++ start, Lloyd steps)."""
    points = embeddings.detach().float()
    n = points.shape[0]
    if n < k:
        raise ValueError(f"k-means prototypes need at least lemo.prototypes={k} patches, got {n}")
    centres = [points[int(torch.randint(n, (1,), generator=generator))]]
    for _ in range(1, k):
        d2 = torch.cdist(points, torch.stack(centres)).min(dim=1).values ** 2
        centres.append(points[int(torch.multinomial(d2 + 1e-12, 1, generator=generator))])
    centres_t = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(points, centres_t).argmin(dim=1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centres_t[j] = members.mean(dim=0)
    return centres_t.contiguous()


def anonce_loss(z: torch.Tensor, prototypes: torch.Tensor, positives: int, negatives: int, margin: float, temperature: float) -> torch.Tensor:
    """AnoNCE (Eq. 2) averaged over all patches of z (B, N, D) against prototypes P (K, D).

    For each patch the ``positives`` nearest prototypes are p+, the next ``negatives`` are p-;
    E = -log( sum_p+ e^{-m(|z-p+|, r)/tau} / (sum_p+ e^{...} + sum_p- e^{-m(|z-p-|, r)/tau}) ),
    m(d, r) = max(d - r, 0).
    """
    d = torch.cdist(z.reshape(-1, z.shape[-1]), prototypes)  # (B*N, K) Euclidean
    ranked = d.sort(dim=1).values[:, : positives + negatives]
    logits = -(ranked - margin).clamp_min(0.0) / temperature
    positive = torch.logsumexp(logits[:, :positives], dim=1)
    everything = torch.logsumexp(logits, dim=1)
    return (everything - positive).mean()


def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, N) patch scores A = softmin weight of the nearest prototype x S, S = min_k |z - p_k|."""
    b, n, dim = z.shape
    d = torch.cdist(z.reshape(b * n, dim), prototypes)  # (B*N, K)
    nearest, index = d.min(dim=1)
    weight = torch.softmax(-d, dim=1).gather(1, index[:, None])[:, 0]
    return (weight * nearest).reshape(b, n)


@torch.no_grad()
def prototype_shares(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(K,) share of the patches of z (B, N, D) whose nearest prototype is each of P (K, D), most used first.

    A collapsed memory (one prototype takes almost every patch) leaves the score nothing but the distance
    to that prototype: on a texture this separated nothing (grid at chance: benchmarks/RESULTS.md, the LeMO card).
    """
    nearest = torch.cdist(z.reshape(-1, z.shape[-1]), prototypes).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=prototypes.shape[0]).float()
    return (counts / counts.sum()).sort(descending=True).values


@torch.no_grad()
def enhance_prototypes(prototypes: torch.Tensor, usage: torch.Tensor, z: torch.Tensor, momentum: float, min_usage: float) -> None:
    """Feature-enhanced memory update (ODC-style), in place on ``prototypes`` (K, D) and ``usage`` (K,).

    1. Re-clustering: every prototype moves towards the mean of the embeddings z (N, D) assigned
       to it, ``p <- (1 - momentum) p + momentum mean(z_assigned)``.
    2. Balancing: ``usage`` is an exponential moving average of each prototype's share of the
       assignments; a prototype whose usage falls below ``min_usage / K`` is split off the most used
       one: it is re-seeded at the assigned embedding of that prototype farthest from it.
    """
    k = prototypes.shape[0]
    d = torch.cdist(z, prototypes)
    assign = d.argmin(dim=1)
    counts = torch.bincount(assign, minlength=k).float()
    for j in counts.nonzero().flatten().tolist():
        prototypes[j].mul_(1.0 - momentum).add_(momentum * z[assign == j].mean(dim=0))
    usage.mul_(1.0 - momentum).add_(momentum * counts / counts.sum())
    dead = (usage < min_usage / k).nonzero().flatten().tolist()
    for j in dead:
        busiest = int(usage.argmax())
        members = (assign == busiest).nonzero().flatten()
        if len(members) == 0:
            break
        farthest = members[int(d[members, busiest].argmax())]
        prototypes[j] = z[farthest]
        half = float(usage[busiest]) / 2.0
        usage[j], usage[busiest] = half, half
