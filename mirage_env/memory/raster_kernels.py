"""A memory read as one compiled CPU kernel (numba): cull, project, z-buffer.

The same steps as ``LatentSpatialMemory.read`` in torch (chunk and brick culling by
:func:`~.raster.spheres_in_frustum`, :func:`~.raster.project_to_pixels`,
:func:`~.raster.prefer_at_pixels`, :func:`~.raster.zbuffer`), one view at a time, in the
order the torch path visits samples (chunk slot, member brick, voxel), so the winner of
every pixel, ties included, is the torch path's (tests/test_compiled.py checks it bit for
bit). The float32 arithmetic is written in torch's order: a 3x3 matrix times a point is
``((0 + r0 * x) + r1 * y) + r2 * z`` (torch's small-``bmm`` loop), and the revisit
distance is the fused multiply-add chain of torch's vectorised ``norm``, emulated in
float64 (exact products; the sum then rounds once to float32, as an FMA does, except in
the astronomically rare case that the float64 sum itself rounds at a float32 tie).

What it returns is per pixel, over (V, h, w): the winning entry (-1: none), its z-depth
(+inf: none) and its world point (NaN: none); the caller gathers the features.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_AXIS_BITS = 16
_AXIS_MASK = (1 << _AXIS_BITS) - 1


@njit(cache=True, inline="always")
def _local(m, x, y, z, i):
    acc = np.float32(0.0)
    acc += m[i, 0] * x
    acc += m[i, 1] * y
    acc += m[i, 2] * z
    return acc + m[i, 3]


@njit(cache=True, inline="always")
def _sphere_visible(m, x, y, z, frustum):
    # frustum: -r, max_depth + r, right, left, bottom, top, and the four side thresholds (float32).
    lx = _local(m, x, y, z, 0)
    ly = _local(m, x, y, z, 1)
    lz = _local(m, x, y, z, 2)
    return (lz > frustum[0] and lz < frustum[1] and (lx - frustum[2] * lz) <= frustum[6]
            and (-lx - frustum[3] * lz) <= frustum[7] and (ly - frustum[4] * lz) <= frustum[8]
            and (-ly - frustum[5] * lz) <= frustum[9])


@njit(cache=True, inline="always")
def _cell_visible(m, key, cells_per_key, offset, brick_edge, half_cell, frustum):
    """Whether the bounding sphere of a chunk (``cells_per_key`` = chunk size) or brick (1) is in the frustum.

    The key's axes are decoded in integers and converted once, as the torch cull does.
    """
    x = np.float32(((key >> (2 * _AXIS_BITS)) & _AXIS_MASK) * cells_per_key - offset)
    y = np.float32(((key >> _AXIS_BITS) & _AXIS_MASK) * cells_per_key - offset)
    z = np.float32((key & _AXIS_MASK) * cells_per_key - offset)
    return _sphere_visible(m, x * brick_edge + half_cell, y * brick_edge + half_cell, z * brick_edge + half_cell, frustum)


@njit(cache=True, inline="always")
def _fma32(a, b, c):
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(cache=True)
def _grow(array, size):
    bigger = np.empty((max(2 * array.shape[0], size),) + array.shape[1:], array.dtype)
    bigger[: array.shape[0]] = array
    return bigger


@njit(cache=True)
def _read_view(v, b, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points, origins,
               intrinsics, width, height, chunk_size, brick_edge, chunk_frustum, brick_frustum, max_depth,
               revisit_radius, tolerance, winner, out_depth, out_points):
    m = w2c[v]
    fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
    near = np.float32(1e-6)
    offset = np.int64(1 << (_AXIS_BITS - 1))
    half_chunk, half_brick = chunk_frustum[10], brick_frustum[10]
    prefer = revisit_radius > 0
    capacity = 1024
    s_pixel = np.empty(capacity, np.int64)
    s_z = np.empty(capacity, np.float32)
    s_u = np.empty(capacity, np.float32)
    s_v = np.empty(capacity, np.float32)
    s_entry = np.empty(capacity, np.int64)
    s_here = np.empty(capacity, np.bool_)
    count = 0
    pixels = width * height
    for c in range(chunk_keys.shape[0]):
        if chunk_batch[c] != b:
            continue
        key = chunk_keys[c]
        if not _cell_visible(m, key, chunk_size, offset, brick_edge, half_chunk, chunk_frustum):
            continue
        for member in range(members.shape[1]):
            slot = members[c, member]
            if slot < 0:
                continue
            if not _cell_visible(m, brick_keys[slot], 1, offset, brick_edge, half_brick, brick_frustum):
                continue
            for voxel in range(entry_of.shape[1]):
                e = entry_of[slot, voxel]
                if e < 0:
                    continue
                px, py, pz = points[e, 0], points[e, 1], points[e, 2]
                z = _local(m, px, py, pz, 2)
                if not (z > near and z <= max_depth):
                    continue
                safe_z = max(z, near)
                u = fx * _local(m, px, py, pz, 0) / safe_z + cx
                vv = fy * _local(m, px, py, pz, 1) / safe_z + cy
                column, row = np.floor(u), np.floor(vv)
                if not (column >= 0 and column < width and row >= 0 and row < height):
                    continue
                if count == s_pixel.shape[0]:
                    s_pixel, s_z, s_u, s_v = _grow(s_pixel, 0), _grow(s_z, 0), _grow(s_u, 0), _grow(s_v, 0)
                    s_entry, s_here = _grow(s_entry, 0), _grow(s_here, 0)
                s_pixel[count] = np.int64(row) * width + np.int64(column)
                s_z[count], s_u[count], s_v[count], s_entry[count] = z, u, vv, e
                if prefer:
                    d0 = origins[e, 0] - camera_origin[v, 0]
                    d1 = origins[e, 1] - camera_origin[v, 1]
                    d2 = origins[e, 2] - camera_origin[v, 2]
                    acc = _fma32(d0, d0, np.float32(0.0))
                    acc = _fma32(d1, d1, acc)
                    acc = _fma32(d2, d2, acc)
                    s_here[count] = np.sqrt(acc) <= revisit_radius
                count += 1

    base = v * pixels
    has_preferred = np.zeros(pixels, np.bool_)
    if prefer:
        for i in range(count):
            if s_here[i]:
                has_preferred[s_pixel[i]] = True
    nearest = np.full(pixels, np.inf, np.float32)
    for i in range(count):
        p = s_pixel[i]
        if (not prefer or s_here[i] or not has_preferred[p]) and s_z[i] < nearest[p]:
            nearest[p] = s_z[i]
    best = np.full(pixels, np.inf, np.float32)
    half = np.float32(0.5)
    for i in range(count):
        p = s_pixel[i]
        if prefer and not s_here[i] and has_preferred[p]:
            continue
        if not s_z[i] <= nearest[p] * tolerance:
            continue
        du = s_u[i] - np.floor(s_u[i]) - half
        dv = s_v[i] - np.floor(s_v[i]) - half
        off = du * du + dv * dv
        if off <= best[p]:  # ties: the later sample
            best[p] = off
            winner[base + p] = i
    for p in range(pixels):
        i = winner[base + p]
        if i >= 0:
            e = s_entry[i]
            winner[base + p] = e
            out_depth[base + p] = s_z[i]
            out_points[base + p, 0], out_points[base + p, 1], out_points[base + p, 2] = \
                points[e, 0], points[e, 1], points[e, 2]


@njit(cache=True)
def _read_serial(frames, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points, origins,
                 intrinsics, width, height, chunk_size, brick_edge, chunk_frustum, brick_frustum, max_depth,
                 revisit_radius, tolerance, winner, out_depth, out_points):
    for v in range(w2c.shape[0]):
        _read_view(v, v // frames, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points,
                   origins, intrinsics, width, height, chunk_size, brick_edge, chunk_frustum, brick_frustum,
                   max_depth, revisit_radius, tolerance, winner, out_depth, out_points)


@njit(cache=True, parallel=True)
def _read_parallel(frames, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points, origins,
                   intrinsics, width, height, chunk_size, brick_edge, chunk_frustum, brick_frustum, max_depth,
                   revisit_radius, tolerance, winner, out_depth, out_points):
    for v in prange(w2c.shape[0]):
        _read_view(v, v // frames, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points,
                   origins, intrinsics, width, height, chunk_size, brick_edge, chunk_frustum, brick_frustum,
                   max_depth, revisit_radius, tolerance, winner, out_depth, out_points)


def world_to_camera(c2w: np.ndarray) -> np.ndarray:
    """(V, 4, 4) float32 inverses of (V, 4, 4) float64 rigid camera-to-world poses, the numbers
    ``invert_pose(c2w).to(torch.float32)`` gives: the translation ``-R^T t`` summed as torch's
    small-``bmm`` loop does, ``((0 + a0 * t0) + a1 * t1) + a2 * t2`` in float64, then rounded once."""
    rotation, translation = c2w[:, :3, :3], c2w[:, :3, 3]
    negated = -rotation  # row k of it, times t_k, summed over k: (-R^T t)_i = sum_k -R[k, i] t_k
    total = 0.0 + negated[:, 0, :] * translation[:, 0:1]
    total = total + negated[:, 1, :] * translation[:, 1:2]
    total = total + negated[:, 2, :] * translation[:, 2:3]
    inverse = np.zeros((c2w.shape[0], 4, 4), np.float32)
    inverse[:, :3, :3] = rotation.transpose(0, 2, 1)
    inverse[:, :3, 3] = total
    inverse[:, 3, 3] = 1.0
    return inverse


def frustum_constants(camera, radius: float, max_depth: float) -> np.ndarray:
    """The float32 numbers :func:`~.raster.spheres_in_frustum` compares with, for spheres of ``radius``
    (the last one: the offset from a cell's first corner to its centre is set by the caller)."""
    left, right = camera.cx / camera.fx, (camera.width - camera.cx) / camera.fx
    top, bottom = camera.cy / camera.fy, (camera.height - camera.cy) / camera.fy
    return np.array([-radius, max_depth + radius, right, left, bottom, top,
                     radius * np.sqrt(1 + right * right), radius * np.sqrt(1 + left * left),
                     radius * np.sqrt(1 + bottom * bottom), radius * np.sqrt(1 + top * top), 0.0], np.float32)


def read(frames, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points, origins, camera,
         chunk_size, brick_edge, max_depth, revisit_radius, surface_tolerance, parallel):
    """Winning entry (V*h*w,) int64, z-depth (V*h*w,) float32 and world point (V*h*w, 3) float32 per pixel.

    ``chunk_batch`` (chunks,) is the batch item each live chunk is read by (-1: none); view v
    belongs to batch item ``v // frames``.
    """
    views = w2c.shape[0]
    pixels = views * camera.height * camera.width
    winner = np.full(pixels, -1, np.int64)
    depth = np.full(pixels, np.inf, np.float32)
    out_points = np.full((pixels, 3), np.nan, np.float32)
    chunk_edge = chunk_size * brick_edge
    chunk_frustum = frustum_constants(camera, 0.5 * np.sqrt(3) * chunk_edge, max_depth)
    chunk_frustum[10] = 0.5 * chunk_edge
    brick_frustum = frustum_constants(camera, 0.5 * np.sqrt(3) * brick_edge, max_depth)
    brick_frustum[10] = 0.5 * brick_edge
    intrinsics = np.array([camera.fx, camera.fy, camera.cx, camera.cy], np.float32)
    kernel = _read_parallel if parallel and views > 1 else _read_serial
    kernel(frames, w2c, camera_origin, chunk_keys, chunk_batch, members, brick_keys, entry_of, points, origins,
           intrinsics, camera.width, camera.height, chunk_size, np.float32(brick_edge), chunk_frustum, brick_frustum,
           np.float32(max_depth), np.float32(revisit_radius), np.float32(1 + surface_tolerance), winner, depth,
           out_points)
    return winner, depth, out_points


# How ``features_at`` widens a stored feature's bits to float32: float16, bfloat16, float32 (a copy).
WIDEN = {2: {"float16": 0, "bfloat16": 1}, 4: {"float32": 2}}


@njit(cache=True, inline="always")
def _float32_bits(x, kind):
    # Exact: every float16 and bfloat16 value is a float32 value (NaN payloads kept, as a CPU conversion keeps them).
    if kind == 2:
        return x & 0xFFFFFFFF
    if kind == 1:
        return (x & 0xFFFF) << 16
    h = x & 0xFFFF
    sign = (h & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0x1F:
        return sign | 0x7F800000 | (mantissa << 13)
    if exponent == 0:
        if mantissa == 0:
            return sign
        exponent32 = 113  # a subnormal half: normalise its mantissa
        while (mantissa & 0x400) == 0:
            mantissa <<= 1
            exponent32 -= 1
        return sign | (exponent32 << 23) | ((mantissa & 0x3FF) << 13)
    return sign | ((exponent + 112) << 23) | (mantissa << 13)


@njit(cache=True)
def features_at(winner, features, kind, out):
    """Features of each pixel's winning entry into ``out`` (V, C, h*w) float32 bits (left as they are where none)."""
    views, channels, pixels = out.shape
    for v in range(views):
        for p in range(pixels):
            e = winner[v * pixels + p]
            if e < 0:
                continue
            for c in range(channels):
                out[v, c, p] = _float32_bits(np.int64(features[e, c]), kind)
