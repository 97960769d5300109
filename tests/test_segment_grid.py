"""Label maps on feature grids: mode pooling and nearest resizing never invent label ids."""

from __future__ import annotations

import torch

from components.segment.grid import downsample_label_map, nearest_resize_label_map


def test_downsample_takes_the_cell_mode() -> None:
    labels = torch.zeros(1, 4, 4, dtype=torch.int64)
    labels[0, :2, :2] = torch.tensor([[7, 7], [7, 3]])
    labels[0, 2:, 2:] = 3
    out = downsample_label_map(labels, (2, 2))
    assert out.tolist() == [[[7, 0], [0, 3]]]


def test_downsample_ties_go_to_smallest_id_and_ids_are_never_averaged() -> None:
    labels = torch.tensor([[[1, 9], [9, 1]]])
    assert downsample_label_map(labels, (1, 1)).tolist() == [[[1]]]
    random = torch.randint(0, 50, (3, 37, 29)) * 11
    out = downsample_label_map(random, (8, 8))
    assert out.shape == (3, 8, 8) and out.dtype == torch.int64
    for b in range(3):
        assert set(out[b].unique().tolist()) <= set(random[b].unique().tolist())


def test_downsample_identity_size_and_nearest_resize() -> None:
    labels = torch.randint(0, 5, (2, 6, 6))
    assert torch.equal(downsample_label_map(labels, (6, 6)), labels)
    up = nearest_resize_label_map(labels, (12, 12))
    assert up.shape == (2, 12, 12) and torch.equal(up[:, ::2, ::2], labels)
    big = torch.full((1, 4, 4), 60000)
    assert nearest_resize_label_map(big, (3, 3)).unique().tolist() == [60000]
