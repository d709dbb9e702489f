"""The pose check at the memory's edge as a compiled CPU kernel (numba).

:func:`~mirage_env.geometry.check_pose` costs ~10 us in numpy, for a handful of numbers,
and the memory checks the poses of every read and write: a fifth of a 64x64 step's memory
time once the read and the write were kernels. :func:`rigid_and_finite` answers the same
question; where it says no, ``check_pose`` runs and raises its own error, so the messages
stay in one place (tests/test_compiled.py compares the two answers).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def rigid_and_finite(poses):
    """Whether every (16,) row of ``poses`` (float32 or float64, a flattened 4x4 pose) is finite with last row
    [0, 0, 0, 1] within check_pose's tolerance, ``|x - e| <= 1e-5 + 1e-5 * e`` in float64."""
    for i in range(poses.shape[0]):
        for k in range(16):
            if not np.isfinite(poses[i, k]):
                return False
        for j in range(4):
            expected = 1.0 if j == 3 else 0.0
            if not abs(np.float64(poses[i, 12 + j]) - expected) <= 1e-5 + 1e-5 * expected:
                return False
    return True
