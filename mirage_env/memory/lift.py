"""Depth lifting: latent pixels + depth + camera -> world points.

A latent pixel covers f x f image pixels (f: the VAE's spatial factor). Its depth is
the median of theirs (:func:`pool_depth`), and it is lifted either along its centre
ray (depth given at latent resolution) or through the image pixel that best
represents the surface most of its patch shows (:func:`lift_dominant_surface`).
"""

from __future__ import annotations

import math

import torch

from ..compiled import disable_kernels, kernel_module, kernels_enabled, parallel_kernels
from ..geometry import Camera

# Relative depth band around a patch's median taken as its dominant surface (:func:`lift_dominant_surface`).
DOMINANT_SURFACE_TOLERANCE = 0.05


def pool_depth(depth: torch.Tensor, factor: int) -> torch.Tensor:
    """Median-pool (..., H, W) depth by ``factor``: one depth per latent pixel.

    The median keeps a pixel on the surface most of its patch shows (a mean would
    float between a foreground edge and the wall behind it), and stays +inf when
    most of the patch is sky.
    """
    *lead, height, width = depth.shape
    patches = depth.reshape(*lead, height // factor, factor, width // factor, factor)
    patches = patches.movedim(-3, -2).reshape(*lead, height // factor, width // factor, factor * factor)
    return patches.sort(dim=-1).values[..., (factor * factor) // 2]


def lift_dominant_surface(depth: torch.Tensor, camera: Camera, c2w: torch.Tensor, factor: int,
                          surface_tolerance: float = DOMINANT_SURFACE_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """Lift each latent pixel through the medoid of the image pixels showing its dominant surface.

    Lifting a latent pixel along its centre ray at its median depth puts a point in
    empty space when the surface most of the patch shows misses the centre (a
    corner, a post in front of a wall): at 8x compression a latent pixel is ~1 m
    wide at 5 m, and such a point later wins the z-buffer where nothing is. Among
    the image pixels within ``surface_tolerance`` of the median depth, the one
    nearest their centroid is, by construction, on that surface.

    Args:
        depth: (B, T, H, W) image-resolution z-depth, +inf for sky / nothing.
        camera: intrinsics of the (H, W) image.
        c2w: (B, T, 4, 4) float64 camera-to-world poses.
        factor: latent spatial factor; H and W are multiples of it.

    Returns:
        points (B, T, h, w, 3) float64 world points and depth (B, T, h, w) float32, the
        z-depth of each chosen image pixel (the median, +inf, where most of the patch is sky).
    """
    *lead, height, width = depth.shape
    h, w, f = height // factor, width // factor, factor
    if kernels_enabled(depth.device):
        compiled = _compiled_lift(depth, camera, c2w, factor, surface_tolerance)
        if compiled is not None:
            return compiled
    median = pool_depth(depth, f)
    patch_depth = depth.reshape(*lead, h, f, w, f).movedim(-3, -2).reshape(*lead, h, w, f * f)
    on_surface = (patch_depth - median[..., None]).abs() <= surface_tolerance * median[..., None]
    # The medoid: the surface's own pixel nearest its centroid (in the patch), so points of
    # neighbouring latent pixels stay about a latent pixel apart and do not share voxels.
    offset = torch.arange(f, dtype=torch.float32, device=depth.device) + 0.5
    row_of, column_of = offset.repeat_interleave(f), offset.repeat(f)
    weight = on_surface.to(torch.float32)
    count = weight.sum(-1, keepdim=True).clamp_min(1.0)
    centroid_row, centroid_column = (weight * row_of).sum(-1, keepdim=True) / count, (weight * column_of).sum(-1, keepdim=True) / count
    distance = (row_of - centroid_row) ** 2 + (column_of - centroid_column) ** 2
    # Where nothing is within tolerance (all sky) any choice will do: the entry is not written.
    chosen = torch.where(on_surface, distance, torch.full_like(patch_depth, math.inf)).argmin(-1, keepdim=True)
    chosen_depth = torch.where(torch.isfinite(median), patch_depth.gather(-1, chosen)[..., 0], median)
    row_in_patch, column_in_patch = chosen[..., 0] // f, chosen[..., 0] % f
    v = (torch.arange(h, device=depth.device)[:, None] * f + row_in_patch + 0.5).to(torch.float64)
    u = (torch.arange(w, device=depth.device)[None, :] * f + column_in_patch + 0.5).to(torch.float64)
    z = torch.where(torch.isfinite(chosen_depth), chosen_depth, torch.ones_like(chosen_depth)).to(torch.float64)
    camera_points = torch.stack([(u - camera.cx) / camera.fx * z, (v - camera.cy) / camera.fy * z, z], -1)
    rotation, translation = c2w[..., None, None, :3, :3], c2w[..., None, None, :3, 3]
    points = (rotation @ camera_points[..., None])[..., 0] + translation
    return points, chosen_depth


def _compiled_lift(depth, camera, c2w, factor, surface_tolerance):
    """:func:`lift_dominant_surface` by :mod:`.lift_kernels` (None: the kernel could not be built)."""
    lift_kernels = kernel_module(f"{__package__}.lift_kernels")
    if lift_kernels is None:
        return None
    *lead, height, width = depth.shape
    try:  # numba compiles on first call (or loads its cache); a failure there means the torch path
        points, chosen = lift_kernels.lift_dominant_surface(
            depth.reshape(-1, height, width).to(torch.float32).contiguous().numpy(),
            c2w.reshape(-1, 4, 4).to(torch.float64).contiguous().numpy(), camera, factor, surface_tolerance,
            parallel_kernels())
    except Exception as error:
        disable_kernels(f"{type(error).__name__}: {error}")
        return None
    h, w = height // factor, width // factor
    return torch.from_numpy(points).reshape(*lead, h, w, 3), torch.from_numpy(chosen).reshape(*lead, h, w)


def depth_grid(depth_size: tuple[int, int], camera: Camera, size: tuple[int, int]) -> tuple[Camera, int]:
    """The camera at depth's resolution ``depth_size`` (H, W) and how many times the latent grid ``size``
    (h, w) that is per side (1: depth is on the latent grid); a ValueError if it is neither."""
    h, w = size
    height, width = depth_size
    if (height, width) == (h, w):
        return (camera if (camera.height, camera.width) == (h, w) else camera.scaled(h / camera.height)), 1
    factor_h, factor_w = height // h, width // w
    if factor_h != factor_w or factor_h * h != height or factor_w * w != width:
        raise ValueError(
            f"depth of size {(height, width)} is neither the latent size {(h, w)} "
            f"nor an integer multiple of it"
        )
    return (camera if (camera.height, camera.width) == (height, width) else camera.scaled(height / camera.height)), \
        factor_h


def lift_latent_depth(depth: torch.Tensor, camera: Camera, c2w: torch.Tensor,
                      size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None, Camera]:
    """Depth on the latent grid ``size`` = (h, w), lifted already where it came at image resolution.

    Args:
        depth: (B, T, h, w) latent-resolution or (B, T, H, W) image-resolution float32 z-depth,
            (H, W) = (h, w) * f for an integer f.
        camera: intrinsics of the latent grid or of the image (scaled here to ``depth``'s size).
        c2w: (B, T, 4, 4) float64 camera-to-world poses.

    Returns:
        (B, T, h, w) depth on the latent grid; (B, T, h, w, 3) float64 world points of each
        latent pixel's dominant surface when ``depth`` came at image resolution, else None (lift
        along the centre rays with :func:`~mirage_env.geometry.unproject`); and the camera at
        ``depth``'s resolution.
    """
    camera, factor = depth_grid(tuple(depth.shape[-2:]), camera, size)
    if factor == 1:
        return depth, None, camera
    points, depth = lift_dominant_surface(depth, camera, c2w, factor)
    return depth, points, camera
