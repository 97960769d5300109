"""Texture products: the whole image is the surface (textile, mesh, wood, metal sheet, carpet).

Each renderer draws one normal image with natural variation (phase, small rotation, grain).
"""

from __future__ import annotations

import numpy as np
from components.data.synthetic.canvas import colour_image, coords, fractal_noise, mix, rotated, smooth_noise
from components.data.synthetic.scene import Scene, Style


def woven(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Plain-weave fabric: over/under warp and weft threads with fibre noise."""
    warp, weft, backing = style.colours[:3]
    yy, xx = coords(size)
    period = 11.0 * style.scale * rng.uniform(0.97, 1.03)
    u, v = rotated(yy, xx, rng.uniform(0, period), rng.uniform(0, period), np.deg2rad(rng.uniform(-3, 3)))
    fu, fv = (u / period) % 1.0, (v / period) % 1.0
    over = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    across_u, across_v = np.sin(np.pi * fu) ** 0.6, np.sin(np.pi * fv) ** 0.6
    shade = np.where(over, across_u * (0.75 + 0.25 * np.sin(np.pi * fv)), across_v * (0.75 + 0.25 * np.sin(np.pi * fu)))
    fibres = smooth_noise(rng, size, (0.6, 2.5))
    shade = np.clip(shade * (0.92 + 0.06 * fibres), 0, 1)
    thread = np.where(over[..., None], np.asarray(warp, np.float32), np.asarray(weft, np.float32))
    image = mix(colour_image(backing, size), thread, shade.astype(np.float32))
    return Scene(image.astype(np.float32), None, colour_image(backing, size) * 0.35, warp)


def mesh(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Metal wire mesh over a dark backing: cylindrical wires crossing over and under."""
    wire, backing = style.colours[:2]
    yy, xx = coords(size)
    period = 24.0 * style.scale * rng.uniform(0.98, 1.02)
    width = 0.3 * period
    u, v = rotated(yy, xx, rng.uniform(0, period), rng.uniform(0, period), np.deg2rad(rng.uniform(-2.5, 2.5)))
    du = np.abs((u % period) - period / 2)
    dv = np.abs((v % period) - period / 2)
    wire_u = np.sqrt(np.clip(1 - (du / (width / 2)) ** 2, 0, 1))
    wire_v = np.sqrt(np.clip(1 - (dv / (width / 2)) ** 2, 0, 1))
    top_is_u = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    profile = np.where(top_is_u, np.maximum(wire_u, 0.7 * wire_v), np.maximum(0.7 * wire_u, wire_v))
    grime = 0.5 + 0.5 * smooth_noise(rng, size, 6.0) * 0.3
    back = colour_image(backing, size) * (0.9 + 0.1 * smooth_noise(rng, size, 10.0))[..., None]
    image = mix(back, colour_image(wire, size) * grime[..., None], profile.astype(np.float32))
    return Scene(np.clip(image, 0, 1).astype(np.float32), None, back * 0.6, wire)


def wood(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Plain-sawn wood: growth rings around a far-away pith, distorted, with fine grain."""
    light, dark = style.colours[:2]
    yy, xx = coords(size)
    cy = rng.uniform(-2.5, -1.2) * size
    cx = size / 2 + rng.uniform(-0.6, 0.6) * size
    radius = np.sqrt((yy - cy) ** 2 + ((xx - cx) * 0.35) ** 2)
    radius = radius + 6.0 * style.scale * fractal_noise(rng, size, (24.0, 12.0))
    period = 14.0 * style.scale * rng.uniform(0.9, 1.1)
    rings = (0.5 + 0.5 * np.sin(2 * np.pi * radius / period)) ** 2.5
    grain = smooth_noise(rng, size, (0.7, 6.0))
    tone = np.clip(0.6 * rings + 0.03 * grain + 0.08 * smooth_noise(rng, size, 30.0), 0, 1)
    image = mix(colour_image(light, size), colour_image(dark, size), tone.astype(np.float32))
    return Scene(image.astype(np.float32), None, colour_image(dark, size) * 0.3, dark)


def brushed_metal(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Brushed sheet metal: long anisotropic streaks and a broad specular band."""
    base, = style.colours[:1]
    yy, _ = coords(size)
    streaks = smooth_noise(rng, size, (0.6, 30.0 * style.scale))
    band_centre = rng.uniform(0.2, 0.8) * size
    band = np.exp(-(((yy - band_centre) / (0.25 * size)) ** 2))
    tone = 0.78 + 0.05 * streaks + 0.18 * band + 0.03 * smooth_noise(rng, size, 20.0)
    image = colour_image(base, size) * tone[..., None]
    return Scene(np.clip(image, 0, 1).astype(np.float32), None, colour_image(base, size) * 0.2, base)


def carpet(rng: np.random.Generator, size: int, style: Style) -> Scene:
    """Tufted carpet: dense colour speckle of loops with sparse fleck of a second yarn colour."""
    yarn, fleck, backing = style.colours[:3]
    loops = smooth_noise(rng, size, 1.2 * style.scale)
    clumps = smooth_noise(rng, size, 4.0 * style.scale)
    flecks = smooth_noise(rng, size, 1.5 * style.scale) > 2.0
    tone = np.clip(0.75 + 0.15 * loops + 0.1 * clumps, 0.3, 1.2)
    image = colour_image(yarn, size) * tone[..., None]
    image = np.where(flecks[..., None], colour_image(fleck, size) * tone[..., None], image)
    return Scene(np.clip(image, 0, 1).astype(np.float32), None, colour_image(backing, size), yarn)
