"""The image score option (``ucad.image_top_k``): max by default, bit-identical; top-k mean otherwise."""

from __future__ import annotations

import pytest
import torch

from components.methods.knn import NearestNeighbours
from components.methods.pruned_scores import leave_one_out_image_scores
from components.methods.scoring import score_patches, top_k_mean


def test_top_k_mean_is_the_max_at_one_and_the_mean_of_the_highest_k() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.4]])
    assert torch.equal(top_k_mean(scores, 1), scores.max(dim=1).values)
    assert torch.allclose(top_k_mean(scores, 2), torch.tensor([0.8, 0.6]))
    assert torch.allclose(top_k_mean(scores, 99), scores.mean(dim=1))  # k beyond the patch count: all patches
    with pytest.raises(ValueError, match="top_k"):
        top_k_mean(scores, 0)


def test_score_patches_default_is_unchanged_and_top_k_ranks_spread_defects_higher() -> None:
    generator = torch.Generator().manual_seed(0)
    memory_rows = torch.randn(64, 8, generator=generator)
    memory = NearestNeighbours(memory_rows)
    feats = memory_rows[torch.randint(0, 64, (2, 16), generator=generator)] + 0.01 * torch.randn(2, 16, 8, generator=generator)
    far = torch.full((8,), 20.0 / 8**0.5)  # far outside the memory (norm 20)
    feats[0, 0] = far  # image 0: one far patch
    feats[1, :4] = 0.9 * far  # image 1: four slightly nearer patches (a larger defect)
    patch, image, _ = score_patches(feats, memory, memory_rows, reweight=False)
    assert torch.equal(image, patch.max(dim=1).values)
    _, image4, _ = score_patches(feats, memory, memory_rows, reweight=False, top_k=4)
    assert image[0] > image[1] and image4[1] > image4[0]
    with pytest.raises(ValueError, match="reweight"):
        score_patches(feats, memory, memory_rows, reweight=True, top_k=4)
    row_image = torch.arange(64) // 16
    one = leave_one_out_image_scores(memory_rows.reshape(4, 16, 8), memory, memory_rows, row_image)
    four = leave_one_out_image_scores(memory_rows.reshape(4, 16, 8), memory, memory_rows, row_image, top_k=4)
    assert (four <= one).all() and not torch.equal(four, one)
