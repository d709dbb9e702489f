import math

import torch

from mirage_env.filters import (
    FilterInputs,
    compose,
    consistent_across_frames,
    consistent_with_memory,
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
