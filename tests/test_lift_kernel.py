"""The compiled lift with a median hint: the torch lift's points and depths, whatever the hint says."""

import numpy as np
import pytest
import torch

from mirage_env import compiled
from mirage_env.geometry import Camera
from mirage_env.memory import lift_dominant_surface, lift_kernels, pool_depth

FACTOR = 8


def _depths(seed: int, views: int = 6, size: int = 32) -> np.ndarray:
    """Patches with what real frames have: planes at a slant, edges between surfaces, sky, exact ties."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    depth = np.empty((views, size, size), np.float32)
    for v in range(views):
        plane = 2.0 + 0.05 * rows * rng.uniform(-1, 1) + 0.07 * columns * rng.uniform(-1, 1)
        near = rng.uniform(0.5, 1.5) + 0.01 * rows
        edge = columns + rng.uniform(-4, 4) * np.sin(rows / 5) > rng.uniform(4, size - 4)
        depth[v] = np.where(edge, near, plane)
        depth[v][rng.random((size, size)) < 0.1] = np.inf
        depth[v][: size // 4][rng.random((size // 4, size)) < 0.8] = np.inf  # mostly sky up top
        depth[v][rng.random((size, size)) < 0.05] = 3.0  # ties
    return depth


def _torch_lift(monkeypatch, depth, c2w, camera):
    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    points, chosen = lift_dominant_surface(torch.from_numpy(depth)[None], camera, torch.from_numpy(c2w)[None], FACTOR)
    monkeypatch.delenv(compiled.KERNELS_ENV)
    return points[0].numpy(), chosen[0].numpy()


@pytest.mark.parametrize("seed", range(4))
def test_the_hinted_lift_equals_the_torch_lift_for_right_wrong_and_nan_hints(monkeypatch, seed):
    depth = _depths(seed)
    views, size = depth.shape[0], depth.shape[1]
    rng = np.random.default_rng(100 + seed)
    c2w = np.repeat(np.eye(4)[None], views, 0)
    c2w[:, :3, 3] = rng.normal(size=(views, 3))
    camera = Camera(fx=30.0, fy=30.0, cx=size / 2, cy=size / 2, width=size, height=size)
    expected_points, expected_depth = _torch_lift(monkeypatch, depth, c2w, camera)
    median = pool_depth(torch.from_numpy(depth), FACTOR).numpy()
    wrong = median.copy()
    wrong[:, ::2] = np.nextafter(wrong[:, ::2], np.float32(np.inf))  # one ulp off: must be refused
    wrong[:, 1::2, 1::2] = np.nan
    patches = depth.reshape(views, size // FACTOR, FACTOR, size // FACTOR, FACTOR).transpose(0, 1, 3, 2, 4)
    smallest = patches.min(axis=(-1, -2)).astype(np.float32)  # in the patch, at the wrong rank
    for hint in (None, median, wrong, smallest, np.zeros_like(median), np.full_like(median, np.inf)):
        for parallel in (False, True):
            points, chosen = lift_kernels.lift_dominant_surface(depth, c2w, camera, FACTOR, 0.05, parallel, hint)
            np.testing.assert_array_equal(points, expected_points)
            np.testing.assert_array_equal(chosen, expected_depth)


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_the_lift_equals_the_torch_lift_at_any_factor_and_on_patches_the_band_splits(monkeypatch, factor):
    # The kernel takes the centroid from per-row and per-column counts and the argmin per row:
    # odd patch sides, rows with no pixel in the band, ties of distance, zero and negative depth.
    size = 8 * factor
    depth = _depths(factor, views=4, size=size)
    rng = np.random.default_rng(factor)
    depth[0] = np.round(depth[0] * 2) / 2  # many exact ties of depth, so of distance
    depth[1][rng.random((size, size)) < 0.2] = 0.0
    depth[2][rng.random((size, size)) < 0.1] = -1.0
    c2w = np.repeat(np.eye(4)[None], 4, 0)
    c2w[:, :3, 3] = rng.normal(size=(4, 3))
    camera = Camera(fx=20.0, fy=21.0, cx=size / 2, cy=size / 3, width=size, height=size)
    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    expected_points, expected_depth = (t[0].numpy() for t in lift_dominant_surface(
        torch.from_numpy(depth)[None], camera, torch.from_numpy(c2w)[None], factor))
    median = pool_depth(torch.from_numpy(depth), factor).numpy()
    for hint in (None, median):
        for parallel in (False, True):
            points, chosen = lift_kernels.lift_dominant_surface(depth, c2w, camera, factor, 0.05, parallel, hint)
            np.testing.assert_array_equal(points, expected_points)
            np.testing.assert_array_equal(chosen, expected_depth)
