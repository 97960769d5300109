"""Image scores by the pruned search (plain and leave-one-out) equal brute-force ones and search fewer patches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.methods import pruned_scores
from components.methods.knn import NearestNeighbours
from components.methods.pruned_scores import image_scores, leave_one_out_image_scores
from components.methods.scoring import score_patches

GRID = (22, 19)


def smooth_features(images: int, channels: int = 12, seed: int = 0) -> torch.Tensor:
    """(B, h*w, C) patch features that vary smoothly over the grid (like a CNN's), plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(images, channels, 5, 4, generator=gen) * 4
    fields = F.interpolate(coarse, size=GRID, mode="bilinear", align_corners=False)
    fields = fields + 0.2 * torch.randn(fields.shape, generator=gen)
    return fields.flatten(2).transpose(1, 2).contiguous()


def memory_of(features: torch.Tensor, rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A memory of ``rows`` random patches of ``features`` and the image each came from."""
    b, n, c = features.shape
    pick = torch.randperm(b * n, generator=torch.Generator().manual_seed(seed))[:rows]
    return features.reshape(-1, c)[pick].contiguous(), pick // n


def brute_force(features: torch.Tensor, memory_rows: torch.Tensor, row_image: torch.Tensor, k: int, top_k: int) -> torch.Tensor:
    """The definition: per patch, the mean distance to its k nearest rows of other images; per image, the mean of the top_k."""
    out = []
    for i, feats in enumerate(features):
        dists = torch.cdist(feats.double(), memory_rows.double())
        dists[:, row_image == i] = float("inf")
        patch = dists.topk(k, dim=1, largest=False).values.mean(dim=1)
        out.append(patch.topk(top_k).values.mean())
    return torch.stack(out).float()


@pytest.mark.parametrize("k,top_k", [(1, 1), (1, 5), (3, 1), (3, 4)])
def test_pruned_search_equals_brute_force_and_searches_fewer_patches(monkeypatch, k, top_k):
    features = smooth_features(8)
    features[3, 5 * GRID[1] + 7] += 40.0  # a defect-like patch off the coarse sub-grid (row 5, column 7)
    memory_rows, row_image = memory_of(features, 300)
    searched = []
    original = pruned_scores.foreign_neighbours

    def counting(queries, *args, **kwargs):
        searched.append(len(queries))
        return original(queries, *args, **kwargs)

    monkeypatch.setattr(pruned_scores, "foreign_neighbours", counting)
    memory = NearestNeighbours(memory_rows)
    pruned = leave_one_out_image_scores(features, memory, memory_rows, row_image, k, top_k, grid=GRID)
    expected = brute_force(features, memory_rows, row_image, k, top_k)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert sum(searched) < 0.5 * features.shape[0] * features.shape[1]  # most patches were never searched
    searched.clear()
    exhaustive = leave_one_out_image_scores(features, memory, memory_rows, row_image, k, top_k)  # no grid: every patch
    assert sum(searched) == features.shape[0] * features.shape[1]
    torch.testing.assert_close(exhaustive, expected, rtol=1e-5, atol=1e-5)
    if top_k == 1:
        assert pruned[3] > 30 and pruned.argmax() == 3  # the off-grid patch decides its image's score


@pytest.mark.parametrize("k,top_k", [(1, 1), (2, 3)])
def test_plain_image_scores_equal_score_patches(monkeypatch, k, top_k):
    features = smooth_features(6, seed=3)
    features[2, 4 * GRID[1] + 8] += 30.0  # off the coarse sub-grid
    memory_rows = smooth_features(4, seed=4).reshape(-1, 12)[::3].contiguous()  # another product's normals
    memory = NearestNeighbours(memory_rows)
    searched = []
    original = pruned_scores.foreign_neighbours
    monkeypatch.setattr(pruned_scores, "foreign_neighbours", lambda q, *a, **kw: searched.append(len(q)) or original(q, *a, **kw))
    pruned = image_scores(features, memory, memory_rows, GRID, k, top_k)
    expected = score_patches(features, memory, memory_rows, reweight=False, num_neighbors=k, top_k=top_k)[1]
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert sum(searched) < 0.5 * features.shape[0] * features.shape[1]
    assert pruned.argmax() == 2


def test_a_grid_that_does_not_fit_the_features_falls_back_to_every_patch():
    features = smooth_features(3)
    memory_rows, row_image = memory_of(features, 120)
    memory = NearestNeighbours(memory_rows)
    got = leave_one_out_image_scores(features, memory, memory_rows, row_image, grid=(5, 5))
    torch.testing.assert_close(got, brute_force(features, memory_rows, row_image, 1, 1), rtol=1e-5, atol=1e-5)


def test_patches_whose_candidates_are_all_their_own_image_are_searched_exhaustively():
    features = smooth_features(3)
    own_rows = features[0].repeat(2, 1)  # image 0 floods the memory: its patches' nearest rows are all its own
    memory_rows = torch.cat([own_rows, features[1, :10], features[2, :10]])
    row_image = torch.cat([torch.zeros(len(own_rows), dtype=torch.long), torch.ones(10, dtype=torch.long), torch.full((10,), 2)])
    memory = NearestNeighbours(memory_rows)
    for k in (1, 3):
        got = leave_one_out_image_scores(features, memory, memory_rows, row_image, k, grid=GRID)
        torch.testing.assert_close(got, brute_force(features, memory_rows, row_image, k, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reweight", [False, True])
def test_unmapped_image_scores_are_score_patches_image_scores(reweight: bool) -> None:
    """What UCAD and the oracle score when no map is needed: the pruned search, or every patch with re-weighting."""
    from components.methods.pruned_scores import unmapped_image_scores

    features = smooth_features(5, seed=7)
    rows, _ = memory_of(smooth_features(6, seed=8), 300)
    memory = NearestNeighbours(rows)
    expected = score_patches(features, memory, rows, reweight, num_neighbors=1)[1]
    got = unmapped_image_scores(features, memory, rows, GRID, reweight)
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)
