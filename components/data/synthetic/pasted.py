"""Synthetic defects pasted on normal TRAINING images (model-input tensors): a validation set that reads no test image.

Used for the escape-rate estimate of every calibration (``components.eval.thresholds``,
``synthetic_defect_batch``), for the per-task feature choice (``components.methods.feature_choice``) and to choose
and check defaults (``benchmarks/diag_reconstruction``, ``bench_iuf --validation``). ``synthetic_defects``: every normal image gets ``variants`` copies with
one rectangle each, of 5-18 % of the image side (12-40 px at 224 px), either cut from a donor image of
the same product, flipped and pasted elsewhere, or an intensity / colour offset of the region.
``line_defects``: 1-3 thin strokes in the image's own extreme values (scratches, cracks, opens and
shorts: defects a few pixels wide). The masks mark what changed.
"""

from __future__ import annotations

import torch

from components.types import ImageBatch

SIDE_FRACTION = (12 / 224, 40 / 224)  # rectangle side range as a fraction of the image side


def synthetic_defects(normals: torch.Tensor, donors: torch.Tensor, variants: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, masks): ``variants`` copies of every (ImageNet-normalised) normal with one pasted / shifted rectangle each."""
    out, masks = [], []
    n, _, h, w = normals.shape
    low, high = round(SIDE_FRACTION[0] * h), round(SIDE_FRACTION[1] * h) + 1
    for i in range(n):
        for v in range(variants):
            img = normals[i].clone()
            mask = torch.zeros(h, w, dtype=torch.uint8)
            ph, pw = (int(torch.randint(low, high, (1,), generator=generator)) for _ in range(2))
            y, x = int(torch.randint(0, h - ph, (1,), generator=generator)), int(torch.randint(0, w - pw, (1,), generator=generator))
            if v % 2 == 0:  # cut-paste from another image, flipped
                d = donors[int(torch.randint(0, len(donors), (1,), generator=generator))]
                sy, sx = int(torch.randint(0, h - ph, (1,), generator=generator)), int(torch.randint(0, w - pw, (1,), generator=generator))
                img[:, y : y + ph, x : x + pw] = d[:, sy : sy + ph, sx : sx + pw].flip(-1).flip(-2)
            else:  # intensity / colour offset
                shift = (torch.rand(3, 1, 1, generator=generator) - 0.5) * 3.0
                img[:, y : y + ph, x : x + pw] = img[:, y : y + ph, x : x + pw] * 0.6 + shift
            mask[y : y + ph, x : x + pw] = 1
            out.append(img)
            masks.append(mask)
    return torch.stack(out), torch.stack(masks)


LINE_LENGTH_FRACTION = (0.08, 0.25)  # stroke length range as a fraction of the image side
LINE_WIDTH_FRACTION = (1 / 224, 3 / 224)  # stroke width range as a fraction of the image side


def line_defects(normals: torch.Tensor, variants: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, masks): ``variants`` copies of every normal with 1-3 thin straight strokes each (scratches,
    cracks, opens / shorts): 8-25 % of the side long, 1-3 px wide at 224 px, painted with the image's own
    darkest or brightest value (1st / 99th percentile per channel), whichever the stroke's region is
    farther from (so it is visible); the mask marks the strokes."""
    out, masks = [], []
    n, _, h, w = normals.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for i in range(n):
        flat = normals[i].flatten(1)
        dark, bright = flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)
        for _ in range(variants):
            img = normals[i].clone()
            mask = torch.zeros(h, w, dtype=torch.bool)
            for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
                y0, x0 = float(torch.rand(1, generator=generator)) * h, float(torch.rand(1, generator=generator)) * w
                frac = LINE_LENGTH_FRACTION[0] + float(torch.rand(1, generator=generator)) * (LINE_LENGTH_FRACTION[1] - LINE_LENGTH_FRACTION[0])
                angle = float(torch.rand(1, generator=generator)) * torch.pi
                dy, dx = torch.sin(torch.tensor(angle)) * frac * h, torch.cos(torch.tensor(angle)) * frac * w
                half = (LINE_WIDTH_FRACTION[0] + float(torch.rand(1, generator=generator)) * (LINE_WIDTH_FRACTION[1] - LINE_WIDTH_FRACTION[0])) * h / 2
                # distance of every pixel to the segment (y0, x0) -> (y0 + dy, x0 + dx)
                t = (((yy - y0) * dy + (xx - x0) * dx) / float(dy * dy + dx * dx)).clamp(0, 1)
                dist = torch.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
                stroke = dist <= max(half, 0.5)
                region = img[:, stroke].mean(dim=1)  # paint the extreme the region is farther from (visible)
                colour = dark if float((region - dark).abs().sum()) > float((region - bright).abs().sum()) else bright
                img[:, stroke] = colour[:, None]
                mask |= stroke
            out.append(img)
            masks.append(mask.to(torch.uint8))
    return torch.stack(out), torch.stack(masks)


def synthetic_defect_batch(heldout: ImageBatch, variants: int, seed: int) -> ImageBatch | None:
    """Synthetic defects pasted on ``heldout``'s images (rectangles from the same product's other images or
    intensity offsets, and thin strokes), depth copied; None for ``variants`` = 0."""
    if variants <= 0 or len(heldout) == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    per_image = max(1, variants - 1)  # rectangle copies per normal; one stroke copy besides
    images, products, depth = [], [], []
    for product in sorted(set(heldout.products)):
        rows = torch.tensor([i for i, p in enumerate(heldout.products) if p == product])
        normals = heldout.images[rows]
        pasted = synthetic_defects(normals, normals, per_image, generator)[0]
        strokes = line_defects(normals, 1, generator)[0]
        images += [pasted, strokes]
        products += [product] * (len(pasted) + len(strokes))
        if heldout.depth is not None:
            d = heldout.depth[rows]
            depth += [d.repeat_interleave(per_image, dim=0), d]
    return ImageBatch(images=torch.cat(images), products=products, paths=[""] * len(products),
                      depth=torch.cat(depth) if depth else None)
