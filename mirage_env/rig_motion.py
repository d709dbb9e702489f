"""Batched camera motion as loops over scalars: N rigs moved, and the poses along their paths.

Written once, in the part of Python that numba compiles. Once the compiled kernels run
(:mod:`mirage_env.compiled`), :func:`run` calls the compiled functions: one call for every
rig instead of some twenty numpy calls on arrays of a handful of rigs (66 -> 10 us of a
single env's step). Before that (the background warm-up) and without numba, the same
functions run as Python. Both do the same float64 operations in the same order, and
``math``'s sin, cos and floor are the C library's in both, so they give the same bits:
when the switch happens changes no episode (tests/test_motion.py).

Angles wrap to [-pi, pi) by arithmetic, not by ``atan2(sin, cos)``: numpy's arctan2 is a
SIMD routine that rounds unlike the C library's, so numpy and numba would disagree.

Rigs are float64 (N, 6) rows (x, y, z, yaw, pitch, roll): see :mod:`mirage_env.geometry`.
"""

from __future__ import annotations

import math

from .compiled import disable_kernels, kernels_enabled

__all__ = ["move_rigs", "fly_rigs", "path_poses", "run"]

TWO_PI = 2.0 * math.pi


def move_rigs(rigs, moves, signs, step_metres, turn, look, pitch_limit, out):
    """Discrete moves into ``out`` (N, 6): ``signs[move]`` is the move's (forward, right, turn right, look up)
    sign; the translation is along the heading on the ground plane; pitch is clamped to +-``pitch_limit``."""
    for n in range(rigs.shape[0]):
        yaw = rigs[n, 3]
        sin, cos = math.sin(yaw), math.cos(yaw)
        move = moves[n]
        along, across = signs[move, 0], signs[move, 1]
        # forward = (sin, 0, cos) and right = (cos, 0, -sin) on the ground plane
        out[n, 0] = rigs[n, 0] + step_metres * (along * sin + across * cos)
        out[n, 1] = rigs[n, 1]
        out[n, 2] = rigs[n, 2] + step_metres * (along * cos - across * sin)
        yaw = yaw + turn * signs[move, 2]
        out[n, 3] = yaw - TWO_PI * math.floor((yaw + math.pi) / TWO_PI)
        out[n, 4] = min(max(rigs[n, 4] + look * signs[move, 3], -pitch_limit), pitch_limit)
        out[n, 5] = rigs[n, 5]


def fly_rigs(rigs, velocities, speed, turn, pitch_limit, roll_limit, out):
    """Continuous moves into ``out`` (N, 6): ``velocities`` (N, 6) in [-1, 1] are (forward, right, up, turn
    right, look up, roll) scaled by ``speed`` metres and ``turn`` radians; pitch and roll are clamped."""
    for n in range(rigs.shape[0]):
        yaw = rigs[n, 3]
        sin, cos = math.sin(yaw), math.cos(yaw)
        forward, right, up = velocities[n, 0], velocities[n, 1], velocities[n, 2]
        out[n, 0] = rigs[n, 0] + speed * (forward * sin + right * cos)
        out[n, 1] = rigs[n, 1] - speed * up  # world up is -y
        out[n, 2] = rigs[n, 2] + speed * (forward * cos - right * sin)
        yaw = yaw + turn * velocities[n, 3]
        out[n, 3] = yaw - TWO_PI * math.floor((yaw + math.pi) / TWO_PI)
        out[n, 4] = min(max(rigs[n, 4] + turn * velocities[n, 4], -pitch_limit), pitch_limit)
        out[n, 5] = min(max(rigs[n, 5] + turn * velocities[n, 5], -roll_limit), roll_limit)


def path_poses(start, end, frames, out):
    """Camera-to-world poses into ``out`` (N * frames, 4, 4) at fractions 1/frames .. 1 of the way from rigs
    ``start`` to ``end`` (N, 6), yaw the short way round; ``path_poses(r, r, 1, out)`` is the poses of ``r``.

    The rotation is yaw @ pitch @ roll (yaw about -y, pitch about x, roll about z), multiplied out with the
    products by 0 and 1 left out."""
    for n in range(start.shape[0]):
        turn = end[n, 3] - start[n, 3]
        turn = turn - TWO_PI * math.floor((turn + math.pi) / TWO_PI)
        for f in range(frames):
            fraction = (f + 1) / frames
            row = n * frames + f
            yaw = start[n, 3] + fraction * turn
            pitch = start[n, 4] + fraction * (end[n, 4] - start[n, 4])
            roll = start[n, 5] + fraction * (end[n, 5] - start[n, 5])
            cy, sy = math.cos(yaw), math.sin(yaw)
            cp, sp = math.cos(pitch), math.sin(pitch)
            cr, sr = math.cos(roll), math.sin(roll)
            # yaw @ pitch: rows (cy, sy sp, sy cp), (0, cp, -sp), (-sy, cy sp, cy cp); then @ roll
            a, b = sy * sp, cy * sp
            out[row, 0, 0], out[row, 0, 1], out[row, 0, 2] = cy * cr + a * sr, a * cr - cy * sr, sy * cp
            out[row, 1, 0], out[row, 1, 1], out[row, 1, 2] = cp * sr, cp * cr, -sp
            out[row, 2, 0], out[row, 2, 1], out[row, 2, 2] = b * sr - sy * cr, sy * sr + b * cr, cy * cp
            for axis in range(3):
                out[row, axis, 3] = start[n, axis] + fraction * (end[n, axis] - start[n, axis])
            out[row, 3, 0], out[row, 3, 1], out[row, 3, 2], out[row, 3, 3] = 0.0, 0.0, 0.0, 1.0


_compiled: dict = {}  # function -> its numba compilation


def run(function, *args) -> None:
    """``function(*args)`` compiled when the kernels run, as Python otherwise (the same bits)."""
    if kernels_enabled("cpu"):
        kernel = _compiled.get(function)
        try:
            if kernel is None:
                import numba

                kernel = _compiled[function] = numba.njit(cache=True)(function)
            kernel(*args)
            return
        except Exception as error:  # numba missing or broken: the Python below, for good
            disable_kernels(f"{type(error).__name__}: {error}")
    function(*args)
