"""Defect painters: each changes a rendered scene locally and returns the exact defect mask.

``severity`` in (0, 1] scales size and contrast, so a product's defects range from obvious
(large, high-contrast) to subtle (small, low-contrast). Every painter returns
``(image, defect_mask, foreground)``; the mask is exactly the set of pixels the defect occupies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from components.data.synthetic.canvas import Array, edge_pixels, eroded, irregular_blob, mix, polyline_mask, random_pixel, smooth_noise
from components.data.synthetic.scene import Scene

MIN_DEFECT_PIXELS = 8
MAX_ATTEMPTS = 25
TEXTURE_MARGIN = 14
Painted = tuple[Array, Array, Array | None]
Painter = Callable[[np.random.Generator, Scene, float], Painted]

DIRT_COLOURS = ((0.35, 0.22, 0.10), (0.55, 0.35, 0.12), (0.15, 0.15, 0.12), (0.45, 0.45, 0.30))


def _region(scene: Scene) -> Array:
    """Where a defect may be centred: the object interior, or the texture away from the border."""
    size = scene.image.shape[0]
    if scene.foreground is not None:
        return eroded(scene.foreground, 3)
    region = np.zeros((size, size), dtype=bool)
    region[TEXTURE_MARGIN:-TEXTURE_MARGIN, TEXTURE_MARGIN:-TEXTURE_MARGIN] = True
    return region


def _on_product(scene: Scene, mask: Array) -> Array:
    return mask & scene.foreground if scene.foreground is not None else mask


def _curve(rng: np.random.Generator, start: tuple[float, float], length: float, bend: float) -> Array:
    """Points of a gently bent quadratic Bezier of the given length from ``start``."""
    angle = rng.uniform(0, 2 * np.pi)
    p0 = np.array(start, dtype=np.float32)
    p2 = p0 + length * np.array([np.sin(angle), np.cos(angle)], dtype=np.float32)
    normal = np.array([np.cos(angle), -np.sin(angle)], dtype=np.float32)
    p1 = (p0 + p2) / 2 + normal * rng.uniform(-bend, bend) * length
    t = np.linspace(0, 1, 16, dtype=np.float32)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _random_walk(rng: np.random.Generator, start: tuple[float, float], steps: int, step: float) -> Array:
    angle = rng.uniform(0, 2 * np.pi)
    points = [np.array(start, dtype=np.float32)]
    for _ in range(steps):
        angle += rng.normal(0, 0.5)
        points.append(points[-1] + step * np.array([np.sin(angle), np.cos(angle)], dtype=np.float32))
    return np.stack(points)


def scratch(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A thin bright or dark curved line."""
    size = scene.image.shape[0]
    points = _curve(rng, random_pixel(rng, _region(scene)), (0.08 + 0.22 * severity) * size, 0.3)
    mask = _on_product(scene, polyline_mask(size, points, 1.0 + 2.0 * severity))
    delta = (0.05 + 0.35 * severity) * (1 if rng.random() < 0.5 else -1)
    image = np.where(mask[..., None], np.clip(scene.image + delta, 0, 1), scene.image)
    return image, mask, scene.foreground


