"""The default write filters' two per-pixel masks in one compiled pass (numba).

``valid_depth`` and ``consistent_with_memory`` are a handful of numpy operations on a
(B, T, h, w) array each: at latent resolution (16x16 for one 64x64 env) their calls, the
``errstate`` that hides sky-minus-sky, and the arrays between them cost some 40 us a step,
and the arithmetic well under one. ``Composed`` runs this kernel instead where both lead
its chain on host arrays (mirage_env.filters). Each comparison is the numpy code's, in
float32 as numpy 2 does it with a Python float beside a float32 array, so the mask is the
same (tests/test_filters.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def valid_and_consistent(depth, predicted, known, min_depth, max_depth, tolerance, out):
    """``out = valid_depth & consistent_with_memory`` on C-contiguous float32 ``depth`` and ``predicted``, bool
    ``known`` and ``out``, all of one shape; ``min_depth``, ``max_depth`` and ``tolerance`` are the filters'
    floats, compared in float32 (an infinite max_depth keeps every finite depth)."""
    depth, predicted, known, out = depth.reshape(-1), predicted.reshape(-1), known.reshape(-1), out.reshape(-1)
    check_max = max_depth != np.inf
    least, most, share = np.float32(min_depth), np.float32(max_depth), np.float32(tolerance)
    for i in range(depth.size):
        d = depth[i]
        valid = np.isfinite(d) and d > least
        if check_max:
            valid = valid and d <= most
        # NaN (sky against sky: inf - inf) compares False, as in numpy: only an unknown pixel passes then
        p = predicted[i]
        out[i] = valid and ((not known[i]) or abs(d - p) <= share * p)
