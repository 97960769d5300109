"""Synthetic defects on held-out normal TRAINING images: a validation set that reads no test image.

Used to choose and check defaults of the reconstruction methods (``diag_reconstruction``,
``bench_iuf --validation``): every normal image gets ``variants`` copies with one rectangle each, of
5-18 % of the image side (12-40 px at 224 px), either cut from a donor image of the same product,
flipped and pasted elsewhere, or an intensity / colour offset of the region; the mask marks it.
"""

from __future__ import annotations

import torch

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
