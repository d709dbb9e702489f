"""A memory write as compiled CPU kernels (numba): address + brick lookup, then merge + store.

The same steps as :meth:`LatentSpatialMemory.write <.latent_memory.LatentSpatialMemory.write>`
in torch after the lift: :meth:`~.index.BrickIndex.address` and the table lookup of
:meth:`~.index.BrickIndex.slots_for` (:func:`address`), then
:func:`~.merge.nearest_per_voxel`, the stamp of entries observed again, :func:`~.merge.accepts`,
:meth:`~.pool.EntryPool.take`, :meth:`~.pool.EntryPool.store` and
:meth:`~.index.BrickIndex.mark_written` (:func:`merge_and_store`). In torch those are ~60
small tensor operations; here one pass each over the written pixels. Bricks a write needs
but the table lacks are allocated by the torch code (:meth:`~.index.BrickIndex.slots_for`,
with its eviction) between the two kernels: after warm-up that is the rare case. In the
common case :func:`write` does it all in one call (NaN check, unproject, address, clock,
merge and store): the Python around separate kernels (arguments converted and checked
per call) cost ten times the kernels themselves on a 64x64 step.

Exactness (tests/test_compiled.py compares whole memories bit for bit): voxel coordinates
are ``floor(point / voxel_size)`` in float32, as torch divides a float32 tensor by a Python
scalar; winners come out in ascending (brick slot, voxel) order, as ``torch.unique`` sorts
them, so new entries take pool slots in the torch path's order; features are converted to
the pool's dtype by torch before the kernel, which then only copies their bits, except float32
latents for a float16 pool, which the kernel converts as torch does (:func:`half_bits`), only
those it stores, and leaves to torch if one of those is NaN.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .keys_kernels import _home
# numba caches this module's kernels by this file alone: an edit of the helper imported above must
# come with an edit here, or a checkout keeps machine code with the old helper (compiled.py).

_EMPTY = -1
_AXIS_BITS = 16
_AXIS_OFFSET = 1 << (_AXIS_BITS - 1)

# ``address`` status: everything found; some bricks missing (allocate, then merge); a point out of range.
# ``write`` adds: depth holds NaN (nothing changed); the pool is too small for the new entries (grow, then merge);
# a feature to store is NaN, which the kernel does not convert (convert with torch, then merge).
FOUND, MISSING, OUT_OF_RANGE, HAS_NAN, SHORT, NAN_FEATURE = 0, 1, 2, 3, 4, 5
# ``merge_and_store`` policies, as :data:`~.merge.MERGE_POLICIES` names them.
POLICY = {"first": 0, "closest": 1, "latest": 2}


@njit(cache=True)
def address(points, depth, keep, samples_per_world, world_index, voxel_size, brick_size, table_keys, table_values,
            mask, pixel, keys, local, slot):
    """Compact the written pixels and address each.

    Args:
        points: (P, 3) float32 world point of every latent pixel (P = B * T * h * w).
        depth: (P,) float32 observed depth; a pixel is written where it is finite and > 0 and ``keep``.
        keep: (P,) bool.
        samples_per_world: T * h * w, pixels per batch item.
        world_index: (B,) int64 world of each batch item.
        voxel_size: the voxel edge, divided by as float32.

    Fills ``pixel`` (flat pixel index), ``keys`` (brick key), ``local`` (voxel in brick) and
    ``slot`` (brick slot, -1 if not allocated) for the first ``count`` entries.

    Returns:
        (count, status): status FOUND, MISSING (some slot is -1) or OUT_OF_RANGE.
    """
    count = 0
    status = FOUND
    limit = np.int64(1 << _AXIS_BITS)
    voxel = np.float32(voxel_size)  # (a Python float is typed faster than a numpy scalar)
    for p in range(depth.shape[0]):
        d = depth[p]
        if not (np.isfinite(d) and d > 0 and keep[p]):
            continue
        world = world_index[p // samples_per_world]
        v0 = np.int64(np.floor(points[p, 0] / voxel))
        v1 = np.int64(np.floor(points[p, 1] / voxel))
        v2 = np.int64(np.floor(points[p, 2] / voxel))
        b0, b1, b2 = v0 // brick_size, v1 // brick_size, v2 // brick_size
        local[count] = ((v0 - b0 * brick_size) * brick_size + (v1 - b1 * brick_size)) * brick_size \
            + (v2 - b2 * brick_size)
        s0, s1, s2 = b0 + _AXIS_OFFSET, b1 + _AXIS_OFFSET, b2 + _AXIS_OFFSET
        if s0 < 0 or s1 < 0 or s2 < 0 or s0 >= limit or s1 >= limit or s2 >= limit:
            status = OUT_OF_RANGE
        key = (world << (3 * _AXIS_BITS)) | (s0 << (2 * _AXIS_BITS)) | (s1 << _AXIS_BITS) | s2
        keys[count] = key
        pixel[count] = p
        found = _EMPTY
        h = _home(key) & mask
        while True:
            k = table_keys[h]
            if k == key:
                found = table_values[h]
                break
            if k == _EMPTY:
                break
            h = (h + 1) & mask
        slot[count] = found
        if found < 0 and status == FOUND:
            status = MISSING
        count += 1
    return count, status


@njit(cache=True, inline="always")
def half_bits(f):
    """The float16 bits (int16) of the float32 whose bits are ``f`` (int64), rounded to nearest, ties to even,
    as torch's CPU conversion rounds (checked against it on every float32 but NaN, whose payload torch's
    vector and scalar conversions treat differently: the caller keeps NaN away)."""
    sign = (f >> 16) & 0x8000
    a = f & 0x7FFFFFFF
    if a >= 0x7F800000:
        return np.int16(sign | 0x7C00)
    e = (a >> 23) - 127
    if e > 15:
        return np.int16(sign | 0x7C00)
    m = a & 0x7FFFFF
    if e >= -14:
        h = ((e + 15) << 10) | (m >> 13)
        r = m & 0x1FFF
        if r > 0x1000 or (r == 0x1000 and (h & 1) == 1):
            h += 1  # a carry into the exponent is right: the next binade, or inf
        return np.int16(sign | h)
    shift = -e - 1  # a subnormal half (or zero): the 24-bit significand in units of 2**-24
    if shift > 24:
        return np.int16(sign)
    full = m | 0x800000
    q = full >> shift
    r = full & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if r > half or (r == half and (q & 1) == 1):
        q += 1
    return np.int16(sign | q)


@njit(cache=True)
def _voxel_order(voxel, slot, local, voxels_per_brick, slots):
    """``np.argsort(voxel, kind="mergesort")`` of ``voxel = slot * voxels_per_brick + local``: samples by voxel,
    the samples of one voxel in their order (the only permutation that is, so any stable sort gives it).

    numba's mergesort takes 0.2 ms for the 4,096 samples of a 64-world write that keeps every pixel
    (``memory_write="all"``; the default "unseen" keeps a few hundred): two counting passes, by voxel in
    brick then by brick slot, take 20 us there. They pass over a count per slot, so they are used only
    when there are enough samples to pay for that.
    """
    n = voxel.shape[0]
    if 8 * n < slots:
        return np.argsort(voxel, kind="mergesort")
    by_local = _stable_by(local, np.arange(n), voxels_per_brick)
    return _stable_by(slot, by_local, slots)


@njit(cache=True)
def _stable_by(key, indices, buckets):
    """``indices`` reordered by ``key[index]`` in [0, buckets), keeping their order within a key (one
    counting pass)."""
    start = np.zeros(buckets + 1, np.int64)
    for i in indices:
        start[key[i] + 1] += 1
    for k in range(buckets):
        start[k + 1] += start[k]
    out = np.empty(indices.shape[0], np.int64)
    for i in indices:
        out[start[key[i]]] = i
        start[key[i]] += 1
    return out


@njit(cache=True)
def merge_and_store(pixel, slot, local, depth, samples_per_world, frames, pixels_per_frame, world_index, ticks,
                    entry_of, occupancy, brick_last_write, step, policy, closest_factor, free, in_use, capacity,
                    entries_per_world, features, latents32, points, origins, pool_features, pool_points,
                    pool_depth, pool_origins, pool_last_write):
    """Keep the nearest sample of each voxel, merge it with what the voxel holds, store it.

    Args:
        pixel, slot, local: (n,) from :func:`address` (every slot allocated).
        depth: (P,) float32 observed depth of every pixel.
        ticks: (num_worlds,) int64 write clocks, already advanced for this write.
        entry_of, occupancy, brick_last_write: the brick index's arrays (changed in place).
        closest_factor: ``1 + closest_tolerance``, multiplied by as float32.
        free: int64 free pool entries, used first (lowest position first); then ``in_use`` onwards.
        features: (B * T, C, h * w) latents in the pool's dtype (bits: any same-size integer view); or,
            empty, ``latents32``: (B * T, C, h * w) float32 latents as uint32 bits, for a float16 pool,
            converted here (only what is stored: a torch conversion of every latent cost more than the kernel).
        points: (P, 3) float32; origins: (B * T, 3) float32 camera origin of each frame.

    Returns:
        (written, taken_from_free, fresh): ``fresh`` new entries from ``in_use`` on. When
        those would not fit in ``capacity``, nothing is changed and ``written`` is -1: grow
        the pool by ``fresh`` (as :meth:`~.pool.EntryPool.take` would) and call again. When a
        latent to store from ``latents32`` is NaN, nothing is changed and ``written`` is -2:
        convert the latents with torch and call again with ``features``.
    """
    n = pixel.shape[0]
    voxels_per_brick = entry_of.shape[1]
    factor = np.float32(closest_factor)  # (a Python float is typed faster than a numpy scalar)
    voxel = np.empty(n, np.int64)
    for i in range(n):
        voxel[i] = slot[i] * voxels_per_brick + local[i]
    order = _voxel_order(voxel, slot, local, voxels_per_brick, entry_of.shape[0])
    # The winner of each voxel: nearest observed depth, then the later frame, then the later sample.
    winners = np.empty(n, np.int64)
    count = 0
    i = 0
    while i < n:
        best = order[i]
        j = i + 1
        while j < n and voxel[order[j]] == voxel[best]:
            c = order[j]
            if depth[pixel[c]] < depth[pixel[best]] or (
                    depth[pixel[c]] == depth[pixel[best]]
                    and (pixel[c] // pixels_per_frame) % frames >= (pixel[best] // pixels_per_frame) % frames):
                best = c
            j += 1
        winners[count] = best
        count += 1
        i = j
    entry = np.empty(count, np.int64)
    accepted = np.empty(count, np.bool_)
    new = 0
    for k in range(count):
        c = winners[k]
        e = np.int64(entry_of[slot[c], local[c]])
        entry[k] = e
        if policy == 0:
            accepted[k] = e < 0
        elif policy == 1:
            accepted[k] = e < 0 or depth[pixel[c]] <= pool_depth[max(e, 0)] * factor
        else:
            accepted[k] = True
        if accepted[k] and e < 0:
            new += 1
    fresh = max(0, new - free.shape[0])
    if in_use + fresh > capacity:
        return -1, 0, fresh
    convert = features.shape[0] == 0
    channels = latents32.shape[1] if convert else features.shape[1]
    if convert:
        for k in range(count):
            if accepted[k]:
                p = pixel[winners[k]]
                frame, q = p // pixels_per_frame, p % pixels_per_frame
                for ch in range(channels):
                    if (latents32[frame, ch, q] & 0x7FFFFFFF) > 0x7F800000:
                        return -2, 0, fresh
    # A stored entry whose voxel this write observed again was seen now, whatever the merge keeps.
    for k in range(count):
        if entry[k] >= 0:
            c = winners[k]
            pool_last_write[entry[k]] = np.int32(ticks[world_index[pixel[c] // samples_per_world]])
    taken = 0
    written = 0
    for k in range(count):
        if not accepted[k]:
            continue
        c = winners[k]
        p = pixel[c]
        world = world_index[p // samples_per_world]
        e = entry[k]
        if e < 0:
            e = free[taken] if taken < free.shape[0] else in_use + (taken - free.shape[0])
            taken += 1
            entry_of[slot[c], local[c]] = np.int32(e)
            occupancy[slot[c], local[c] >> 6] |= np.int64(1) << (local[c] & 63)
            entries_per_world[world] += 1
        frame, q = p // pixels_per_frame, p % pixels_per_frame
        if convert:
            for ch in range(channels):
                pool_features[e, ch] = half_bits(np.int64(latents32[frame, ch, q]))
        else:
            for ch in range(channels):
                pool_features[e, ch] = features[frame, ch, q]
        for a in range(3):
            pool_points[e, a] = points[p, a]
            pool_origins[e, a] = origins[frame, a]
        pool_depth[e] = depth[p]
        pool_last_write[e] = np.int32(ticks[world])
        written += 1
    for i in range(n):
        brick_last_write[slot[i]] = step
    return written, min(taken, free.shape[0]), fresh


@njit(cache=True)
def unproject(depth, c2w, intrinsics, points):
    """:func:`~mirage_env.geometry.unproject` of (V, h, w) float32 depth with (V, 4, 4) float32 poses into
    ``points`` (V * h * w, 3) float32, in torch's order: ``(u - cx) / fx * z`` with u the pixel centre, then
    the rotation as torch's small-``bmm`` loop, ``((0 + r0 * x) + r1 * y) + r2 * z``, plus the translation."""
    fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
    views, h, w = depth.shape
    half = np.float32(0.5)
    n = 0
    for v in range(views):
        for i in range(h):
            for j in range(w):
                z = depth[v, i, j]
                x = (np.float32(j) + half - cx) / fx * z
                y = (np.float32(i) + half - cy) / fy * z
                for r in range(3):
                    acc = np.float32(0.0)
                    acc += c2w[v, r, 0] * x
                    acc += c2w[v, r, 1] * y
                    acc += c2w[v, r, 2] * z
                    points[n, r] = acc + c2w[v, r, 3]
                n += 1


