"""Object products: one part on a dark conveyor (washer, bottle cap, screw, dowel pin, hex nut).

Each renderer returns the image, the exact foreground mask and the backdrop without the object.
Normal variation: position and rotation jitter, lighting direction, surface noise.
"""

from __future__ import annotations

import numpy as np
from components.data.synthetic.canvas import Array, blur, colour_image, coords, rotated, smooth_noise
from components.data.synthetic.scene import Scene, Style


def _conveyor(rng: np.random.Generator, size: int, colour: tuple[float, float, float]) -> Array:
    texture = 1.0 + 0.05 * smooth_noise(rng, size, 3.0) + 0.04 * smooth_noise(rng, size, 25.0)
    return colour_image(colour, size) * texture[..., None]


def _compose(rng: np.random.Generator, size: int, backdrop: Array, body: Array, fg: Array, material: tuple[float, float, float]) -> Scene:
    """Object over backdrop with a soft contact shadow; the shadow is part of the backdrop."""
    shift = int(rng.integers(2, 6))
    shadow = blur(np.roll(fg.astype(np.float32), (shift, shift), axis=(0, 1)), 5.0)
    backdrop = backdrop * (1.0 - 0.35 * shadow)[..., None]
    image = np.where(fg[..., None], body, backdrop)
    return Scene(np.clip(image, 0, 1).astype(np.float32), fg, np.clip(backdrop, 0, 1).astype(np.float32), material)


def _centre(rng: np.random.Generator, size: int, jitter: float = 0.06) -> tuple[float, float]:
    return size / 2 + rng.uniform(-jitter, jitter) * size, size / 2 + rng.uniform(-jitter, jitter) * size


