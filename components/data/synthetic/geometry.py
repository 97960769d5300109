"""Organised point clouds (xyz) for synthetic object products, and defects that live in 3-D.

A product's height field is built from its exact foreground mask: a rounded-edge plateau (distance
to the outline, saturating after ``EDGE_RAMP`` px) of a design-specific height, plus faint surface
relief. The camera looks straight down: ``z = CAMERA_DISTANCE - height``, ``x, y`` are the pixel
centres in metres. Invalid points (all three coordinates 0, as in MVTec 3D-AD) are sensor dropouts:
where the surface is steep (object outline) and a few random specks.

Geometry defects change only the height field (the RGB image is untouched), so they can only be
seen in 3-D: ``dent`` (pushed in), ``bump`` (raised), ``cut_edge`` (a slice of the outline
lowered to a chamfer), ``missing_part`` (a chunk of the part gone down to belt level). Every mask
is exactly the set of pixels whose height changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from components.data.synthetic.canvas import Array, edge_pixels, eroded, irregular_blob, random_pixel, smooth_noise

CAMERA_DISTANCE = 0.65  # metres, like MVTec 3D-AD (z ~ 0.6-0.7)
PIXEL_PITCH = 0.1 / 256  # metres per pixel at 256 px
EDGE_RAMP = 4.0  # px over which the outline rounds off
HEIGHT_M = {"washer": 0.003, "screw": 0.006, "bottle_cap": 0.008, "hex_nut": 0.009, "dowel_pin": 0.007}
DEFAULT_HEIGHT_M = 0.006
Z_NOISE_M = 2e-5
SPECK_FRACTION = 0.01
STEEP_GRADIENT = 0.35  # height change per pixel, as a fraction of the part height, that drops the point
GeometryPainter = Callable[[np.random.Generator, Array, Array, float, float], tuple[Array, Array]]


def height_field(rng: np.random.Generator, foreground: Array, part_height: float) -> Array:
    """(S, S) float32 height in metres above the belt: rounded plateau on ``foreground`` + faint relief."""
    inside = ndimage.distance_transform_edt(foreground).astype(np.float32)
    plateau = np.sqrt(np.clip(inside / EDGE_RAMP, 0.0, 1.0))
    relief = 0.03 * smooth_noise(rng, foreground.shape[0], 6.0)
    return (part_height * plateau * (1.0 + relief) * foreground).astype(np.float32)


def to_xyz(rng: np.random.Generator, height: Array, part_height: float) -> tuple[Array, Array]:
    """(S, S, 3) float32 organised point cloud with invalid points set to 0, and the (S, S) validity mask."""
    size = height.shape[0]
    pitch = PIXEL_PITCH * 256 / size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    z = CAMERA_DISTANCE - height + Z_NOISE_M * rng.standard_normal(height.shape).astype(np.float32)
    xyz = np.stack([(xx - size / 2) * pitch, (yy - size / 2) * pitch, z], axis=-1).astype(np.float32)
    grad_y, grad_x = np.gradient(height)
    steep = np.hypot(grad_y, grad_x) > STEEP_GRADIENT * part_height
    specks = rng.random(height.shape) < SPECK_FRACTION
    valid = ~(steep | specks)
    xyz[~valid] = 0.0
    return xyz, valid


def _plateau(mask: Array, ramp: float) -> Array:
    """Smooth profile in (0, 1] on ``mask`` (0 outside): distance to the mask's outline, saturating at ``ramp``."""
    inside = ndimage.distance_transform_edt(mask).astype(np.float32)
    return np.where(mask, np.clip(inside / ramp, 0.0, 1.0), 0.0).astype(np.float32)


def dent(rng: np.random.Generator, height: Array, foreground: Array, severity: float, part_height: float) -> tuple[Array, Array]:
    """A rounded depression inside the part."""
    size = height.shape[0]
    cy, cx = random_pixel(rng, eroded(foreground, 4))
    mask = irregular_blob(size, cy, cx, max(3.0, (0.03 + 0.05 * severity) * size), rng, 0.2) & foreground
    depth = (0.15 + 0.35 * severity) * part_height
    return height - depth * _plateau(mask, 3.0), mask


def bump(rng: np.random.Generator, height: Array, foreground: Array, severity: float, part_height: float) -> tuple[Array, Array]:
    """A rounded protrusion on the part."""
    new_height, mask = dent(rng, height, foreground, severity, part_height)
    return 2 * height - new_height, mask  # the mirror image of a dent: same footprint, raised


def cut_edge(rng: np.random.Generator, height: Array, foreground: Array, severity: float, part_height: float) -> tuple[Array, Array]:
    """A straight slice off the outline: the part is lowered to a chamfer beyond a random chord."""
    size = height.shape[0]
    cy, cx = random_pixel(rng, edge_pixels(foreground))
    centre_y, centre_x = ndimage.center_of_mass(foreground)
    inward = np.array([centre_y - cy, centre_x - cx], dtype=np.float32)
    inward /= np.linalg.norm(inward) + 1e-6
    reach = (0.04 + 0.06 * severity) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = (yy - cy) * inward[0] + (xx - cx) * inward[1]  # distance into the part from the cut point
    across = np.abs(-(yy - cy) * inward[1] + (xx - cx) * inward[0])
    mask = foreground & (along < reach) & (across < 2.5 * reach)
    keep = (0.25 + 0.3 * (1 - severity)) * np.clip(along / reach, 0.0, 1.0)
    return np.where(mask, height * keep, height).astype(np.float32), mask


def missing_part(rng: np.random.Generator, height: Array, foreground: Array, severity: float, part_height: float) -> tuple[Array, Array]:
    """A chunk of the part at its outline is gone down to belt level (colour unchanged: a colour-matched support)."""
    size = height.shape[0]
    cy, cx = random_pixel(rng, edge_pixels(foreground))
    mask = irregular_blob(size, cy, cx, max(3.0, (0.03 + 0.06 * severity) * size), rng, 0.3) & foreground
    return np.where(mask, 0.0, height).astype(np.float32), mask


GEOMETRY_PAINTERS: dict[str, GeometryPainter] = {"dent": dent, "bump": bump, "cut_edge": cut_edge, "missing_part": missing_part}
