"""The dominant-surface depth lift as a compiled CPU kernel (numba).

The same maths as :func:`~.lift.lift_dominant_surface`, one latent pixel at a time, in
torch's float order, so points and depths are bit-for-bit the torch path's
(tests/test_compiled.py): the median by selection (the sorted patch's middle value), the centroid's sums exact
(they add multiples of 0.5 far below 2**24, so their order cannot matter), the first
index on ties as ``argmin``, and the camera-to-world product as torch's small-``bmm``
loop, ``((0 + r0 * x) + r1 * y) + r2 * z`` in float64.

Speed (64x64 frames, f = 8, hinted: ~17 -> ~8 us a view): the centroid's sums come from
counts of the band per row and column, and the argmin from a minimum per row over the
column terms (rounding is monotonic, so adding a row's term keeps the order), then one
scan for the first pixel at that distance; the data-dependent branches and the chain of
64 compares of the pixel-by-pixel argmin were half the kernel.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def kth_smallest(values, k):
    """The value ``np.sort(values)[k]`` is, by selection (``values`` is reordered); a full sort if any is NaN.

    The latent-grid and lift kernels take a median of every patch; selection touches each value
    about twice where a sort touches it log n times, and gives the same number (NaN sorts last in both).
    """
    n = values.shape[0]
    for i in range(n):
        if np.isnan(values[i]):
            values.sort()
            return values[k]
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return values[k]
    return values[k]


@njit(cache=True, inline="always")
def _band(patch, median, limit, f, near, row_count, column_count):
    """Mark the patch pixels within ``limit`` of ``median`` (the dominant surface) and count them per row and column.

    The centroid's sums are exact (multiples of 0.5 far below 2**24), so they may be taken from these counts
    in any order and still equal the torch path's sums over the pixels.
    """
    for b in range(f):
        column_count[b] = 0
    for a in range(f):
        inside_row = 0
        for b in range(f):
            inside = abs(patch[a * f + b] - median) <= limit
            near[a * f + b] = inside
            inside_row += inside
            column_count[b] += inside
        row_count[a] = inside_row


@njit(cache=True)
def _lift_view(v, depth, c2w, intrinsics, factor, tolerance, hint, use_hint, keep, points, chosen_depth):
    fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
    f = factor
    middle = (f * f) // 2
    h, w = chosen_depth.shape[1], chosen_depth.shape[2]
    patch = np.empty(f * f, np.float32)
    ordered = np.empty(f * f, np.float32)
    near = np.empty(f * f, np.bool_)
    row_count = np.empty(f, np.int64)
    column_count = np.empty(f, np.int64)
    row_distance = np.empty(f, np.float32)
    column_distance = np.empty(f, np.float32)
    row_least = np.empty(f, np.float32)
    half = np.float32(0.5)
    m = c2w[v]
    use_keep = keep.shape[0] > 0
    for i in range(h):
        for j in range(w):
            if use_keep and not keep[(v * h + i) * w + j]:  # not written: NaN, never read (write_kernels.address)
                chosen_depth[v, i, j] = np.nan
                points[v, i, j, 0], points[v, i, j, 1], points[v, i, j, 2] = np.nan, np.nan, np.nan
                continue
            for a in range(f):
                source = depth[v, i * f + a]
                for b in range(f):
                    patch[a * f + b] = source[j * f + b]
            # A hinted median is the patch's sorted middle value exactly when its rank says so: fewer than
            # `middle + 1` values below it and more than `middle` at or below it. Counting costs two compares
            # per pixel (in a loop without branches: SIMD code); a wrong (or NaN) hint fails the count and
            # the selection runs.
            median = hint[v, i, j] if use_hint else np.float32(np.nan)
            below = 0
            at_or_below = 0
            for k in range(f * f):
                below += np.int64(patch[k] < median)
                at_or_below += np.int64(patch[k] <= median)
            if not below <= middle < at_or_below:
                ordered[:] = patch
                median = kth_smallest(ordered, middle)
            _band(patch, median, tolerance * median, f, near, row_count, column_count)
            count = 0
            row_sum = np.float32(0.0)
            column_sum = np.float32(0.0)
            for a in range(f):
                count += row_count[a]
                row_sum += np.float32(row_count[a]) * (np.float32(a) + half)
                column_sum += np.float32(column_count[a]) * (np.float32(a) + half)
            total = np.float32(max(count, 1))
            centroid_row, centroid_column = row_sum / total, column_sum / total
            for a in range(f):  # a patch pixel's distance is its row's term plus its column's, as torch sums it
                dr = np.float32(a) + half - centroid_row
                dc = np.float32(a) + half - centroid_column
                row_distance[a] = dr * dr
                column_distance[a] = dc * dc
            # The nearest of the band to its centroid, the first of equals (as argmin). Rounding is monotonic,
            # so a row's least distance is its row term plus its least column term: the minimum is taken per
            # row over column terms alone, then the first pixel at that distance is found in the first row
            # that reaches it.
            best = np.float32(np.inf)
            for a in range(f):
                least = np.float32(np.inf)
                for b in range(f):
                    least = min(least, column_distance[b] if near[a * f + b] else np.float32(np.inf))
                row_least[a] = row_distance[a] + least
                best = min(best, row_least[a])
            chosen = 0
            if best < np.inf:
                a = 0
                while row_least[a] != best:
                    a += 1
                for b in range(f):
                    if near[a * f + b] and row_distance[a] + column_distance[b] == best:
                        chosen = a * f + b
                        break
            d = patch[chosen] if np.isfinite(median) else median
            chosen_depth[v, i, j] = d
            vv = np.float64(i * f + chosen // f) + 0.5
            uu = np.float64(j * f + chosen % f) + 0.5
            z = np.float64(d) if np.isfinite(d) else 1.0
            x0 = (uu - cx) / fx * z
            x1 = (vv - cy) / fy * z
            for r in range(3):
                acc = 0.0
                acc += m[r, 0] * x0
                acc += m[r, 1] * x1
                acc += m[r, 2] * z
                points[v, i, j, r] = acc + m[r, 3]


@njit(cache=True)
def _lift_serial(depth, c2w, intrinsics, factor, surface_tolerance, hint, use_hint, keep, points, chosen_depth):
    tolerance = np.float32(surface_tolerance)  # (a Python float is typed faster than a numpy scalar)
    for v in range(depth.shape[0]):
        _lift_view(v, depth, c2w, intrinsics, factor, tolerance, hint, use_hint, keep, points, chosen_depth)


@njit(cache=True, parallel=True)
def _lift_parallel(depth, c2w, intrinsics, factor, surface_tolerance, hint, use_hint, keep, points, chosen_depth):
    tolerance = np.float32(surface_tolerance)
    for v in prange(depth.shape[0]):
        _lift_view(v, depth, c2w, intrinsics, factor, tolerance, hint, use_hint, keep, points, chosen_depth)


def lift_dominant_surface(depth, c2w, camera, factor, surface_tolerance, parallel, median_hint=None):
    """(V, H, W) float32 depth and (V, 4, 4) float64 poses -> (V, h, w, 3) float64 points, (V, h, w) float32 depth.

    ``median_hint``: optional (V, h, w) float32, what the caller believes each patch's median is (a world
    model's own latent depth, pooled the same way); each value is used only where its rank in the patch
    proves it is the median, so the result is the same with or without it, or with a wrong one.
    """
    views, height, width = depth.shape
    points = np.empty((views, height // factor, width // factor, 3), np.float64)
    chosen_depth = np.empty((views, height // factor, width // factor), np.float32)
    intrinsics = np.array([camera.fx, camera.fy, camera.cx, camera.cy], np.float64)
    lift_into(depth, c2w, intrinsics, factor, surface_tolerance, parallel, median_hint, points, chosen_depth)
    return points, chosen_depth


def lift_into(depth, c2w, intrinsics, factor, surface_tolerance, parallel, median_hint, points, chosen_depth,
              keep=None):
    """:func:`lift_dominant_surface` into the caller's ``points`` and ``chosen_depth``, with the depth camera's
    (fx, fy, cx, cy) as a float64 array (a memory write keeps all three between writes). ``keep``: (V * h * w,)
    bool, the latent pixels the write will store; the others are not lifted (NaN). None or empty: all."""
    use_hint = median_hint is not None
    kernel = _lift_parallel if parallel and depth.shape[0] > 1 else _lift_serial
    kernel(depth, c2w, intrinsics, factor, float(surface_tolerance), median_hint if use_hint else _NO_HINT,
           use_hint, _ALL if keep is None else keep, points, chosen_depth)


_NO_HINT = np.empty((0, 0, 0), np.float32)
_ALL = np.empty(0, np.bool_)  # keep: lift every pixel