def washer(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Flat steel washer: annulus with anisotropic highlight and fine turning grooves."""
    metal, belt = style.colours[:2]
    yy, xx = coords(size)
    cy, cx = _centre(rng, size)
    outer = 0.30 * size * style.scale * rng.uniform(0.98, 1.02)
    inner = outer * 0.45
    rho = np.hypot(yy - cy, xx - cx)
    phi = np.arctan2(yy - cy, xx - cx)
    light = rng.uniform(0, 2 * np.pi)
    tone = 0.62 + 0.22 * np.cos(2 * (phi - light)) + 0.04 * np.sin(2 * np.pi * rho / 3.0) + 0.03 * smooth_noise(rng, size, 2.0)
    bevel = np.clip(np.minimum(outer - rho, rho - inner) / 4.0, 0.4, 1.0)
    fg = (rho < outer) & (rho > inner)
    body = colour_image(metal, size) * (tone * bevel)[..., None]
    return _compose(rng, size, _conveyor(rng, size, belt), body, fg, metal)


def bottle_cap(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Crown-style bottle cap seen from above: knurled rim, domed painted top, a printed ring."""
    paint, ring_ink, belt = style.colours[:3]
    yy, xx = coords(size)
    cy, cx = _centre(rng, size)
    radius = 0.29 * size * style.scale * rng.uniform(0.98, 1.02)
    rho = np.hypot(yy - cy, xx - cx)
    phi = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    rim = radius + 0.025 * radius * np.sin(21 * phi)
    fg = rho < rim
    dome = 1.0 - 0.35 * (rho / radius) ** 2
    highlight_angle = rng.uniform(0, 2 * np.pi)
    hy, hx = cy - 0.35 * radius * np.sin(highlight_angle), cx - 0.35 * radius * np.cos(highlight_angle)
    highlight = 0.35 * np.exp(-(((yy - hy) ** 2 + (xx - hx) ** 2) / (0.2 * radius) ** 2))
    body = colour_image(paint, size) * dome[..., None] + highlight[..., None]
    printed = np.abs(rho - 0.55 * radius) < 0.05 * radius
    body = np.where(printed[..., None], colour_image(ring_ink, size) * dome[..., None], body)
    skirt = rho > 0.85 * radius
    body = np.where(skirt[..., None], body * (0.7 + 0.2 * np.cos(21 * phi))[..., None], body)
    return _compose(rng, size, _conveyor(rng, size, belt), body, fg, paint)


def screw(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Machine screw lying at any angle: round head, threaded shaft, pointed tip."""
    metal, belt = style.colours[:2]
    yy, xx = coords(size)
    cy, cx = _centre(rng, size, 0.05)
    u, v = rotated(yy, xx, cy, cx, rng.uniform(0, 2 * np.pi))
    length = 0.62 * size * style.scale
    shaft_r = 0.045 * size * style.scale
    head_r = 0.1 * size * style.scale
    head_u = -length / 2
    taper = np.clip((length / 2 - u) / (2.5 * shaft_r), 0, 1)
    shaft = (u > head_u) & (u < length / 2) & (np.abs(v) < shaft_r * taper)
    head = np.hypot(u - head_u, v) < head_r
    fg = shaft | head
    cyl = np.sqrt(np.clip(1 - (v / shaft_r) ** 2, 0.05, 1))
    threads = 0.75 + 0.25 * np.sin(2 * np.pi * (u + 0.35 * v) / (0.035 * size * style.scale))
    head_tone = 0.85 - 0.3 * np.hypot(u - head_u, v) / head_r
    slot = head & (np.abs(v) < 0.18 * head_r) & (np.abs(u - head_u) < 0.7 * head_r)
    tone = np.where(head, head_tone, cyl * threads) * np.where(slot, 0.35, 1.0)
    tone = tone + 0.03 * smooth_noise(rng, size, 1.5)
    body = colour_image(metal, size) * tone[..., None]
    return _compose(rng, size, _conveyor(rng, size, belt), body, fg, metal)


def dowel_pin(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Brass dowel pin: capsule with cylindrical shading, specular stripe and chamfer rings."""
    brass, belt = style.colours[:2]
    yy, xx = coords(size)
    cy, cx = _centre(rng, size, 0.05)
    u, v = rotated(yy, xx, cy, cx, np.deg2rad(30 + rng.uniform(-15, 15)))
    half = 0.3 * size * style.scale
    radius = 0.075 * size * style.scale
    inner_u = np.clip(np.abs(u), 0, half)
    fg = np.hypot(np.abs(u) - inner_u, v) < radius
    cyl = np.sqrt(np.clip(1 - (v / radius) ** 2, 0.05, 1))
    stripe = 0.3 * np.exp(-(((v + 0.35 * radius) / (0.15 * radius)) ** 2))
    chamfer = np.where(np.abs(np.abs(u) - 0.85 * half) < 0.04 * half, 0.7, 1.0)
    tone = (0.75 * cyl + stripe) * chamfer + 0.03 * smooth_noise(rng, size, 2.0)
    body = colour_image(brass, size) * tone[..., None]
    return _compose(rng, size, _conveyor(rng, size, belt), body, fg, brass)


def hex_nut(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Zinc-plated hex nut at any rotation: six shaded facets, chamfer circle, threaded bore."""
    zinc, belt = style.colours[:2]
    yy, xx = coords(size)
    cy, cx = _centre(rng, size)
    angle = rng.uniform(0, np.pi / 3)
    u, v = rotated(yy, xx, cy, cx, angle)
    apothem = 0.25 * size * style.scale
    hexagon = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = k * np.pi / 3
        hexagon &= np.abs(u * np.cos(theta) + v * np.sin(theta)) < apothem
    rho = np.hypot(u, v)
    fg = hexagon & (rho < 1.12 * apothem) & (rho > 0.48 * apothem)
    sector = np.floor((np.arctan2(v, u) + np.pi / 6) / (np.pi / 3)) % 6
    light = rng.uniform(0, 6)
    facet = 0.6 + 0.25 * np.cos((sector - light) * np.pi / 3)
    chamfer = np.where(rho > 0.98 * apothem, 0.8, 1.0)
    bore = np.where(rho < 0.56 * apothem, 0.55 + 0.1 * np.sin(2 * np.pi * rho / 2.5), 1.0)
    tone = facet * chamfer * bore + 0.03 * smooth_noise(rng, size, 2.0)
    body = colour_image(zinc, size) * tone[..., None]
    return _compose(rng, size, _conveyor(rng, size, belt), body, fg, zinc)
