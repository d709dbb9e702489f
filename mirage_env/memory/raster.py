"""Putting world points on a camera's pixel grid: frustum culling, projection, z-buffer.

Pure functions (tensors in, tensors out, nothing stored), so any point memory can
rasterise with them. Conventions, stated once:

- ``w2c``: (V, 4, 4) float32 world-to-camera transforms, one per *view*; a point is
  projected into the view its ``view`` index names.
- Camera frame as in :mod:`mirage_env.geometry`: x right, y down, z forward; pixel
  (row, column) covers ``[column, column + 1) x [row, row + 1)`` in (u, v).
- ``pixel``: a flat index over (V, h, w), ``view * h * w + row * w + column``.
"""

from __future__ import annotations

import math

import torch

from ..geometry import Camera

_NEAR = 1e-6  # points nearer than this to the camera plane are behind it


def spheres_in_frustum(camera: Camera, w2c: torch.Tensor, centres: torch.Tensor, first_view: torch.Tensor,
                       frames: int, radius: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which spheres meet which views' frusta (up to ``max_depth``).

    Args:
        camera: intrinsics of the views.
        w2c: (V, 4, 4) world-to-camera transforms.
        centres: (N, 3) sphere centres, all of one ``radius``.
        first_view: (N,) each sphere is tested against views ``first_view[i] + [0, frames)``.

    Returns:
        (sphere index, view index) of every meeting pair.
    """
    device = centres.device
    pair_sphere = torch.arange(centres.shape[0], device=device).repeat_interleave(frames)
    pair_view = (first_view[:, None] + torch.arange(frames, device=device)).reshape(-1)
    local = (w2c[pair_view, :3, :3] @ centres[pair_sphere][:, :, None])[:, :, 0] + w2c[pair_view, :3, 3]
    x, y, z = local.unbind(-1)
    # Frustum side planes through the optical centre; a sphere is outside a plane
    # when its centre is farther than the radius on the outer side.
    left, right = camera.cx / camera.fx, (camera.width - camera.cx) / camera.fx
    top, bottom = camera.cy / camera.fy, (camera.height - camera.cy) / camera.fy
    visible = (z > -radius) & (z < max_depth + radius)
    visible &= (x - right * z) <= radius * math.sqrt(1 + right * right)
    visible &= (-x - left * z) <= radius * math.sqrt(1 + left * left)
    visible &= (y - bottom * z) <= radius * math.sqrt(1 + bottom * bottom)
    visible &= (-y - top * z) <= radius * math.sqrt(1 + top * top)
    return pair_sphere[visible], pair_view[visible]


def project_to_pixels(points: torch.Tensor, view: torch.Tensor, w2c: torch.Tensor, camera: Camera,
                      max_depth: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project points into their views and keep those that land on a pixel.

    Args:
        points: (N, 3) float32 world points.
        view: (N,) the view each point is projected into.
        w2c: (V, 4, 4) float32 world-to-camera transforms.
        camera: intrinsics of the (h, w) pixel grid.
        max_depth: points farther than this (z-depth) are dropped.

    Returns:
        ``index`` (M,) of the points that land in front of the camera, within ``max_depth``
        and inside the image; their flat ``pixel`` (M,); and their ``z``, ``u``, ``v`` (M,)
        (z-depth and continuous pixel coordinates).
    """
    h, w = camera.height, camera.width
    rotation, translation = w2c[view, :3, :3], w2c[view, :3, 3]
    local = (rotation @ points[:, :, None])[:, :, 0] + translation
    z = local[:, 2]
    safe_z = z.clamp_min(_NEAR)
    u = camera.fx * local[:, 0] / safe_z + camera.cx
    v = camera.fy * local[:, 1] / safe_z + camera.cy
    column, row = torch.floor(u), torch.floor(v)
    inside = (z > _NEAR) & (z <= max_depth) & (column >= 0) & (column < w) & (row >= 0) & (row < h)
    index = torch.nonzero(inside).flatten()
    pixel = view[index] * (h * w) + row[index].to(torch.int64) * w + column[index].to(torch.int64)
    return index, pixel, z[index], u[index], v[index]


def prefer_at_pixels(pixel: torch.Tensor, preferred: torch.Tensor, pixels: int) -> torch.Tensor:
    """Which samples may compete in the z-buffer when ``preferred`` ones hide all others at their pixels.

    Args:
        pixel: (M,) flat pixel of each sample.
        preferred: (M,) bool.
        pixels: number of pixels (V * h * w).

    Returns:
        (M,) bool: preferred samples, and samples at pixels that no preferred sample reaches.
    """
    pixel_has_preferred = torch.zeros(pixels, dtype=torch.bool, device=pixel.device)
    pixel_has_preferred[pixel[preferred]] = True
    return preferred | ~pixel_has_preferred[pixel]


def zbuffer(pixel: torch.Tensor, z: torch.Tensor, u: torch.Tensor, v: torch.Tensor, pixels: int,
            surface_tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The winning sample of every pixel: the nearest surface, then the sample nearest the pixel centre.

    Samples within ``surface_tolerance`` (relative depth) of a pixel's nearest one are one
    surface; among them the one whose (u, v) lies closest to the pixel centre wins (ties:
    the later sample). One ``scatter_reduce`` per criterion, no loop over samples.

    Args:
        pixel, z, u, v: (M,) flat pixel, z-depth and continuous pixel coordinates of each sample
            (as :func:`project_to_pixels` returns them).
        pixels: number of pixels (V * h * w).

    Returns:
        ``hit`` (K,) the pixels some sample reached, ascending, and ``winner`` (K,) the index
        of each one's winning sample.
    """
    device = pixel.device
    nearest = torch.full((pixels,), math.inf, dtype=torch.float32, device=device)
    nearest.scatter_reduce_(0, pixel, z, reduce="amin")
    on_surface = z <= nearest[pixel] * (1 + surface_tolerance)
    offset = (u - torch.floor(u) - 0.5) ** 2 + (v - torch.floor(v) - 0.5) ** 2
    offset = torch.where(on_surface, offset, torch.full_like(offset, math.inf))
    best_offset = torch.full((pixels,), math.inf, device=device)
    best_offset.scatter_reduce_(0, pixel, offset, reduce="amin")
    candidate = on_surface & (offset == best_offset[pixel])
    order = torch.arange(pixel.numel(), device=device)
    winner_of = torch.full((pixels,), -1, dtype=torch.int64, device=device)
    winner_of.scatter_reduce_(0, pixel[candidate], order[candidate], reduce="amax")
    hit = torch.nonzero(winner_of >= 0).flatten()
    return hit, winner_of[hit]
