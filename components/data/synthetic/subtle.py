"""Subtle synthetic defects painted on real normal images: the validation protocol's second defect set.

The pasted set (``components.data.synthetic.pasted``) is easy by construction: a flipped donor rectangle or
an intensity offset of 12-40 px at 224 px, and strokes in the image's own extreme values. On a regular
texture every such defect scores above every held-out normal, so the protocol cannot tell settings apart
there. This set paints the synthetic products' defect kinds (``components.data.synthetic.defects``:
scratch, crack, local deformation, dent shading, stain, particles, thread) onto real normals at a low to
moderate severity (``SEVERITY``), three per normal, each kind equally often. A grey image (all channels
equal) gets grey defects: a monochrome camera cannot see a tint. Masks mark the pixels that visibly
changed (by more than ``VISIBLE`` in some channel, inside the painter's mask); a defect with fewer than
``MIN_DEFECT_PIXELS`` such pixels (a deformation of a smooth surface, a stain on a matching colour) is
drawn again, so every defect is a visible change.

Images come in and go out ImageNet-normalised, as the loaders produce them; painting happens in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from components.data.loading import IMAGENET_MEAN, IMAGENET_STD
from components.data.synthetic.defects import MAX_ATTEMPTS, MIN_DEFECT_PIXELS, paint_defect
from components.data.synthetic.scene import Scene

SUBTLE_KINDS = ("scratch", "crack", "bent", "dent", "stain", "contamination", "thread")
SEVERITY = (0.15, 0.5)  # severity drawn uniformly in this range (1.0 is the painters' most visible)
PER_NORMAL = 3  # subtle defects painted per validation normal (kinds taken in turn over the whole batch)
GREY_TOLERANCE = 2.0 / 255.0  # an image whose channels differ by at most this everywhere is grey
VISIBLE = 10.0 / 255.0  # a pixel counts as changed when some channel moved by more than this


def _scene(image: np.ndarray) -> Scene:
    """A texture scene (no foreground: defects anywhere away from the border) of an (S, S, 3) [0, 1] image;
    the backdrop (unused by the subtle kinds) is the image darkened."""
    return Scene(image=image, foreground=None, backdrop=image * 0.3, material=tuple(float(v) for v in image.reshape(-1, 3).mean(axis=0)))


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.abs(image - image.mean(axis=-1, keepdims=True)).max() <= GREY_TOLERANCE)


def _visible_defect(kind: str, rng: np.random.Generator, scene: Scene, grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask of its visibly changed pixels) of one ``kind`` defect at a random ``SEVERITY``."""
    for _ in range(MAX_ATTEMPTS):
        painted, mask, _ = paint_defect(kind, rng, scene, float(rng.uniform(*SEVERITY)))
        if grey:
            painted = np.repeat(painted.mean(axis=-1, keepdims=True), 3, axis=-1)
        mask = mask & (np.abs(painted - scene.image).max(axis=-1) > VISIBLE)
        if int(mask.sum()) >= MIN_DEFECT_PIXELS:
            return np.where(mask[..., None], painted, scene.image), mask
    raise RuntimeError(f"subtle defect {kind!r} stayed below {MIN_DEFECT_PIXELS} visible pixels after {MAX_ATTEMPTS} attempts")


def subtle_defects(normals: torch.Tensor, generator: torch.Generator, per_normal: int = PER_NORMAL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(images, masks, index of the normal each came from, kind of each): ``per_normal`` subtle defects on
    every (ImageNet-normalised, square) normal of ``normals``."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    plain = (normals * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    images, masks, source, kinds = [], [], [], []
    for i, image in enumerate(plain):
        grey = _is_grey(image)
        scene = _scene(image)
        for v in range(per_normal):
            kind = SUBTLE_KINDS[(i * per_normal + v) % len(SUBTLE_KINDS)]
            painted, mask = _visible_defect(kind, rng, scene, grey)
            images.append(torch.from_numpy(np.ascontiguousarray(painted, dtype=np.float32)).permute(2, 0, 1))
            masks.append(torch.from_numpy(mask.astype(np.uint8)))
            source.append(i)
            kinds.append(kind)
    return (torch.stack(images) - IMAGENET_MEAN) / IMAGENET_STD, torch.stack(masks), torch.tensor(source), kinds
