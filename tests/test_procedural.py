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


def test_memory_gives_a_moving_crate_its_look_but_is_not_pasted_where_the_crate_was():
    model = ProceduralWorldModel()
    gens = generators(4)
    first = model.start(poses(CameraRig()), gens)
    crate = slice(6 + 6 * model.moving_boxes()[0], 6 + 6 * (model.moving_boxes()[0] + 1))
    remembered = model.committed[0, crate].clone()
    model.generate(request(model, poses(CameraRig(yaw=math.pi)), gens))  # away: a new look if nothing recalls it
    req = request(model, poses(CameraRig()), gens, memory_latents=first.latents,
                  mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    req.memory_depth = first.depth.clone()
    out = model.generate(req)
    moving = out.info["moving"]
    agrees = (first.depth - out.depth).abs() <= model.memory_depth_tolerance * out.depth
    assert (moving & agrees).any()  # memory agrees with the geometry on some of the crate's pixels
    assert out.info["memory_used"][~moving & agrees].all() and not out.info["memory_used"][moving].any()
    # Faces seen only as slivers at the start recorded nothing (0.5) and are drawn anew; the others come back.
    back = model.in_view[0, crate] & (remembered != 0.5).any(-1)
    assert back.any() and torch.equal(model.appearance[0, crate][back], remembered[back])


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


# ---------------------------------------------------------------- looks: a box is one thing, slivers record nothing

BOX = 6  # in seed 0's room a crate free on its +x and +z sides (faces 43 and 47)


def look_at(eye, target) -> torch.Tensor:
    """(1, 1, 4, 4) camera-to-world pose at ``eye`` looking at ``target`` (OpenCV: y down, world up is -y)."""
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    z = (target - eye) / (target - eye).norm()
    x = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), z)
    x = x / x.norm()
    pose = torch.eye(4, dtype=torch.float64)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, torch.linalg.cross(z, x), z, eye
    return pose[None, None]


def box_cameras(model):
    """Cameras around ``BOX``: facing its +x face (A), seeing +x and +z (A and B), turned away, and turned
    until A is a sliver at the frame's edge (in view, owning no latent pixel's centre)."""
    lo, hi = model.box_lo[0, BOX].double(), model.box_hi[0, BOX].double()
    centre = [float(lo[0] + hi[0]) / 2, 1.0, float(lo[2] + hi[2]) / 2]
    eye = [float(hi[0]) + 1.2, 1.0, centre[2]]
    turned = math.radians(53)  # found by turning in 1 degree steps
    dx, dz = centre[0] - eye[0], centre[2] - eye[2]
    sliver = [eye[0] + dx * math.cos(turned) - dz * math.sin(turned), 1.0,
              eye[2] + dx * math.sin(turned) + dz * math.cos(turned)]
    return {"A": look_at(eye, centre), "AB": look_at([float(hi[0]) + 1.0, 1.0, float(hi[2]) + 1.0], centre),
            "away": look_at(eye, [2 * e - c for e, c in zip(eye, centre)]), "sliver": look_at(eye, sliver)}


