"""Image scores without searching every patch: exact, for plain scoring and for leave-one-out calibration.

An image score is the mean of an image's ``top_k`` highest patch scores (1 = the maximum), a patch score
the mean distance to its ``num_neighbors`` nearest memory rows, or, leaving image ``i`` out (calibration:
the memory's own training images, scored as a normal image that was never trained on meets it), its
nearest rows of images other than ``i``. Searching every patch of every image is the costly part of a
fine (stride-4) memory's fit, yet only the few highest patch scores of an image matter. With the patch
grid known, the search is pruned without changing a score:

1. the patches on a coarse sub-grid (every ``COARSE_STEP``-th cell both ways) are searched exactly;
   each keeps its ``CARRIED_ROWS`` nearest rows (of other images, leaving out);
2. every other patch gets an upper bound on its own score from the rows that the coarse patches of its
   block (``BOUND_BLOCK`` coarse cells a side, plus the ring around it) kept: they are rows it may be
   scored against, so the mean distance to the ``num_neighbors`` nearest of them is at least its true
   score;
3. a patch whose bound is below the image's ``top_k``-th highest exact coarse score cannot change the
   image score and is skipped; the rest are searched.

The result equals the exhaustive search up to float rounding (the threshold keeps a slack of
``BOUND_SLACK`` of the largest feature norm). Measured on the leave-one-out calibration of 60 real pcb
images (``benchmarks/bench_pruned_scores.py``, RESULTS section 5): 12-16 % of the patches searched, 4-5x
faster than searching every patch.
Anomaly maps need every patch score: they still come from ``scoring.score_patches``.
"""

from __future__ import annotations

import torch

from components.methods.knn import NearestNeighbours
from components.methods.scoring import score_patches, top_k_mean

# Neighbours fetched per patch beyond those it needs: a patch with too few rows of another image among them (own
# rows come first: its neighbours in the grid) is searched exhaustively; 0.1 % of real pcb's stride-4 patches.
LEAVE_OUT_CANDIDATES = 8
# Cells between the exactly searched patches of the coarse sub-grid, both ways.
COARSE_STEP = 3
# Nearest rows of other images each coarse patch hands to the patches around it as bound candidates.
CARRIED_ROWS = 4
# Margin under the pruning threshold, as a share of the largest feature norm: float32 distances computed as
# |q|^2 + |m|^2 - 2 q.m (faiss and the bounds alike) are off by up to about 1e-3 of it near zero distance.
BOUND_SLACK = 1e-3
# Coarse cells per side of the blocks that share bound candidates (with the ring of coarse cells around them).
BOUND_BLOCK = 4


def foreign_neighbours(queries: torch.Tensor, own: torch.Tensor, memory: NearestNeighbours, memory_rows: torch.Tensor,
                       row_image: torch.Tensor | None, k: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances (Q, k), rows (Q, keep)): each query's ``k`` smallest distances to rows of images other than
    ``own`` (Q,), and the indices of its ``keep`` (>= k) nearest such rows (``row_image`` None: any row).
    Queries whose ``LEAVE_OUT_CANDIDATES + keep`` nearest rows are too few of another image are searched
    exhaustively."""
    if row_image is None:
        dists, index = memory.search(queries, min(memory.size, keep))
        return dists[:, :k], index
    dists, index = memory.search(queries, min(memory.size, LEAVE_OUT_CANDIDATES + keep))
    dists = torch.where(row_image[index] != own[:, None], dists, torch.full_like(dists, float("inf")))
    order = dists.argsort(dim=1)[:, :keep]
    ranked, rows = dists.gather(1, order), index.gather(1, order)
    short = ~torch.isfinite(ranked).all(dim=1)
    if bool(short.any()):  # rare: too few candidates of another image; compute all distances
        lost = short.nonzero().flatten()
        all_d = torch.cdist(queries[lost].float(), memory_rows.float())
        all_d[row_image[None, :].expand(len(lost), -1) == own[lost, None]] = float("inf")
        top = all_d.topk(min(keep, all_d.shape[1]), dim=1, largest=False)
        ranked[lost, : top.values.shape[1]], rows[lost, : top.values.shape[1]] = top.values, top.indices
    return ranked[:, :k], rows


def leave_one_out_image_scores(features: torch.Tensor, memory: NearestNeighbours, memory_rows: torch.Tensor,
                               row_image: torch.Tensor, num_neighbors: int = 1, top_k: int = 1,
                               grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B,) image scores of the memory's own training images, each scored without its own patches.

    ``features`` (B, N, C) are the patch features of the images the memory was built from, image ``i``
    in row ``i``; ``row_image`` (M,) names the image each memory row came from. A patch score is the
    mean distance to its ``num_neighbors`` nearest rows of OTHER images; the image score is the mean of
    its ``top_k`` highest patch scores (1 = the maximum), as ``score_patches`` without re-weighting.
    With ``grid`` (h, w), h * w = N, the row-major patch grid, the search is pruned (module docstring);
    without it every patch is searched.
    """
    return image_scores(features, memory, memory_rows, grid, num_neighbors, top_k, row_image)


