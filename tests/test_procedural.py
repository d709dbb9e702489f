import math

import pytest
import torch

from mirage_env.backends import SegmentRequest, WorldModel
from mirage_env.backends.codec import PatchDCTCodec
from mirage_env.backends.procedural import ProceduralWorldModel
from mirage_env.geometry import CameraRig


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def poses(*rigs):
    return torch.stack([torch.from_numpy(r.c2w()) for r in rigs])[:, None]


def request(model, pose_batch, gens, memory_latents=None, mask=None, use_memory=True):
    b, t = pose_batch.shape[:2]
    h, w, c = model.camera.height // 8, model.camera.width // 8, model.latent.channels
    return SegmentRequest(
        poses=pose_batch,
        memory_latents=torch.zeros(b, t, c, h, w) if memory_latents is None else memory_latents,
        memory_mask=torch.zeros(b, t, h, w, dtype=torch.bool) if mask is None else mask,
        memory_depth=torch.full((b, t, h, w), math.inf),
        generators=gens,
        use_memory=use_memory,
    )


def test_codec_is_an_orthogonal_projection():
    codec = PatchDCTCodec()
    z = torch.randn(2, 48, 3, 4) * 0.05
    z[:, [0, 16, 32]] += 4.0  # a mid-grey mean per colour keeps the decoded image inside [0, 1]
    assert torch.allclose(codec.encode(codec.decode(z)), z, atol=1e-5)
    flat = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(codec.decode(codec.encode(flat)), flat, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.zeros(3, 12, 16))


def test_protocol_shapes_and_exact_depth():
    model = ProceduralWorldModel(image_size=(32, 48))
    assert isinstance(model, WorldModel)
    segment = model.start(poses(CameraRig()), generators(0))
    assert segment.latents.shape == (1, 1, 48, 4, 6)
    assert segment.frames.shape == (1, 1, 32, 48, 3) and segment.frames.dtype == torch.uint8
    assert segment.depth.shape == (1, 1, 4, 6)
    # The room's far wall is straight ahead: the centre ray's depth is its distance.
    far_wall = model.room_hi[0, 2].item()
    centre = segment.image_depth[0, 0, 16, 24].item()
    assert centre == pytest.approx(far_wall, rel=1e-5) or centre < far_wall  # an object may stand in front
    assert torch.equal(segment.frames, model.decode(segment.latents))


def test_same_generator_state_same_segment_and_batch_equals_single():
    a = ProceduralWorldModel()
    b = ProceduralWorldModel()
    rigs = [CameraRig(), CameraRig(0.3, 0, 0.2, yaw=0.5)]
    batched = a.start(poses(*rigs), generators(1, 2))
    single = b.start(poses(rigs[1]), generators(2))
    assert torch.equal(batched.latents[1:], single.latents)
    step_pose = poses(CameraRig(0.3, 0, 0.45, yaw=0.5))
    gen_b = generators(7)
    batched_gens = generators(6, 7)
    out_batched = a.generate(request(a, torch.cat([poses(rigs[0]), step_pose]), batched_gens))
    out_single = b.generate(request(b, step_pose, gen_b))
    assert torch.equal(out_batched.latents[1:], out_single.latents)


def test_revisit_without_memory_looks_different_but_depth_is_the_same():
    model = ProceduralWorldModel()
    gens = generators(3)
    first = model.start(poses(CameraRig()), gens)
    model.generate(request(model, poses(CameraRig(yaw=math.pi)), gens))  # look away: nothing carries over
    back = model.generate(request(model, poses(CameraRig()), gens))
    static = ~back.info["moving"] & ~first.info["moving"]
    assert torch.equal(first.depth[static], back.depth[static])
    assert not torch.allclose(first.latents, back.latents)


def test_memory_hits_are_reproduced_exactly():
    model = ProceduralWorldModel()
    gens = generators(4)
    first = model.start(poses(CameraRig()), gens)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    req = request(model, poses(CameraRig()), gens, memory_latents=first.latents, mask=mask)
    req.memory_depth = first.depth.clone()
    out = model.generate(req)
    used = out.info["memory_used"]
    assert used.float().mean() > 0.8  # all but the moving crate agree with memory
    assert torch.equal(out.latents[used[:, :, None].expand_as(out.latents)], first.latents[used[:, :, None].expand_as(first.latents)])


def test_outdoor_has_sky_and_the_crate_moves():
    model = ProceduralWorldModel(scene="outdoor")
    segment = model.start(poses(CameraRig(pitch=0.3)), generators(5))
    assert segment.info["sky"].any() and torch.isinf(segment.depth[segment.info["sky"]]).all()
    indoor = ProceduralWorldModel()
    gens = generators(5)
    indoor.start(poses(CameraRig()), gens)
    lo_before = indoor._object_boxes(torch.tensor([0]), torch.tensor([[0]]))[0][0, 0, -1].clone()
    lo_after = indoor._object_boxes(torch.tensor([0]), torch.tensor([[10]]))[0][0, 0, -1]
    assert not torch.equal(lo_before, lo_after)


def test_bad_inputs():
    model = ProceduralWorldModel()
    bad = poses(CameraRig())
    bad[0, 0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.start(bad, generators(0))
    with pytest.raises(ValueError, match="one generator per world"):
        model.start(poses(CameraRig()), generators(0, 1))
    with pytest.raises(ValueError, match="divisible"):
        ProceduralWorldModel(image_size=(60, 64))
    with pytest.raises(ValueError, match="scene"):
        ProceduralWorldModel(scene="space")


def test_views_of_one_world_are_simultaneous():
    """Two cameras at the same pose in one world see the same instant: the moving crate agrees."""
    from mirage_env.geometry import CameraRig

    model = ProceduralWorldModel()
    pose = torch.from_numpy(CameraRig(0.0, 0.0, 0.0).c2w())
    segment = model.start(pose.expand(1, 2, 4, 4), [torch.Generator().manual_seed(3)], views=2)
    assert torch.equal(segment.image_depth[0, 0], segment.image_depth[0, 1])
    assert int(model.time[0]) == 1, "two views of one frame advance the world clock by one frame"
    with pytest.raises(ValueError, match="views"):
        model.start(pose.expand(1, 3, 4, 4), [torch.Generator()], views=2)
