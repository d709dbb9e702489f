"""Batched camera motion (mirage_env.rig_motion): compiled and as Python, the same bits."""

import math

import numpy as np
import pytest

from mirage_env import rig_motion
from mirage_env.compiled import KERNELS_ENV
from mirage_env.geometry import _MOVE_SIGNS, CameraRig, Move, apply_moves, path_poses, poses_from_rigs

numba = pytest.importorskip("numba")


def _rigs(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rigs = np.column_stack([rng.normal(scale=5, size=(count, 3)), rng.uniform(-math.pi, math.pi, count),
                            rng.uniform(-1.1, 1.1, count), rng.uniform(-0.5, 0.5, count)])
    rigs[:4, 3] = [math.pi, -math.pi, math.pi - 1e-12, -math.pi + 1e-12]  # headings at the wrap
    rigs[4:6, 4] = [math.radians(60), -math.radians(60)]  # pitch at its limits
    return rigs


def _both(function, *args, out_shape):
    """``function``'s output as Python and compiled (fresh arrays each)."""
    python, compiled = np.full(out_shape, np.nan), np.full(out_shape, np.nan)
    function(*args, python)
    numba.njit(function)(*args, compiled)
    return python, compiled


def test_moves_compiled_and_python_give_the_same_bits():
    rigs = _rigs(400)
    moves = np.resize(np.arange(len(Move)), len(rigs)).astype(np.int64)
    python, compiled = _both(rig_motion.move_rigs, rigs, moves, _MOVE_SIGNS, 0.25, math.radians(15),
                             math.radians(10), math.radians(60), out_shape=rigs.shape)
    assert np.array_equal(python, compiled)
    velocities = np.random.default_rng(1).uniform(-1, 1, (len(rigs), 6))
    python, compiled = _both(rig_motion.fly_rigs, rigs, velocities, 0.25, math.radians(15), math.radians(60),
                             math.radians(30), out_shape=rigs.shape)
    assert np.array_equal(python, compiled)


def test_path_poses_compiled_and_python_give_the_same_bits():
    start = _rigs(100)
    end = start + np.random.default_rng(2).normal(scale=0.3, size=start.shape)
    python, compiled = _both(rig_motion.path_poses, start, end, 3, out_shape=(300, 4, 4))
    assert np.array_equal(python, compiled)


def test_headings_wrap_to_minus_pi_pi_and_paths_turn_the_short_way():
    rigs = _rigs(64)
    turned = apply_moves(rigs, np.full(len(rigs), int(Move.TURN_RIGHT)))
    assert np.all((turned[:, 3] >= -math.pi) & (turned[:, 3] < math.pi))
    # the same heading as a turn of 15 degrees, whichever side of the wrap it landed
    assert np.allclose(np.exp(1j * turned[:, 3]), np.exp(1j * (rigs[:, 3] + math.radians(15))))
    start, end = np.zeros((1, 6)), np.zeros((1, 6))
    start[0, 3], end[0, 3] = math.pi - 0.1, -math.pi + 0.1  # 0.2 rad apart across the wrap, not 6.08
    poses = path_poses(start, end, 2)
    halfway = CameraRig(0.0, 0.0, 0.0, yaw=math.pi, pitch=0.0, roll=0.0).c2w()
    np.testing.assert_allclose(poses[0], halfway, atol=1e-12)
    np.testing.assert_allclose(poses[1], poses_from_rigs(end)[0], atol=1e-12)


def test_path_ends_at_the_rig_it_moves_to():
    start = _rigs(32)
    end = apply_moves(start, np.full(len(start), int(Move.FORWARD)))
    poses = path_poses(start, end, 4).reshape(32, 4, 4, 4)
    np.testing.assert_allclose(poses[:, -1], poses_from_rigs(end), atol=1e-12)
    assert poses_from_rigs(start) == pytest.approx(np.stack([CameraRig(*r).c2w() for r in start]))


@pytest.mark.parametrize("setting", ["0", "1"])
def test_run_takes_either_path_with_the_same_result(monkeypatch, setting):
    monkeypatch.setenv(KERNELS_ENV, setting)
    rigs = _rigs(16)
    out = np.empty((16, 4, 4))
    rig_motion.run(rig_motion.path_poses, rigs, rigs, 1, out)
    expected = np.empty((16, 4, 4))
    rig_motion.path_poses(rigs, rigs, 1, expected)
    assert np.array_equal(out, expected)
    assert (rig_motion.path_poses in rig_motion._compiled) or setting == "0"