def unmapped_image_scores(features: torch.Tensor, memory: NearestNeighbours, memory_rows: torch.Tensor, grid: tuple[int, int] | None,
                          reweight: bool, num_neighbors: int = 1, top_k: int = 1) -> torch.Tensor:
    """(B,) image scores as ``score_patches`` makes them, for a caller that needs no anomaly map: the pruned search
    (``image_scores``), or every patch with ``reweight`` (PatchCore's re-weighted maximum needs every patch score)."""
    if reweight:
        return score_patches(features, memory, memory_rows, True, num_neighbors, top_k)[1]
    return image_scores(features, memory, memory_rows, grid, num_neighbors, top_k)


def image_scores(features: torch.Tensor, memory: NearestNeighbours, memory_rows: torch.Tensor, grid: tuple[int, int] | None,
                 num_neighbors: int = 1, top_k: int = 1, row_image: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) image scores of patch features (B, N, C) against ``memory`` (rows ``memory_rows``): ``score_patches``'
    image scores without re-weighting, or with ``row_image`` (M,) each image ``i`` scored without the rows of
    image ``i``. Pruned with the row-major patch ``grid`` (h, w), h * w = N; every patch searched without it."""
    b, n, c = features.shape
    k = max(1, num_neighbors)
    coarse = _coarse_cells(grid, n)
    if coarse is None or len(coarse[0]) * len(coarse[1]) <= max(top_k, 1):
        own = torch.arange(b).repeat_interleave(n)
        scores = foreign_neighbours(features.reshape(b * n, c), own, memory, memory_rows, row_image, k, k)[0]
        return top_k_mean(scores.mean(dim=1).reshape(b, n), top_k)
    rows_i, cols_j = coarse
    keep = max(k, CARRIED_ROWS)
    cells = (rows_i[:, None] * grid[1] + cols_j[None, :]).flatten()  # (Nc,) coarse cells, row-major
    nc = len(cells)
    own = torch.arange(b).repeat_interleave(nc)
    coarse_d, carried = foreign_neighbours(features[:, cells].reshape(b * nc, c), own, memory, memory_rows, row_image, k, keep)
    patch_scores = torch.full((b, n), float("-inf"))
    patch_scores[:, cells] = coarse_d.mean(dim=1).reshape(b, nc)
    threshold = patch_scores[:, cells].topk(top_k, dim=1).values[:, -1]
    threshold = threshold - BOUND_SLACK * max(float(features.norm(dim=-1).max()), float(memory_rows.norm(dim=-1).max()))
    bound = _bounds(features, carried.reshape(b, len(rows_i), len(cols_j), keep), grid, memory_rows, k)  # (b, N)
    bound[:, cells] = float("-inf")  # searched already
    todo = (bound > threshold[:, None]).nonzero()
    if len(todo):
        exact = foreign_neighbours(features[todo[:, 0], todo[:, 1]], todo[:, 0], memory, memory_rows, row_image, k, k)[0]
        patch_scores[todo[:, 0], todo[:, 1]] = exact.mean(dim=1)
    return top_k_mean(patch_scores, top_k)


def _coarse_cells(grid: tuple[int, int] | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Row and column indices of the coarse sub-grid (None: no usable grid)."""
    if grid is None or grid[0] * grid[1] != n or min(grid) < 2:
        return None
    return torch.arange(0, grid[0], COARSE_STEP), torch.arange(0, grid[1], COARSE_STEP)


def _bounds(features: torch.Tensor, carried: torch.Tensor, grid: tuple[int, int], memory_rows: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) upper bounds of the patch scores, block by block of the grid: a cell's bound is the mean distance to
    the ``k`` nearest DISTINCT rows that the coarse cells of its block and the ring around it carried (``carried``
    (B, hc, wc, K); all of other images, so never nearer than the cell's true ``k`` nearest rows of other images)."""
    b, n, c = features.shape
    h, w = grid
    span = BOUND_BLOCK * COARSE_STEP  # cells per block side
    cells = features.reshape(b, h, w, c)
    out = torch.empty(b, h, w)
    for top in range(0, h, span):
        for left in range(0, w, span):
            ci, cj = top // COARSE_STEP, left // COARSE_STEP
            rows = carried[:, max(0, ci - 1): ci + BOUND_BLOCK + 1, max(0, cj - 1): cj + BOUND_BLOCK + 1].reshape(b, -1)
            if k > 1:  # a row carried by two coarse cells must count once
                rows = rows.sort(dim=1).values
            cand = memory_rows[rows].float()  # (B, R, C)
            block = cells[:, top: top + span, left: left + span]
            bh, bw = block.shape[1:3]
            block = block.reshape(b, bh * bw, c).float()
            sq = (block * block).sum(-1, keepdim=True) + (cand * cand).sum(-1)[:, None, :]
            dists = torch.baddbmm(sq, block, cand.transpose(1, 2), alpha=-2.0).clamp_min_(0).sqrt_()
            if k > 1:
                dists[:, :, 1:][(rows[:, 1:] == rows[:, :-1])[:, None, :].expand(-1, bh * bw, -1)] = float("inf")
            out[:, top: top + bh, left: left + bw] = dists.topk(k, dim=-1, largest=False).values.mean(-1).reshape(b, bh, bw)
    return out.reshape(b, n)