def cut(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A slit through the material: a line where the backing shows through."""
    size = scene.image.shape[0]
    points = _curve(rng, random_pixel(rng, _region(scene)), (0.06 + 0.16 * severity) * size, 0.1)
    mask = _on_product(scene, polyline_mask(size, points, 1.5 + 2.5 * severity))
    return _show_backdrop(scene, mask, 0.4 + 0.6 * severity)


def _show_backdrop(scene: Scene, mask: Array, opacity: float) -> Painted:
    image = np.where(mask[..., None], mix(scene.image, scene.backdrop, np.full(mask.shape, opacity, np.float32)), scene.image)
    foreground = scene.foreground & ~mask if scene.foreground is not None else None
    return image, mask, foreground


def hole(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A hole through the product (backing / conveyor visible), with a darkened rim."""
    size = scene.image.shape[0]
    cy, cx = random_pixel(rng, _region(scene))
    mask = _on_product(scene, irregular_blob(size, cy, cx, max(2.5, (0.012 + 0.035 * severity) * size), rng, 0.25))
    image, mask, foreground = _show_backdrop(scene, mask, 0.55 + 0.45 * severity)
    rim = edge_pixels(mask)
    image = np.where(rim[..., None], image * 0.75, image)
    return image, mask, foreground


def crack(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A jagged dark fracture line, sometimes with a branch."""
    size = scene.image.shape[0]
    start = random_pixel(rng, _region(scene))
    steps = int(8 + 18 * severity)
    main = _random_walk(rng, start, steps, 3.0 * size / 256)
    width = 1.0 + 1.5 * severity
    mask = polyline_mask(size, main, width)
    if rng.random() < 0.5:
        branch_start = main[len(main) // 2]
        mask |= polyline_mask(size, _random_walk(rng, (float(branch_start[0]), float(branch_start[1])), steps // 2, 3.0 * size / 256), width * 0.8)
    mask = _on_product(scene, mask)
    darkness = 0.25 + 0.55 * severity
    image = np.where(mask[..., None], scene.image * (1 - darkness), scene.image)
    return image, mask, scene.foreground


def _tint(rng: np.random.Generator, scene: Scene, severity: float, colour: Array) -> Painted:
    size = scene.image.shape[0]
    cy, cx = random_pixel(rng, _region(scene))
    mask = _on_product(scene, irregular_blob(size, cy, cx, max(3.0, (0.03 + 0.07 * severity) * size), rng, 0.4))
    alpha = 0.12 + 0.45 * severity
    mottling = np.clip(alpha * (1 + 0.05 * smooth_noise(rng, mask.shape[0], 2.0)), 0.05, 1)
    tinted = mix(scene.image, np.broadcast_to(colour, scene.image.shape), mottling.astype(np.float32))
    image = np.where(mask[..., None], tinted, scene.image)
    return image, mask, scene.foreground


def stain(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A semi-transparent dirt / rust / oil blotch."""
    colour = np.asarray(DIRT_COLOURS[rng.integers(len(DIRT_COLOURS))], dtype=np.float32)
    return _tint(rng, scene, severity, colour)


def colour(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A discoloured patch (paint / dye defect) in an unrelated colour."""
    tint = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    return _tint(rng, scene, severity, tint)


def contamination(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """One to three opaque foreign particles."""
    size = scene.image.shape[0]
    region = _region(scene)
    mask = np.zeros(region.shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = random_pixel(rng, region)
        mask |= irregular_blob(size, cy, cx, max(2.0, (0.008 + 0.025 * severity) * size), rng, 0.5)
    mask = _on_product(scene, mask)
    particle = np.asarray(DIRT_COLOURS[rng.integers(len(DIRT_COLOURS))], dtype=np.float32) * rng.uniform(0.4, 1.0)
    alpha = np.full(mask.shape, 0.55 + 0.45 * severity, np.float32)
    image = np.where(mask[..., None], mix(scene.image, np.broadcast_to(particle, scene.image.shape), alpha), scene.image)
    return image, mask, scene.foreground


def thread(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A stray fibre / hair lying on the surface."""
    size = scene.image.shape[0]
    points = _curve(rng, random_pixel(rng, _region(scene)), (0.12 + 0.3 * severity) * size, 0.5)
    mask = _on_product(scene, polyline_mask(size, points, 1.0 + 1.5 * severity))
    fibre = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    alpha = np.full(mask.shape, 0.35 + 0.6 * severity, np.float32)
    image = np.where(mask[..., None], mix(scene.image, np.broadcast_to(fibre, scene.image.shape), alpha), scene.image)
    return image, mask, scene.foreground


def missing_part(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A chunk broken off the object's outline (conveyor visible where material was)."""
    assert scene.foreground is not None, "missing_part needs an object product"
    size = scene.image.shape[0]
    cy, cx = random_pixel(rng, edge_pixels(scene.foreground))
    mask = irregular_blob(size, cy, cx, max(3.0, (0.03 + 0.07 * severity) * size), rng, 0.3) & scene.foreground
    image = np.where(mask[..., None], scene.backdrop, scene.image)
    return image, mask, scene.foreground & ~mask


def extra_part(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """Surplus material (burr / flash) protruding from the object's outline."""
    assert scene.foreground is not None, "extra_part needs an object product"
    size = scene.image.shape[0]
    cy, cx = random_pixel(rng, edge_pixels(scene.foreground))
    mask = irregular_blob(size, cy, cx, max(3.0, (0.02 + 0.05 * severity) * size), rng, 0.4) & ~scene.foreground
    shade = 0.7 + 0.03 * smooth_noise(rng, mask.shape[0], 1.5)
    burr = np.asarray(scene.material, np.float32) * shade[..., None]
    image = np.where(mask[..., None], burr, scene.image)
    return image, mask, scene.foreground | mask


def bent(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A local deformation: the pattern is pushed sideways inside a disc."""
    size = scene.image.shape[0]
    cy, cx = random_pixel(rng, _region(scene))
    radius = max(5.0, (0.06 + 0.08 * severity) * size)
    shift = 1.5 + 5.0 * severity
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    profile = np.clip(1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2, 0, 1) ** 2
    dy, dx = shift * profile * np.sin(angle), shift * profile * np.cos(angle)
    warped = np.stack([ndimage.map_coordinates(scene.image[..., c], [yy - dy, xx - dx], order=1, mode="reflect") for c in range(3)], axis=-1)
    mask = _on_product(scene, shift * profile >= 0.5)
    image = np.where(mask[..., None], warped, scene.image)
    return image.astype(np.float32), mask, scene.foreground


def dent(rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """A shallow dent: shading darkens on one side of a small blob and brightens on the other."""
    size = scene.image.shape[0]
    cy, cx = random_pixel(rng, _region(scene))
    radius = max(3.0, (0.03 + 0.06 * severity) * size)
    mask = _on_product(scene, irregular_blob(size, cy, cx, radius, rng, 0.2))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    slope = ((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)) / radius
    gain = 1 + (0.1 + 0.35 * severity) * np.clip(slope, -1, 1) - 0.08 * severity
    image = np.where(mask[..., None], np.clip(scene.image * gain[..., None], 0, 1), scene.image)
    return image, mask, scene.foreground


PAINTERS: dict[str, Painter] = {
    "scratch": scratch,
    "cut": cut,
    "hole": hole,
    "broken": hole,
    "crack": crack,
    "stain": stain,
    "glue": stain,
    "colour": colour,
    "contamination": contamination,
    "thread": thread,
    "missing_part": missing_part,
    "extra_part": extra_part,
    "bent": bent,
    "dent": dent,
}


def paint_defect(kind: str, rng: np.random.Generator, scene: Scene, severity: float) -> Painted:
    """Apply defect ``kind``; redraws until the defect covers at least ``MIN_DEFECT_PIXELS`` pixels."""
    painter = PAINTERS[kind]
    for _ in range(MAX_ATTEMPTS):
        image, mask, foreground = painter(rng, scene, severity)
        if int(mask.sum()) >= MIN_DEFECT_PIXELS:
            return image.astype(np.float32), mask, foreground
    raise RuntimeError(f"defect {kind!r} stayed below {MIN_DEFECT_PIXELS} pixels after {MAX_ATTEMPTS} attempts")
