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

What it returns is per pixel, over (V, h, w): the winning entry's feature widened to
float32 (0: none), a hit mask, its z-depth (+inf: none) and its world point (NaN: none).

Speed (the benchmark's room, 64x64, ~2,800 samples a view): the samples of a view are
collected in scratch arrays the caller owns and passes in (:class:`ReadScratch`), never in
arrays the kernel grows itself: an array variable reassigned inside the sample loop costs
numba reference counting on every sample (0.15 ms a read against 0.07 ms with fixed
arrays). When a view has more samples than the scratch holds the kernel says how many,
and the caller grows the scratch and reads again (reads change nothing). A visible brick's
entries are found through its occupancy bits (:attr:`~.index.BrickIndex.occupancy`), not
by scanning its voxel slots, 95% of them empty there (a third of the kernel's time once
the samples were in fixed arrays). A visible chunk's bricks are found through its member
bits likewise, and a view visits only its own world's chunks (:func:`_chunks_by_batch`),
not the chunk table of every world. The bricks of visible chunks are listed first and culled
in a SIMD loop (10% of the kernel), and the samples likewise gathered, projected in a SIMD
loop, then compacted.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

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


# How a read widens a stored feature's bits to float32: float16, bfloat16, float32 (a copy).
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
def _read_view(v, row, frames, c2w, chunk_order, chunk_start, chunk_keys, members, member_bits, brick_keys, entry_of,
               occupancy, points, origins, features, kind, intrinsics, width, height, chunk_size, brick_edge,
               chunk_frustum, brick_frustum, max_depth, revisit_radius, tolerance, s_pixel, s_z, s_u, s_v, s_entry,
               s_here, winner, out_latents, out_mask, out_depth, out_points):
    """Read view ``v`` with scratch row ``row``; returns its sample count (over the scratch's: nothing written)."""
    m = world_to_camera_one(c2w[v])
    origin0, origin1, origin2 = np.float32(c2w[v, 0, 3]), np.float32(c2w[v, 1, 3]), np.float32(c2w[v, 2, 3])
    b = v // frames
    fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
    near = np.float32(1e-6)
    offset = np.int64(1 << (_AXIS_BITS - 1))
    half_chunk, half_brick = chunk_frustum[10], brick_frustum[10]
    prefer = revisit_radius > 0
    capacity = s_pixel.shape[1]
    pixels = width * height
    base = v * pixels
    for p in range(base, base + pixels):
        winner[p] = -1
        out_mask[p] = False
        out_depth[p] = np.inf
        out_points[p, 0], out_points[p, 1], out_points[p, 2] = np.nan, np.nan, np.nan
    for c in range(out_latents.shape[1]):
        for p in range(pixels):
            out_latents[v, c, p] = 0
    count = 0
    # The entries of visible bricks, in the torch path's order (chunk slot, member brick, voxel).
    sp, sz, su, sv, se, sh = s_pixel[row], s_z[row], s_u[row], s_v[row], s_entry[row], s_here[row]
    # First the bricks of visible chunks, then their cull in a loop without branches (SIMD code,
    # as the projection below), then the entries of the visible ones through their occupancy bits.
    bricks = 0
    for i in range(chunk_start[b], chunk_start[b + 1]):
        c = chunk_order[i]
        key = chunk_keys[c]
        if not _cell_visible(m, key, chunk_size, offset, brick_edge, half_chunk, chunk_frustum):
            continue
        for word in range(member_bits.shape[1]):
            bits = member_bits[c, word]
            while bits != 0:  # lowest member first
                if bricks < capacity:
                    sp[bricks] = members[c, word * 64 + trailing_zeros(bits)]
                bits &= bits - 1
                bricks += 1
    if bricks > capacity:
        return bricks
    for i in range(bricks):
        key = brick_keys[sp[i]]
        su[i] = np.float32(((key >> (2 * _AXIS_BITS)) & _AXIS_MASK) - offset)
        sv[i] = np.float32(((key >> _AXIS_BITS) & _AXIS_MASK) - offset)
        sz[i] = np.float32((key & _AXIS_MASK) - offset)
    zero = np.float32(0.0)
    r00, r01, r02, r03 = m[0, 0], m[0, 1], m[0, 2], m[0, 3]
    r10, r11, r12, r13 = m[1, 0], m[1, 1], m[1, 2], m[1, 3]
    r20, r21, r22, r23 = m[2, 0], m[2, 1], m[2, 2], m[2, 3]
    f0, f1, f2, f3, f4, f5 = brick_frustum[0], brick_frustum[1], brick_frustum[2], brick_frustum[3], \
        brick_frustum[4], brick_frustum[5]
    f6, f7, f8, f9 = brick_frustum[6], brick_frustum[7], brick_frustum[8], brick_frustum[9]
    for i in range(bricks):  # _cell_visible's sums and comparisons, all of them evaluated
        x, y, z = su[i] * brick_edge + half_brick, sv[i] * brick_edge + half_brick, sz[i] * brick_edge + half_brick
        lx = ((zero + r00 * x) + r01 * y) + r02 * z + r03
        ly = ((zero + r10 * x) + r11 * y) + r12 * z + r13
        lz = ((zero + r20 * x) + r21 * y) + r22 * z + r23
        sh[i] = (lz > f0) & (lz < f1) & ((lx - f2 * lz) <= f6) & ((-lx - f3 * lz) <= f7) & ((ly - f4 * lz) <= f8) \
            & ((-ly - f5 * lz) <= f9)
    n = 0
    for i in range(bricks):
        if not sh[i]:
            continue
        slot = sp[i]
        for word in range(occupancy.shape[1]):
            bits = occupancy[slot, word]
            while bits != 0:  # lowest voxel first
                voxel = word * 64 + trailing_zeros(bits)
                bits &= bits - 1
                if n < capacity:
                    se[n] = entry_of[slot, voxel]
                n += 1
    if n > capacity:
        return n
    # Projected, all of them, in a loop without branches or gathers (the points are copied in
    # first), which LLVM turns into SIMD code: 20% of the read faster than one loop that skips early.
    for i in range(n):
        e = se[i]
        su[i], sv[i], sz[i] = points[e, 0], points[e, 1], points[e, 2]
    width32, height32 = np.float32(width), np.float32(height)
    for i in range(n):
        px, py, pz = su[i], sv[i], sz[i]
        z = ((zero + r20 * px) + r21 * py) + r22 * pz + r23  # as _local: torch's small-bmm order
        lx = ((zero + r00 * px) + r01 * py) + r02 * pz + r03
        ly = ((zero + r10 * px) + r11 * py) + r12 * pz + r13
        safe_z = z if z > near else near
        u = fx * lx / safe_z + cx
        vv = fy * ly / safe_z + cy
        column, row_ = np.floor(u), np.floor(vv)
        sz[i], su[i], sv[i] = z, u, vv
        sh[i] = (z > near) & (z <= max_depth) & (column >= 0) & (column < width32) & (row_ >= 0) & (row_ < height32)
    # The samples that land on a pixel, compacted in order (in place: count <= i).
    for i in range(n):
        if sh[i]:
            e = se[i]
            sp[count] = np.int64(np.floor(sv[i])) * width + np.int64(np.floor(su[i]))
            sz[count], su[count], sv[count], se[count] = sz[i], su[i], sv[i], e
            if prefer:
                d0 = origins[e, 0] - origin0
                d1 = origins[e, 1] - origin1
                d2 = origins[e, 2] - origin2
                acc = _fma32(d0, d0, np.float32(0.0))
                acc = _fma32(d1, d1, acc)
                acc = _fma32(d2, d2, acc)
                sh[count] = np.sqrt(acc) <= revisit_radius
            count += 1

    has_preferred = np.zeros(pixels, np.bool_)
    if prefer:
        for i in range(count):
            if sh[i]:
                has_preferred[sp[i]] = True
    nearest = np.full(pixels, np.inf, np.float32)
    for i in range(count):
        p = sp[i]
        if (not prefer or sh[i] or not has_preferred[p]) and sz[i] < nearest[p]:
            nearest[p] = sz[i]
    best = np.full(pixels, np.inf, np.float32)
    half = np.float32(0.5)
    for i in range(count):
        p = sp[i]
        if prefer and not sh[i] and has_preferred[p]:
            continue
        if not sz[i] <= nearest[p] * tolerance:
            continue
        du = su[i] - np.floor(su[i]) - half
        dv = sv[i] - np.floor(sv[i]) - half
        off = du * du + dv * dv
        if off <= best[p]:  # ties: the later sample
            best[p] = off
            winner[base + p] = i
    for p in range(pixels):
        i = winner[base + p]
        if i >= 0:
            e = se[i]
            out_mask[base + p] = True
            out_depth[base + p] = sz[i]
            out_points[base + p, 0], out_points[base + p, 1], out_points[base + p, 2] = \
                points[e, 0], points[e, 1], points[e, 2]
            for c in range(out_latents.shape[1]):
                out_latents[v, c, p] = _float32_bits(np.int64(features[e, c]), kind)
    return count


@njit(cache=True)
def _chunks_by_batch(chunk_keys, batch_of_world, batches):
    """Chunk slots grouped by the batch item that reads their world, in slot order within a group (the order a
    view visits them in), and where each group starts: item b's are ``order[start[b]:start[b + 1]]``.

    A view then visits its own world's chunks, not every slot of every world: with 64 worlds, a read
    had scanned 64 times the chunk table, once per view.
    """
    start = np.zeros(batches + 1, np.int64)
    for c in range(chunk_keys.shape[0]):
        key = chunk_keys[c]
        if key >= 0 and batch_of_world[key >> (3 * _AXIS_BITS)] >= 0:
            start[batch_of_world[key >> (3 * _AXIS_BITS)] + 1] += 1
    for b in range(batches):
        start[b + 1] += start[b]
    order = np.empty(start[batches], np.int64)
    filled = start[:batches].copy()
    for c in range(chunk_keys.shape[0]):
        key = chunk_keys[c]
        if key >= 0 and batch_of_world[key >> (3 * _AXIS_BITS)] >= 0:
            b = batch_of_world[key >> (3 * _AXIS_BITS)]
            order[filled[b]] = c
            filled[b] += 1
    return order, start


@njit(cache=True)
def _read_serial(frames, c2w, batch_of_world, chunk_keys, members, member_bits, brick_keys, entry_of, occupancy,
                 points, origins, features, kind, intrinsics, width, height, chunk_size, brick_edge, chunk_frustum,
                 brick_frustum, max_depth, revisit_radius, tolerance, s_pixel, s_z, s_u, s_v, s_entry, s_here, winner,
                 out_latents, out_mask, out_depth, out_points):
    # The float arguments come as Python floats (numba types a numpy scalar argument in 0.7 us).
    brick_edge, max_depth = np.float32(brick_edge), np.float32(max_depth)
    revisit_radius, tolerance = np.float32(revisit_radius), np.float32(tolerance)
    chunk_order, chunk_start = _chunks_by_batch(chunk_keys, batch_of_world, c2w.shape[0] // frames)
    needed = 0
    for v in range(c2w.shape[0]):  # one scratch row, reused view after view
        needed = max(needed, _read_view(
            v, 0, frames, c2w, chunk_order, chunk_start, chunk_keys, members, member_bits, brick_keys, entry_of,
            occupancy, points, origins, features, kind, intrinsics, width, height, chunk_size, brick_edge, chunk_frustum,
            brick_frustum, max_depth, revisit_radius, tolerance, s_pixel, s_z, s_u, s_v, s_entry, s_here, winner,
            out_latents, out_mask, out_depth, out_points))
    return needed


@njit(cache=True, parallel=True)
def _read_parallel(frames, c2w, batch_of_world, chunk_keys, members, member_bits, brick_keys, entry_of, occupancy,
                   points, origins, features, kind, intrinsics, width, height, chunk_size, brick_edge, chunk_frustum,
                   brick_frustum, max_depth, revisit_radius, tolerance, s_pixel, s_z, s_u, s_v, s_entry, s_here,
                   winner, out_latents, out_mask, out_depth, out_points):
    brick_edge, max_depth = np.float32(brick_edge), np.float32(max_depth)
    revisit_radius, tolerance = np.float32(revisit_radius), np.float32(tolerance)
    chunk_order, chunk_start = _chunks_by_batch(chunk_keys, batch_of_world, c2w.shape[0] // frames)
    counts = np.zeros(c2w.shape[0], np.int64)
    for v in prange(c2w.shape[0]):  # a scratch row per view
        counts[v] = _read_view(
            v, v, frames, c2w, chunk_order, chunk_start, chunk_keys, members, member_bits, brick_keys, entry_of,
            occupancy, points, origins, features, kind, intrinsics, width, height, chunk_size, brick_edge, chunk_frustum,
            brick_frustum, max_depth, revisit_radius, tolerance, s_pixel, s_z, s_u, s_v, s_entry, s_here, winner,
            out_latents, out_mask, out_depth, out_points)
    return counts.max()


@njit(cache=True)
def world_to_camera_one(c2w):
    """(4, 4) float32 inverse of a (4, 4) float64 rigid camera-to-world pose, the numbers
    ``invert_pose(c2w).to(torch.float32)`` gives: the translation ``-R^T t`` summed as torch's
    small-``bmm`` loop does, ``((0 + a0 * t0) + a1 * t1) + a2 * t2`` in float64, then rounded once."""
    inverse = np.zeros((4, 4), np.float32)
    for i in range(3):
        total = 0.0 + (-c2w[0, i]) * c2w[0, 3]
        total = total + (-c2w[1, i]) * c2w[1, 3]
        total = total + (-c2w[2, i]) * c2w[2, 3]
        for j in range(3):
            inverse[i, j] = np.float32(c2w[j, i])
        inverse[i, 3] = np.float32(total)
    inverse[3, 3] = 1.0
    return inverse


def frustum_constants(camera, radius: float, max_depth: float) -> np.ndarray:
    """The float32 numbers :func:`~.raster.spheres_in_frustum` compares with, for spheres of ``radius``
    (the last one: the offset from a cell's first corner to its centre is set by the caller)."""
    left, right = camera.cx / camera.fx, (camera.width - camera.cx) / camera.fx
    top, bottom = camera.cy / camera.fy, (camera.height - camera.cy) / camera.fy
    return np.array([-radius, max_depth + radius, right, left, bottom, top,
                     radius * np.sqrt(1 + right * right), radius * np.sqrt(1 + left * left),
                     radius * np.sqrt(1 + bottom * bottom), radius * np.sqrt(1 + top * top), 0.0], np.float32)


class ReadScratch:
    """Sample arrays a read collects a view's samples in, and each pixel's winning sample, kept between reads and
    grown when short."""

    def __init__(self, capacity: int = 4096):
        self.rows = 0
        self.capacity = capacity
        self.winner = np.empty(0, np.int64)
        self._allocate(1)

    def _allocate(self, rows: int) -> None:
        self.rows = rows
        shape = (rows, self.capacity)
        self.pixel, self.entry = np.empty(shape, np.int64), np.empty(shape, np.int64)
        self.z, self.u, self.v = np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, np.float32)
        self.here = np.empty(shape, np.bool_)

    def at_least(self, rows: int, capacity: int = 0, pixels: int = 0) -> ReadScratch:
        if rows > self.rows or capacity > self.capacity:
            self.capacity = max(self.capacity, capacity)
            self._allocate(max(rows, self.rows))
        if pixels > self.winner.shape[0]:
            self.winner = np.empty(pixels, np.int64)
        return self


def read_constants(camera, chunk_size: int, brick_edge: float, max_depth: float):
    """(intrinsics, chunk frustum, brick frustum) float32 arrays of a read through ``camera`` (cache them)."""
    chunk_edge = chunk_size * brick_edge
    chunk_frustum = frustum_constants(camera, 0.5 * np.sqrt(3) * chunk_edge, max_depth)
    chunk_frustum[10] = 0.5 * chunk_edge
    brick_frustum = frustum_constants(camera, 0.5 * np.sqrt(3) * brick_edge, max_depth)
    brick_frustum[10] = 0.5 * brick_edge
    return np.array([camera.fx, camera.fy, camera.cx, camera.cy], np.float32), chunk_frustum, brick_frustum


def read(frames, c2w, batch_of_world, chunk_keys, members, member_bits, brick_keys, entry_of, occupancy, points,
         origins, features, kind, camera, constants, chunk_size, brick_edge, max_depth, revisit_radius,
         surface_tolerance, scratch, parallel):
    """Features (V, C, h*w) float32, hit mask (V*h*w,) bool, z-depth (V*h*w,) float32 and world point
    (V*h*w, 3) float32 of each pixel of the views ``c2w`` (V, 4, 4) float64.

    View v belongs to batch item ``v // frames``, which reads world k when ``batch_of_world[k]``
    is that item (-1: no item reads world k). ``member_bits``: the chunks' member bits
    (:class:`~.chunks.ChunkIndex`); ``occupancy``: the bricks' occupancy bits
    (:attr:`~.index.BrickIndex.occupancy`). ``features``: the pool's features as integers of
    their size, ``kind`` how to widen them (:data:`WIDEN`); ``constants``: :func:`read_constants`;
    ``scratch``: a :class:`ReadScratch`, grown here when a view has more samples than it holds.
    """
    views = c2w.shape[0]
    width, height = camera.width, camera.height
    pixels = height * width
    latents = np.empty((views, features.shape[1], pixels), np.float32)
    mask = np.empty(views * pixels, np.bool_)
    depth = np.empty(views * pixels, np.float32)
    out_points = np.empty((views * pixels, 3), np.float32)
    intrinsics, chunk_frustum, brick_frustum = constants
    parallel = parallel and views > 1
    kernel = _read_parallel if parallel else _read_serial
    scratch = scratch.at_least(views if parallel else 1, pixels=views * pixels)
    while True:
        needed = kernel(frames, c2w, batch_of_world, chunk_keys, members, member_bits, brick_keys, entry_of,
                        occupancy, points, origins, features, kind, intrinsics, width, height, chunk_size,
                        brick_edge, chunk_frustum, brick_frustum, max_depth, revisit_radius,
                        1 + surface_tolerance, scratch.pixel, scratch.z, scratch.u, scratch.v, scratch.entry,
                        scratch.here, scratch.winner, latents.view(np.uint32), mask, depth, out_points)
        if needed <= scratch.capacity:
            return latents, mask, depth, out_points
        scratch.at_least(scratch.rows, max(needed, 2 * scratch.capacity))  # then read again: reads change nothing
