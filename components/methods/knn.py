"""Exact nearest-neighbour search over a memory of feature vectors (faiss ``IndexFlatL2``)."""

from __future__ import annotations

import faiss
import numpy as np
import torch


def _as_float32(features: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(features.detach().cpu().float().numpy())


class NearestNeighbours:
    """Exact L2 nearest neighbours of query rows among ``memory`` (M, C) rows.

    Distances are Euclidean (square root of faiss's squared L2), float32.
    """

    def __init__(self, memory: torch.Tensor) -> None:
        if memory.ndim != 2 or memory.shape[0] == 0:
            raise ValueError(f"memory must be a non-empty (M, C) tensor, got shape {tuple(memory.shape)}")
        self.size = int(memory.shape[0])
        self.dim = int(memory.shape[1])
        self.index = faiss.IndexFlatL2(self.dim)
        self.index.add(_as_float32(memory))

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices), each (Q, k): the ``k`` nearest memory rows of every query row."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {tuple(queries.shape)}")
        k = min(k, self.size)
        sq_dist, index = self.index.search(_as_float32(queries), k)
        distances = torch.from_numpy(np.sqrt(np.maximum(sq_dist, 0.0)))
        return distances, torch.from_numpy(index).long()

    def nearest_distance(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q,) distance of every query row to its nearest memory row."""
        return self.search(queries, 1)[0][:, 0]
