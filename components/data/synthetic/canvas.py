"""Vectorised drawing primitives on float32 canvases (values in [0, 1], shape (S, S[, 3]))."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

Array = np.ndarray


@lru_cache(maxsize=8)
def coords(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinate grids ``(yy, xx)`` as float32 (shared, read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=32)
def _gaussian_transfer(size: int, sigma_y: float, sigma_x: float) -> Array:
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    return np.exp(-2 * np.pi**2 * ((sigma_y * fy) ** 2 + (sigma_x * fx) ** 2)).astype(np.float32)


def blur(image: Array, sigma: float | tuple[float, float]) -> Array:
    """Periodic Gaussian blur of a square 2-D array via the FFT (cost independent of ``sigma``)."""
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    spectrum = np.fft.rfft2(image) * _gaussian_transfer(image.shape[0], float(sy), float(sx))
    return np.fft.irfft2(spectrum, s=image.shape).astype(np.float32)


def rotated(yy: Array, xx: Array, cy: float, cx: float, angle: float) -> tuple[Array, Array]:
    """Coordinates ``(u, v)`` in a frame centred on (cy, cx) and rotated by ``angle`` radians."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    return dx * c + dy * s, -dx * s + dy * c


def smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> Array:
    """Zero-mean unit-variance Gaussian-filtered (periodic) white noise; ``sigma`` may be (sy, sx)."""
    noise = blur(rng.standard_normal((size, size), dtype=np.float32), sigma)
    noise -= noise.mean()
    return noise / (noise.std() + 1e-8)


def fractal_noise(rng: np.random.Generator, size: int, sigmas: tuple[float, ...] = (16.0, 8.0, 4.0, 2.0)) -> Array:
    """Sum of smooth-noise octaves with halving amplitude, unit variance."""
    total = np.zeros((size, size), dtype=np.float32)
    for k, sigma in enumerate(sigmas):
        total += smooth_noise(rng, size, sigma) * np.float32(0.5**k)
    return total / (total.std() + 1e-8)


def lighting_field(rng: np.random.Generator, size: int, strength: float) -> Array:
    """Multiplicative illumination around 1: a random linear gradient plus a soft vignette."""
    yy, xx = coords(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size
    r2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2
    gain = 1.0 + rng.uniform(-0.04, 0.04)
    return (gain + strength * ramp - 0.05 * strength * r2).astype(np.float32)


def mix(a: Array, b: Array, t: Array) -> Array:
    """Per-pixel blend of colours/images ``a`` -> ``b`` by weight ``t`` (HxW)."""
    t3 = t[..., None] if t.ndim == 2 else t
    return a * (1 - t3) + b * t3


def colour_image(colour: tuple[float, float, float] | Array, size: int) -> Array:
    return np.broadcast_to(np.asarray(colour, dtype=np.float32), (size, size, 3)).copy()


def irregular_blob(size: int, cy: float, cx: float, radius: float, rng: np.random.Generator, roughness: float = 0.3) -> Array:
    """Boolean mask of a star-shaped blob: a circle whose radius wobbles with a few random harmonics."""
    reach = int(radius * (1 + 2 * roughness) / 0.6) + 2
    y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
    yy, xx = coords(size)
    dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
    theta = np.arctan2(dy, dx)
    wobble = np.zeros_like(theta)
    for harmonic in (2, 3, 5):
        wobble += rng.uniform(-1, 1) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi)) / harmonic
    stretch = rng.uniform(0.6, 1.0)
    phi = rng.uniform(0, np.pi)
    u = dx * np.cos(phi) + dy * np.sin(phi)
    v = (-dx * np.sin(phi) + dy * np.cos(phi)) / stretch
    out = np.zeros((size, size), dtype=bool)
    out[y0:y1, x0:x1] = np.sqrt(u * u + v * v) < radius * (1 + roughness * wobble)
    return out


def polyline_mask(size: int, points: Array, width: float) -> Array:
    """Boolean mask of pixels within ``width / 2`` of the polyline through ``points`` ((K, 2) as y, x)."""
    yy, xx = coords(size)
    half = max(width / 2.0, 0.5)
    lo = np.floor(points.min(axis=0) - half - 1).astype(int).clip(0, size)
    hi = np.ceil(points.max(axis=0) + half + 2).astype(int).clip(0, size)
    sub_y, sub_x = yy[lo[0] : hi[0], lo[1] : hi[1]], xx[lo[0] : hi[0], lo[1] : hi[1]]
    best = np.full(sub_y.shape, np.inf, dtype=np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        length2 = dy * dy + dx * dx + 1e-9
        t = np.clip(((sub_y - y0) * dy + (sub_x - x0) * dx) / length2, 0.0, 1.0)
        dist2 = (sub_y - y0 - t * dy) ** 2 + (sub_x - x0 - t * dx) ** 2
        np.minimum(best, dist2, out=best)
    out = np.zeros((size, size), dtype=bool)
    out[lo[0] : hi[0], lo[1] : hi[1]] = best <= half * half
    return out


def edge_pixels(mask: Array) -> Array:
    """Boolean mask of the inner boundary of ``mask``."""
    return mask & ~ndimage.binary_erosion(mask, iterations=1)


def eroded(mask: Array, pixels: int) -> Array:
    return ndimage.binary_erosion(mask, iterations=pixels) if pixels > 0 else mask


def random_pixel(rng: np.random.Generator, region: Array) -> tuple[float, float]:
    """(y, x) of a uniformly chosen pixel of ``region`` (which must be non-empty)."""
    flat = np.flatnonzero(region)
    index = int(flat[rng.integers(len(flat))])
    size = region.shape[1]
    return float(index // size), float(index % size)


def to_uint8(image: Array) -> Array:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