def centre_surfaces(model, pose, world: int = 0) -> tuple[torch.Tensor, set, torch.Tensor]:
    """What ``pose`` would show in ``world`` now: (h, w) surface at each latent pixel's centre, the set of
    surfaces any pixel shows, and the (h, w) latent depth (the patch median, as the model computes it)."""
    index = torch.tensor([world])
    depth, surface, *_ = model._cast(pose.float(), index, model.time[index][:, None])
    f, height, width = model.codec.factor, model.camera.height, model.camera.width
    centres = surface.reshape(height // f, f, width // f, f)[:, f // 2, :, f // 2]
    patches = depth.reshape(height // f, f, width // f, f).transpose(1, 2).reshape(height // f, width // f, f * f)
    return centres, set(surface.flatten().tolist()), patches.sort(-1).values[..., (f * f) // 2]


def memory_on(model, pose, gens, surface):
    """A request at ``pose`` (B, 1, 4, 4) whose memory agrees with the geometry only at latent pixels centred on
    ``surface`` (in each world)."""
    found = [centre_surfaces(model, pose[b:b + 1], b) for b in range(pose.shape[0])]
    req = request(model, pose, gens, mask=torch.stack([centres == surface for centres, _, _ in found])[:, None])
    req.memory_depth = torch.stack([depth for _, _, depth in found])[:, None].clone()
    return req


def face(box: int, k: int) -> int:
    return 6 + box * 6 + k


def test_memory_showing_one_face_of_a_box_recalls_the_faces_it_remembers():
    model = ProceduralWorldModel()
    gens = generators(0)
    model.start(torch.eye(4, dtype=torch.float64)[None, None], gens)
    cameras = box_cameras(model)
    a, b = face(BOX, 1), face(BOX, 5)  # its +x and +z faces
    assert a in centre_surfaces(model, cameras["A"])[0] and b not in centre_surfaces(model, cameras["A"])[1]
    model.generate(request(model, cameras["A"], gens))
    remembered = model.committed[0, a].clone()
    assert model.in_view[0, a] and torch.equal(model.appearance[0, a], remembered)
    model.generate(request(model, cameras["away"], gens))
    assert not model.in_view[0, a]
    centres, _, _ = centre_surfaces(model, cameras["AB"])
    assert (centres == a).any() and (centres == b).any()
    out = model.generate(memory_on(model, cameras["AB"], gens, b))
    assert out.info["memory_used"].any()
    # Memory hit only face B (never seen, so its look is new), yet face A comes back as it was.
    assert torch.equal(model.appearance[0, a], remembered)
    assert not torch.equal(model.appearance[0, b], remembered)


def test_a_sliver_records_no_look_and_memory_overrides_the_look_it_was_given():
    model = ProceduralWorldModel()
    gens = generators(0)
    model.start(torch.eye(4, dtype=torch.float64)[None, None], gens)
    cameras = box_cameras(model)
    a = face(BOX, 1)
    centres, seen, _ = centre_surfaces(model, cameras["sliver"])
    assert a in seen and not (centres == a).any()  # a sliver: in view, no latent pixel of its own
    model.generate(request(model, cameras["A"], gens))
    remembered = model.committed[0, a].clone()
    model.generate(request(model, cameras["away"], gens))
    model.generate(request(model, cameras["sliver"], gens))
    sliver_look = model.appearance[0, a].clone()
    assert model.in_view[0, a] and not torch.equal(sliver_look, remembered)  # drawn anew, like any return
    assert torch.equal(model.committed[0, a], remembered)  # but memory could not hold it: not recorded
    # Back in full view with memory on the face: the remembered look wins over the sliver's unrecorded one.
    model.generate(memory_on(model, cameras["A"], gens, a))
    assert torch.equal(model.appearance[0, a], remembered)


def box_return(kernels: bool, seeds) -> list:
    """Segments and model states of the returns above (face A seen, away, back with memory on face B, away, a
    sliver, back with memory on A) for worlds started from ``seeds``, every world at world 0's cameras."""
    from mirage_env import compiled

    model = ProceduralWorldModel()
    gens = generators(*seeds)
    both = lambda pose: pose.expand(len(seeds), -1, -1, -1)  # noqa: E731
    model.start(both(torch.eye(4, dtype=torch.float64)[None, None]), gens)
    cameras = box_cameras(model)
    out = []
    for name, surface in [("A", None), ("away", None), ("AB", face(BOX, 5)), ("away", None), ("sliver", None),
                          ("A", face(BOX, 1))]:
        pose = both(cameras[name])
        req = request(model, pose, gens) if surface is None else memory_on(model, pose, gens, surface)
        segment = model.generate(req)
        out.append({"latents": segment.latents, "frames": segment.frames, "depth": segment.depth,
                    **segment.info, **model.state_dict()})
    assert compiled._broken is None  # the path asked for ran throughout
    return out


def test_box_returns_are_the_same_in_a_batch_as_alone_and_with_the_compiled_kernels(monkeypatch):
    pytest.importorskip("numba")
    from mirage_env import compiled

    runs = {}
    for kernels in (False, True):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        runs[kernels, "batch"] = box_return(kernels, (0, 5))
        runs[kernels, "single"] = box_return(kernels, (0,))
    for step, oracle in enumerate(runs[False, "batch"]):
        for name, value in oracle.items():
            assert torch.equal(runs[True, "batch"][step][name], value), f"compiled {name} differs at step {step}"
            assert torch.equal(runs[False, "single"][step][name][0], value[0]), f"batch {name} differs at {step}"
            assert torch.equal(runs[True, "single"][step][name][0], value[0]), f"{name} differs at step {step}"
