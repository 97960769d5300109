"""Tiled scoring at native resolution: a backbone wrapper that encodes overlapping tiles and stitches them.

High-resolution products (thin defects on 512 px board scans) lose their defects when squashed to
the backbone's usual input size. With ``data.image_size`` at the native resolution and
``data.tile = T`` the wrapper cuts every image into overlapping T x T tiles (``data.tile_overlap``
pixels of overlap, tile starts on the patch stride), encodes each tile with the inner backbone and
stitches the tiles' patch features cell by cell onto the full-resolution patch grid. Where tiles
overlap (``tile_overlap`` > 0, or a last tile flush with the image edge when the image is not a multiple
of the tile) a cell is a weighted mean of the tiles covering it, each weighted by 1 + the cell's distance
in cells to that tile's nearest cut edge (an edge inside the image; the image's own border does not
count): a feature computed next to a cut sees the network's zero padding instead of the image there,
which shows in the map as a seam, so the tile that sees the cell from its interior dominates. Tiles that
do not overlap (``tile_overlap`` 0 and an image a multiple of the tile, e.g. ``tile: auto``) are copied
cell by cell. Everything
downstream (coresets, nearest neighbours, anomaly maps at input resolution, image score = max of the
stitched map) is unchanged. Task keys use one un-tiled pass of the image resized to T x T (routing
needs the product, not the defect). A tile that covers the image is exactly the single pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from components.backbones.base import PromptedBackbone, TaskPrompt
from components.config import ConfigError


def tile_starts(size: int, tile: int, overlap: int, stride: int) -> list[int]:
    """Pixel offsets of overlapping tiles along one side: multiples of ``stride``, the last flush with the edge."""
    if tile >= size:
        return [0]
    step = max(stride, ((tile - overlap) // stride) * stride)
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


class TiledBackbone(PromptedBackbone):
    """``inner`` (built for ``tile`` px inputs) applied to overlapping tiles of larger images."""

    def __init__(self, inner: PromptedBackbone, tile: int, overlap: int) -> None:
        super().__init__()
        cells = inner.grid_size(tile)[0]
        if tile % cells:
            raise ConfigError(f"data.tile={tile} must be a multiple of the backbone's patch stride")
        if not 0 <= overlap < tile:
            raise ConfigError(f"data.tile_overlap={overlap} must be in [0, data.tile={tile})")
        self.inner = inner
        self.tile = tile
        self.overlap = overlap
        self.stride = tile // cells
        self.feature_dim = inner.feature_dim
        self.key_dim = inner.key_dim

    def grid_size(self, image_size: int) -> tuple[int, int]:
        if image_size <= self.tile:
            return self.inner.grid_size(image_size)
        if image_size % self.stride:
            raise ConfigError(f"data.image_size={image_size} must be a multiple of the patch stride {self.stride} when tiling")
        return image_size // self.stride, image_size // self.stride

    def with_features(self, layer: int | None = None, span: int | None = None, dim: int | None = None) -> PromptedBackbone:
        """The inner backbone with other feature settings, tiled the same way (the patch stride follows them)."""
        inner = self.inner.with_features(layer, span, dim)
        return self if inner is self.inner else TiledBackbone(inner, self.tile, self.overlap)

    def new_prompt(self) -> TaskPrompt:
        return self.inner.new_prompt()

    def key_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] > self.tile:
            images = F.interpolate(images, size=(self.tile, self.tile), mode="bilinear", align_corners=False, antialias=True)
        return self.inner.key_features(images)

    def features(self, images: torch.Tensor, prompt: TaskPrompt | None = None) -> torch.Tensor:
        if images.shape[-2] <= self.tile and images.shape[-1] <= self.tile:
            return self.inner.features(images, prompt)
        return self._stitched(images, [self], lambda tile: [self.inner.features(tile, prompt)])[0]

    def features_of_views(self, images: torch.Tensor, views: list[tuple[PromptedBackbone, TaskPrompt | None]]) -> list[torch.Tensor]:
        """Each tile cut once and encoded by the inner backbone's ``features_of_views`` for every view (tiled the same
        way, cutting the same tiles), then stitched per view; separate calls otherwise."""
        h, w = images.shape[-2:]
        tiled = [view for view, _ in views if isinstance(view, TiledBackbone) and (view.tile, view.overlap) == (self.tile, self.overlap)]
        if len(tiled) < len(views) or len({tuple(map(tuple, v._starts(h, w))) for v in tiled}) > 1:
            return super().features_of_views(images, views)
        inner_views = [(view.inner, prompt) for view, prompt in views]
        if h <= self.tile and w <= self.tile:
            return self.inner.features_of_views(images, inner_views)
        return self._stitched(images, tiled, lambda tile: self.inner.features_of_views(tile, inner_views))

    def _starts(self, h: int, w: int) -> tuple[list[int], list[int]]:
        """Pixel offsets of the tiles along the height and the width."""
        return tile_starts(h, self.tile, self.overlap, self.stride), tile_starts(w, self.tile, self.overlap, self.stride)

    def _stitched(self, images: torch.Tensor, views: list["TiledBackbone"], encode: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        """(B, N, C) features of ``images`` for each of ``views`` (this wrapper's tiles): ``encode`` maps a tile batch to
        the views' tile features, which are stitched cell by cell onto each view's full-resolution grid."""
        b, _, h, w = images.shape
        ys, xs = self._starts(h, w)
        overlapping = len(ys) * self.tile > h or len(xs) * self.tile > w  # also with overlap 0: a flush last tile
        totals, counts = [], []
        for view in views:
            grid_h, grid_w = h // view.stride, w // view.stride
            totals.append(images.new_zeros(b, view.feature_dim, grid_h, grid_w))
            counts.append(images.new_zeros(1, 1, grid_h, grid_w))
        for y in ys:
            for x in xs:
                encoded = encode(images[:, :, y : y + self.tile, x : x + self.tile])
                for view, feats, total, count in zip(views, encoded, totals, counts):
                    cells = self.tile // view.stride
                    gy, gx = y // view.stride, x // view.stride
                    tile_feats = feats.transpose(1, 2).reshape(b, -1, cells, cells)
                    weight = self._cut_weight(cells, gy, gx, *total.shape[-2:]).to(tile_feats) if overlapping else 1.0  # x 1.0: exact
                    total[:, :, gy : gy + cells, gx : gx + cells] += tile_feats * weight
                    count[:, :, gy : gy + cells, gx : gx + cells] += weight
        return [(total / count).flatten(2).transpose(1, 2) for total, count in zip(totals, counts)]

    @staticmethod
    def _cut_weight(cells: int, gy: int, gx: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """(cells, cells) stitching weight of a tile starting at cell (gy, gx): 1 + each cell's distance in cells
        to the tile's nearest edge that cuts the image (edges on the image border are not cuts)."""
        index = torch.arange(cells, dtype=torch.float32)
        far = torch.full((cells,), float(cells))

        def along(start: int, size: int) -> torch.Tensor:
            before = index if start > 0 else far
            after = cells - 1 - index if start + cells < size else far
            return torch.minimum(before, after)

        return 1.0 + torch.minimum(along(gy, grid_h)[:, None], along(gx, grid_w)[None, :])


def tiled_backbone(inner_for_tile: PromptedBackbone, image_size: int, tile: int | None, overlap: int) -> PromptedBackbone:
    """``inner_for_tile`` (built for ``tile`` px) wrapped for tiling when ``tile`` is set and below ``image_size``."""
    if tile is None or tile >= image_size:
        return inner_for_tile
    return TiledBackbone(inner_for_tile, tile, overlap)
