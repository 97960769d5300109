"""K-center greedy (farthest-point) subsampling of feature sets."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from components.config import MemoryConfig

log = logging.getLogger(__name__)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block on one intra-op thread: the greedy loop is thousands of small memory-bound
    steps whose thread synchronisation costs more than it saves (8x slower on 2 busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Rows per block of the preselection stage: a (64, 4096) float32 block (1 MB) stays in the CPU cache.
PRESELECT_BLOCK_ROWS = 4096
# Blocks whose preselection greedy steps run together, on every intra-op thread (8 x (64, 4096) float32 = 8 MB
# stays in cache; the same picks as one block at a time, about twice as fast here: benchmarks/RESULTS.md section 3).
PRESELECT_BATCH = 8


def k_center_greedy(
    features: torch.Tensor,
    k: int,
    start_index: int = 0,
    projection_dim: int | None = None,
    seed: int = 0,
    preselect_factor: int | None = None,
) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` (N, C) chosen by farthest-point sampling.

    The first pick is ``start_index``; every further pick is the row whose distance to its nearest
    already-picked row is largest (ties: lowest index). ``k >= N`` returns all rows in pick order.
    ``projection_dim`` optionally runs the selection on a seeded Gaussian random projection of the
    features (the PatchCore speed-up); ``None`` selects in the original space.

    ``preselect_factor`` (f) bounds the cost on large inputs: the rows are cut into cache-sized blocks
    of B rows, farthest-point sampling picks each block's share of f * k candidates (every block keeps
    its own outliers, unlike a random subset), and the final greedy runs over those candidates only
    (a composable coreset: N * k distance work becomes f * k * (B + k)). Used only where that is less,
    N > f * (k + B); ``None``: always one greedy over every row. ``coreset_candidates`` is that first stage.
    """
    n, k = _check_selection(features, k, start_index, preselect_factor)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    columns = _projected_columns(features, projection_dim, seed)
    if not _preselects(n, k, preselect_factor):
        with single_thread():
            return _farthest_points(columns, k, start_index)  # preselection would not save work
    assert preselect_factor is not None
    candidates = _preselect(columns, preselect_factor * k, start_index)  # batched: every intra-op thread helps
    start = int((candidates == start_index).nonzero()[0])
    with single_thread():
        return candidates[_farthest_points(columns[:, candidates].contiguous(), k, start)]


def coreset_candidates(
    features: torch.Tensor, k: int, projection_dim: int | None = None, seed: int = 0, preselect_factor: int | None = None
) -> torch.Tensor:
    """Sorted indices of the rows that ``k_center_greedy(features, k, 0, ...)``'s final greedy chooses from.

    The blockwise farthest points of its first stage, or every row where preselection would not save
    work. Composable: a greedy over the union of several sets' candidates stands for one over their
    union (what a jointly re-selected memory keeps instead of every patch).
    """
    n, k = _check_selection(features, k, 0, preselect_factor)
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    if not _preselects(n, k, preselect_factor):
        return torch.arange(n)
    assert preselect_factor is not None
    columns = _projected_columns(features, projection_dim, seed)
    return _preselect(columns, preselect_factor * k, 0)


def _check_selection(features: torch.Tensor, k: int, start_index: int, preselect_factor: int | None) -> tuple[int, int]:
    """(N, k capped at N; 0 when nothing is to be picked) after validating the selection's arguments."""
    if features.ndim != 2:
        raise ValueError(f"features must be (N, C), got shape {tuple(features.shape)}")
    n = features.shape[0]
    if n == 0 or k <= 0:
        return n, 0
    if not 0 <= start_index < n:
        raise ValueError(f"start_index {start_index} out of range for {n} rows")
    if preselect_factor is not None and preselect_factor < 1:
        raise ValueError(f"preselect_factor must be >= 1 or None, got {preselect_factor}")
    return n, min(k, n)


def _preselects(n: int, k: int, preselect_factor: int | None) -> bool:
    """Whether the blockwise first stage saves work on ``n`` rows for ``k`` picks."""
    return preselect_factor is not None and n > preselect_factor * (k + PRESELECT_BLOCK_ROWS)


def _projected_columns(features: torch.Tensor, projection_dim: int | None, seed: int) -> torch.Tensor:
    """``features`` (N, C) as contiguous (C', N) float32 columns, after the seeded random projection if any.

    Columns: each pick multiplies one row vector into a contiguous (C, N) block, which streams memory
    once (faster than torch.mv over (N, C) rows on this memory-bound loop, same picks).
    """
    points = features.detach().float()
    if projection_dim is not None and projection_dim < points.shape[1]:
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ matrix
    return points.t().contiguous()


