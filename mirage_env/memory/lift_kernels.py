"""The dominant-surface depth lift as a compiled CPU kernel (numba).

The same maths as :func:`~.lift.lift_dominant_surface`, one latent pixel at a time, in
torch's float order, so points and depths are bit-for-bit the torch path's
(tests/test_compiled.py): the median by selection (the sorted patch's middle value), the centroid's sums exact
(they add multiples of 0.5 far below 2**24, so their order cannot matter), the first
index on ties as ``argmin``, and the camera-to-world product as torch's small-``bmm``
loop, ``((0 + r0 * x) + r1 * y) + r2 * z`` in float64.
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


@njit(cache=True)
def _lift_view(v, depth, c2w, intrinsics, factor, tolerance, hint, use_hint, points, chosen_depth):
    fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
    f = factor
    middle = (f * f) // 2
    h, w = chosen_depth.shape[1], chosen_depth.shape[2]
    patch = np.empty(f * f, np.float32)
    ordered = np.empty(f * f, np.float32)
    near = np.empty(f * f, np.bool_)
    half = np.float32(0.5)
    m = c2w[v]
    for i in range(h):
        for j in range(w):
            # A hinted median is the patch's sorted middle value exactly when its rank says so: fewer than
            # `middle + 1` values below it and more than `middle` at or below it. Counting costs two compares
            # per pixel in the copy; a wrong (or NaN) hint fails the count and the selection runs.
            candidate = hint[v, i, j] if use_hint else np.float32(np.nan)
            below = 0
            at_or_below = 0
            k = 0
            for a in range(f):
                for b in range(f):
                    x = depth[v, i * f + a, j * f + b]
                    patch[k] = x
                    below += x < candidate
                    at_or_below += x <= candidate
                    k += 1
            if below <= middle < at_or_below:
                median = candidate
            else:
                ordered[:] = patch
                median = kth_smallest(ordered, middle)
            limit = tolerance * median
            count = np.float32(0.0)
            row_sum = np.float32(0.0)
            column_sum = np.float32(0.0)
            k = 0
            for a in range(f):  # row a, column b of the patch by counters, not k // f and k % f
                for b in range(f):
                    inside = abs(patch[k] - median) <= limit
                    near[k] = inside
                    if inside:
                        count += np.float32(1.0)
                        row_sum += np.float32(a) + half
                        column_sum += np.float32(b) + half
                    k += 1
            count = max(count, np.float32(1.0))
            centroid_row, centroid_column = row_sum / count, column_sum / count
            best = np.float32(np.inf)
            chosen_row = 0
            chosen_column = 0
            k = 0
            for a in range(f):
                dr = np.float32(a) + half - centroid_row
                for b in range(f):
                    if near[k]:
                        dc = np.float32(b) + half - centroid_column
                        distance = dr * dr + dc * dc
                        if distance < best:
                            best = distance
                            chosen_row = a
                            chosen_column = b
                    k += 1
            d = patch[chosen_row * f + chosen_column] if np.isfinite(median) else median
            chosen_depth[v, i, j] = d
            vv = np.float64(i * f + chosen_row) + 0.5
            uu = np.float64(j * f + chosen_column) + 0.5
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
def _lift_serial(depth, c2w, intrinsics, factor, tolerance, hint, use_hint, points, chosen_depth):
    for v in range(depth.shape[0]):
        _lift_view(v, depth, c2w, intrinsics, factor, tolerance, hint, use_hint, points, chosen_depth)


@njit(cache=True, parallel=True)
def _lift_parallel(depth, c2w, intrinsics, factor, tolerance, hint, use_hint, points, chosen_depth):
    for v in prange(depth.shape[0]):
        _lift_view(v, depth, c2w, intrinsics, factor, tolerance, hint, use_hint, points, chosen_depth)


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
    use_hint = median_hint is not None
    hint = median_hint if use_hint else _NO_HINT
    kernel = _lift_parallel if parallel and views > 1 else _lift_serial
    kernel(depth, c2w, intrinsics, factor, np.float32(surface_tolerance), hint, use_hint, points, chosen_depth)
    return points, chosen_depth


_NO_HINT = np.empty((0, 0, 0), np.float32)