@njit(cache=True)
def write(checked_depth, depth, keep, lifted, c2w, intrinsics, frames, world_index, voxel_size, brick_size, table_keys,
          table_values, mask, ticks, step, entry_of, occupancy, brick_last_write, policy, closest_factor, free, in_use, capacity,
          entries_per_world, features, latents32, pool_features, pool_points, pool_depth, pool_origins,
          pool_last_write, pixel, keys, local, slot, points, origins, gained):
    """A whole write after the lift, in one call, when every brick it needs exists.

    Args:
        checked_depth: float32 depth as given (any length): a NaN anywhere and nothing is done.
        depth: (V, h, w) float32 depth on the latent grid (V = B * T).
        keep: (V * h * w,) bool, or empty: keep every pixel.
        lifted: (V * h * w, 3) float64 points of an image-resolution lift, or empty: unproject
            ``depth`` along the pixel centre rays (:func:`unproject`).
        c2w: (V, 4, 4) float64 poses; intrinsics: float32 (fx, fy, cx, cy) of the latent grid.
        step: the brick index's write count after this write.
        The rest as :func:`address` and :func:`merge_and_store` take them; ``pixel``, ``keys``,
        ``local``, ``slot`` (V * h * w,) and ``points`` (V * h * w, 3), ``origins`` (V, 3) are scratch.
        gained: (num_worlds,) int64; unless HAS_NAN, ``entries_per_world`` as it was before the write,
        and with FOUND what the write changed it by (after another status: the caller subtracts).

    Returns:
        (status, count, written, taken, fresh). HAS_NAN: nothing changed. Otherwise the write
        clocks of ``world_index`` have advanced by one (once each, however often named) and
        ``count`` pixels are addressed in the scratch; FOUND: merged and stored, as
        :func:`merge_and_store` returns; MISSING, OUT_OF_RANGE, SHORT or NAN_FEATURE: nothing else changed.
    """
    for i in range(checked_depth.shape[0]):
        if np.isnan(checked_depth[i]):
            return HAS_NAN, 0, 0, 0, 0
    gained[:] = entries_per_world
    views, h, w = depth.shape
    flat = depth.reshape(-1)
    if lifted.shape[0] == 0:
        c2w32 = np.empty((views, 4, 4), np.float32)
        for v in range(views):
            for r in range(4):
                for c in range(4):
                    c2w32[v, r, c] = np.float32(c2w[v, r, c])
        unproject(depth, c2w32, intrinsics, points)
    else:
        for p in range(lifted.shape[0]):
            for a in range(3):
                points[p, a] = np.float32(lifted[p, a])
    for v in range(views):
        for a in range(3):
            origins[v, a] = np.float32(c2w[v, a, 3])
    keep_all = keep.shape[0] == 0
    count, status = address(points, flat, keep if not keep_all else np.ones(flat.shape[0], np.bool_),
                            frames * h * w, world_index, voxel_size, brick_size, table_keys, table_values, mask,
                            pixel, keys, local, slot)
    advanced = np.zeros(ticks.shape[0], np.bool_)
    for b in range(world_index.shape[0]):
        if not advanced[world_index[b]]:
            advanced[world_index[b]] = True
            ticks[world_index[b]] += 1
    if status != FOUND:
        return status, count, 0, 0, 0
    written, taken, fresh = merge_and_store(
        pixel[:count], slot[:count], local[:count], flat, frames * h * w, frames, h * w, world_index, ticks, entry_of,
        occupancy, brick_last_write, step, policy, closest_factor, free, in_use, capacity, entries_per_world, features,
        latents32, points, origins, pool_features, pool_points, pool_depth, pool_origins, pool_last_write)
    if written < 0:
        return SHORT if written == -1 else NAN_FEATURE, count, 0, 0, fresh
    for world in range(gained.shape[0]):
        gained[world] = entries_per_world[world] - gained[world]
    return FOUND, count, written, taken, fresh


class WriteScratch:
    """What a write of ``views`` latent frames of (h, w) fills before it stores (kept between writes of that shape).

    ``pixel``, ``keys``, ``local``, ``slot``, ``points`` and ``origins``: the scratch of :func:`write`;
    ``lifted`` (views, h, w, 3) float64 and ``latent_depth`` (views, h, w) float32: the lift's output;
    ``gained`` (num_worlds,): the entries each world gained (:func:`write`).
    Nothing in it outlives a write: a write fills what it reads.
    """

    def __init__(self, views: int, h: int, w: int, num_worlds: int):
        pixels = views * h * w
        self.gained = np.empty(num_worlds, np.int64)
        self.shape = (views, h, w)
        self.pixel, self.keys, self.local, self.slot = (np.empty(pixels, np.int64) for _ in range(4))
        self.points, self.origins = np.empty((pixels, 3), np.float32), np.empty((views, 3), np.float32)
        self.lifted, self.latent_depth = np.empty((views, h, w, 3), np.float64), np.empty((views, h, w), np.float32)


# The kernels' "no float32 latents to convert" (the features come as the pool's bits).
NO_LATENTS32 = np.zeros((0, 0, 0), np.uint32)