def _farthest_points(columns: torch.Tensor, k: int, start_index: int) -> torch.Tensor:
    """Farthest-point sampling of ``k`` of the N columns of ``columns`` (C, N), starting at ``start_index``."""
    n = columns.shape[1]
    squared_norms = (columns * columns).sum(dim=0)
    selected = torch.empty(k, dtype=torch.long)
    min_sq_dist = torch.full((n,), float("inf"))
    dot = torch.empty(1, n)
    sq_dist = dot[0]
    current = start_index
    for i in range(k):
        selected[i] = current
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one vector-matrix product per pick, in place, no (N, C) temporary.
        torch.mm(columns[:, current].unsqueeze(0), columns, out=dot)
        sq_dist.mul_(-2.0).add_(squared_norms).add_(squared_norms[current])
        torch.minimum(min_sq_dist, sq_dist, out=min_sq_dist)
        min_sq_dist[current] = -1.0  # never pick the same row twice
        current = int(torch.argmax(min_sq_dist))
    return selected


def _preselect(columns: torch.Tensor, total: int, start_index: int) -> torch.Tensor:
    """Sorted indices of about ``total`` candidate columns: farthest points of every block, in proportion to its size.

    The block holding ``start_index`` starts there (so the final greedy can too); the others at their first column.
    Blocks of one size (and so one share) run their greedy steps together, ``PRESELECT_BATCH`` at a time: the
    same picks as one block after another, without a Python step per pick and block.
    """
    n = columns.shape[1]
    blocks = math.ceil(n / PRESELECT_BLOCK_ROWS)
    bounds = [round(b * n / blocks) for b in range(blocks + 1)]
    by_size: dict[int, list[int]] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        by_size.setdefault(hi - lo, []).append(lo)
    picked = []
    for size, starts in by_size.items():
        share = min(size, math.ceil(total * size / n))
        for first in range(0, len(starts), PRESELECT_BATCH):
            los = starts[first:first + PRESELECT_BATCH]
            block = torch.stack([columns[:, lo:lo + size] for lo in los])  # (G, C, size)
            begin = torch.tensor([start_index - lo if lo <= start_index < lo + size else 0 for lo in los])
            picked.append((torch.tensor(los)[:, None] + _farthest_points_batched(block, share, begin)).flatten())
    return torch.cat(picked).sort().values


def _farthest_points_batched(columns: torch.Tensor, k: int, start_index: torch.Tensor) -> torch.Tensor:
    """(G, k) farthest-point picks in each of G column blocks (G, C, S) at once, block g starting at ``start_index[g]``
    (``_farthest_points`` of every block: the same arithmetic per block, ties to the lowest index)."""
    g, _, s = columns.shape
    squared_norms = (columns * columns).sum(dim=1)  # (G, S)
    selected = torch.empty(g, k, dtype=torch.long)
    min_sq_dist = torch.full((g, s), float("inf"))
    rows = torch.arange(g)
    current = start_index.clone()
    for i in range(k):
        selected[:, i] = current
        sq_dist = torch.bmm(columns[rows, :, current].unsqueeze(1), columns)[:, 0]
        sq_dist.mul_(-2.0).add_(squared_norms).add_(squared_norms[rows, current].unsqueeze(1))
        torch.minimum(min_sq_dist, sq_dist, out=min_sq_dist)
        min_sq_dist[rows, current] = -1.0  # never pick the same column twice
        current = min_sq_dist.argmax(dim=1)
    return selected


def coreset(
    features: torch.Tensor, k: int, projection_dim: int | None = None, seed: int = 0, preselect_factor: int | None = None
) -> torch.Tensor:
    """The ``k``-row farthest-point coreset of ``features`` (N, C) as a contiguous float32 copy."""
    index = k_center_greedy(features, k, projection_dim=projection_dim, seed=seed, preselect_factor=preselect_factor)
    log.debug("coreset: %d of %d rows", len(index), features.shape[0])
    return features.detach().float()[index].contiguous()


BYTES_PER_VALUE = 4  # memory rows are float32


def budget_rows(budget_mb: float, dim: int, reserved_bytes: int = 0) -> int:
    """Rows of ``dim`` float32 values that fit in ``budget_mb`` MB after ``reserved_bytes`` (at least 1)."""
    available = budget_mb * 1024 * 1024 - reserved_bytes
    return max(1, int(available // (dim * BYTES_PER_VALUE)))


def memory_rows(n_patches: int, dim: int, memory: MemoryConfig, reserved_bytes: int = 0, size: int | None = None) -> int:
    """Coreset size of one product: ``size`` if given, else ``memory.coreset_ratio`` of the patches,
    capped by what fits in ``memory.budget_mb`` (after ``reserved_bytes`` of other per-product state)."""
    wanted = size if size is not None else max(1, math.ceil(memory.coreset_ratio * n_patches))
    return min(n_patches, wanted, budget_rows(memory.budget_mb, dim, reserved_bytes))


def memory_coreset(
    features: torch.Tensor, memory: MemoryConfig, seed: int = 0, reserved_bytes: int = 0, size: int | None = None
) -> torch.Tensor:
    """Indices of the budgeted, JL-projected k-center-greedy coreset of ``features`` (N, C)."""
    k = memory_rows(features.shape[0], features.shape[1], memory, reserved_bytes, size)
    return k_center_greedy(features, k, projection_dim=memory.projection_dim, seed=seed, preselect_factor=memory.preselect_factor)


def nbytes(tensors: list[torch.Tensor]) -> int:
    """Total bytes of ``tensors``' storage (for the memory report)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))
