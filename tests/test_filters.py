import math

import numpy as np
import pytest
import torch

from mirage_env.compiled import KERNELS_ENV

from mirage_env.filters import (
    FilterInputs,
    compose,
    consistent_across_frames,
    consistent_with_memory,
    default_filters,
    user_mask,
    valid_depth,
)
from mirage_env.geometry import Camera

LATENT = Camera.from_fov(64, 64, 90).scaled(1 / 8)


def poses(frames):
    return torch.eye(4, dtype=torch.float64).repeat(1, frames, 1, 1)


def test_valid_depth_drops_sky_and_far():
    depth = torch.full((1, 1, 8, 8), 3.0)
    depth[..., 0, 0] = math.inf
    depth[..., 0, 1] = 50.0
    keep = valid_depth(max_depth=20.0)(FilterInputs(depth, poses(1), LATENT))
    assert keep.sum() == 62 and not keep[..., 0, 0] and not keep[..., 0, 1]


def test_content_in_front_of_memory_is_not_written():
    predicted = torch.full((1, 1, 8, 8), 4.0)
    depth = predicted.clone()
    depth[..., 3:5, 3:5] = 1.5  # something moved in front of the known wall
    inputs = FilterInputs(depth, poses(1), LATENT, predicted_depth=predicted,
                          predicted_mask=torch.ones_like(depth, dtype=torch.bool))
    keep = consistent_with_memory(0.1)(inputs)
    assert keep.sum() == 60 and not keep[..., 3:5, 3:5].any()


def test_moving_content_between_frames_is_caught():
    depth = torch.full((1, 3, 8, 8), 4.0)
    for t in range(3):  # a box sliding right, one pixel per frame, in front of a static wall
        depth[0, t, 3:5, 2 + t : 4 + t] = 2.0
    keep = consistent_across_frames(0.1)(FilterInputs(depth, poses(3), LATENT))
    static = keep[0, :, 0].all()
    assert static
    # The leading/trailing edges of the box disagree with a neighbouring frame.
    assert not keep[0, 1, 3:5, 3].all() or not keep[0, 1, 3:5, 4].all()
    assert keep.sum() < depth.numel()


def test_user_mask_composes():
    depth = torch.full((1, 1, 8, 8), 3.0)
    mask = torch.ones_like(depth, dtype=torch.bool)
    mask[..., :2] = False
    combined = compose(valid_depth(), user_mask(lambda inputs: mask))
    assert combined(FilterInputs(depth, poses(1), LATENT)).sum() == 48


@pytest.mark.parametrize("max_depth", [math.inf, 6.0])
def test_default_chain_fused_on_the_host_keeps_what_the_filters_keep(monkeypatch, max_depth):
    """The compiled pass of valid_depth & consistent_with_memory (filters.Composed) against the filters one
    by one: sky, NaN, depths one float32 step either side of min_depth, max_depth and the tolerance."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(0)
    shape = (3, 1, 8, 8)
    depth = rng.uniform(0.0, 8.0, shape).astype(np.float32)
    predicted = (depth * rng.choice([1.0, 1.1, 0.9, 1.5], shape)).astype(np.float32)
    edges = np.float32([1e-3, 6.0])
    near = np.concatenate([np.nextafter(edges, np.float32(0)), edges, np.nextafter(edges, np.float32(np.inf))])
    flat = depth.reshape(-1)
    flat[:near.size] = near
    flat[near.size:near.size + 40:4] = np.inf  # sky, against sky and against memory
    flat[near.size + 1:near.size + 40:4] = np.nan
    predicted.reshape(-1)[near.size:near.size + 40:2] = np.inf
    tolerance = np.float32(0.1)
    on_edge = predicted.reshape(-1)[60:80]  # |d - p| exactly at, or one step off, tolerance * p in float32
    flat[60:80] = on_edge + tolerance * on_edge
    flat[70:80] = np.nextafter(flat[70:80], np.float32(np.inf))
    known = rng.random(shape) < 0.7
    known.reshape(-1)[:near.size] = False  # only the depth test decides these
    model_keep = rng.random(shape) < 0.9
    model_keep.reshape(-1)[:near.size] = True
    model_keep = torch.from_numpy(model_keep)
    inputs = FilterInputs(torch.from_numpy(depth), poses(1).expand(3, -1, -1, -1), LATENT,
                          predicted_depth=torch.from_numpy(predicted), predicted_mask=torch.from_numpy(known),
                          model_keep=model_keep)
    chain = default_filters(max_depth=max_depth)
    monkeypatch.setenv(KERNELS_ENV, "0")
    one_by_one = chain(inputs)
    monkeypatch.setenv(KERNELS_ENV, "1")
    assert chain._fused_on_host(inputs) is not None  # the compiled pass ran
    fused = chain(inputs)
    assert torch.equal(fused, one_by_one)
    assert 0 < int(fused.sum()) < fused.numel()
    assert not fused.reshape(-1)[near.size + 1:near.size + 40:4].any()  # NaN depth is never kept
    # min_depth itself is not kept (the comparison is in float32: 1e-3 as a float32 is above 1e-3)
    below, at, above = fused.reshape(-1)[:near.size].reshape(3, 2).tolist()  # (min_depth, 6.0) each
    assert below == [False, True] and at == [False, True] and above == [True, max_depth == math.inf]
