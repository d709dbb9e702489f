"""The procedural model's compiled segment (front, shade and codec kernels) gives the torch path's bits.

tests/test_compiled.py compares whole env rollouts; these drive the model directly through what a
rollout rarely shows: several views per world, sub-batches of worlds, memory pasted and refused,
cameras inside or right next to a box, non-square frames, and a kernel failing halfway through.
"""

import math

import numpy as np
import pytest
import torch

from mirage_env import compiled
from mirage_env.backends import SegmentRequest
from mirage_env.backends.procedural import ProceduralWorldModel

pytest.importorskip("numba")


def random_poses(rng, model, batch, frames) -> torch.Tensor:
    """(B, T, 4, 4) cameras anywhere in each world's room, looking anywhere (boxes in front, behind, around)."""
    poses = np.zeros((batch, frames, 4, 4))
    for b in range(batch):
        if b < model.room_lo.shape[0]:
            lo, hi = model.room_lo[b].double().numpy(), model.room_hi[b].double().numpy()
            lo, hi = np.maximum(lo, -20.0), np.minimum(hi, 20.0)  # outdoors: near the buildings
        else:  # not started yet: near the start
            lo, hi = np.full(3, -1.0), np.full(3, 1.0)
        for t in range(frames):
            yaw, pitch, roll = rng.uniform(-math.pi, math.pi), rng.uniform(-1.2, 1.2), rng.uniform(-0.3, 0.3)
            cy, sy, cp, sp, cr, sr = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll), \
                math.sin(roll)
            yaw_m = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
            pitch_m = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
            roll_m = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
            poses[b, t, :3, :3] = yaw_m @ pitch_m @ roll_m
            poses[b, t, :3, 3] = lo + (hi - lo) * rng.uniform(0.05, 0.95, 3)
            poses[b, t, 3, 3] = 1.0
    return torch.from_numpy(poses)


def run(monkeypatch, kernels: bool, steps: int, batch: int = 3, views: int = 2, frames_per_view: int = 1,
        cameras=random_poses, **options) -> list:
    """Start ``batch`` worlds, then ``steps`` segments at cameras drawn by ``cameras`` (random ones by default),
    each with the previous segment as memory under a random mask (so memory is pasted, refused as too far or
    too near, or not offered)."""
    monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
    model = ProceduralWorldModel(**options)
    generators = [torch.Generator().manual_seed(10 + b) for b in range(batch)]
    rng = np.random.default_rng(0)
    frames = views * frames_per_view
    segment = model.start(random_poses(rng, model, batch, frames), generators, views=views)
    out = [segment]
    for step in range(steps):
        mask = torch.from_numpy(rng.random(segment.depth.shape) < 0.5)
        request = SegmentRequest(poses=cameras(rng, model, batch, frames), memory_latents=segment.latents,
                                 memory_mask=mask, memory_depth=segment.depth * float(rng.uniform(0.95, 1.05)),
                                 generators=generators, use_memory=step % 3 != 2, views=views)
        segment = model.generate(request)
        out.append(segment)
        out.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
    return out


def assert_same(fast, oracle, nan_equal: bool = False):
    """Every tensor of the segments and model states equal; with ``nan_equal``, NaN in the same places of
    both counts as equal."""
    def equal(x, y):
        if nan_equal:
            nan = torch.isnan(x)
            if not torch.equal(nan, torch.isnan(y)):
                return False
            x, y = torch.where(nan, 0, x), torch.where(nan, 0, y)
        return torch.equal(x, y)

    assert len(fast) == len(oracle)
    for step, (a, b) in enumerate(zip(fast, oracle)):
        if isinstance(a, dict):  # the model's state after a segment
            for name in a:
                assert torch.equal(a[name], b[name]), f"state {name} differs after step {step}"
            continue
        for name in ("latents", "depth", "poses", "image_depth", "frames"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert equal(x, y), f"{name} differs at step {step}"
        assert a.info.keys() == b.info.keys()
        for name in a.info:
            assert a.info[name].dtype == b.info[name].dtype, name
            assert torch.equal(a.info[name], b.info[name]), f"info {name} differs at step {step}"


@pytest.mark.parametrize("options", [
    {"scene": "indoor"},
    {"scene": "outdoor"},
    {"scene": "indoor", "busy": True},
    {"scene": "indoor", "image_size": (32, 48)},
])
def test_several_views_per_world_at_random_cameras_are_bit_exact_with_the_torch_path(monkeypatch, options):
    from mirage_env.agents.evaluate import torch_threads

    with torch_threads(1):
        fast = run(monkeypatch, True, 6, **options)
        assert compiled._broken is None  # the compiled path ran throughout
        oracle = run(monkeypatch, False, 6, **options)
    assert_same(fast, oracle)
    used = torch.stack([s.info["memory_used"].float().mean() for s in fast[1::2]])
    assert used.max() > 0.05 and used.min() < 0.95  # memory was pasted, and refused


def test_two_frames_per_view_on_two_threads_are_bit_exact_with_the_torch_path(monkeypatch):
    from mirage_env.agents.evaluate import torch_threads

    with torch_threads(2):  # the kernels' parallel variants
        fast = run(monkeypatch, True, 4, batch=2, views=2, frames_per_view=2)
        oracle = run(monkeypatch, False, 4, batch=2, views=2, frames_per_view=2)
    assert_same(fast, oracle)


def test_a_sub_batch_of_worlds_changes_only_those_worlds(monkeypatch):
    def go(kernels):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        model = ProceduralWorldModel()
        rng = np.random.default_rng(1)
        model.start(random_poses(rng, model, 3, 1), [torch.Generator().manual_seed(s) for s in range(3)])
        # Restart world 1 alone, as an env's autoreset does, then generate for all three.
        again = model.start(random_poses(rng, model, 1, 1), [torch.Generator().manual_seed(9)], worlds=[1])
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        return again, state

    (fast, fast_state), (oracle, oracle_state) = go(True), go(False)
    assert_same([fast, fast_state], [oracle, oracle_state])


def test_a_shading_kernel_that_fails_after_the_cast_falls_back_to_torch_with_the_same_segment(monkeypatch):
    from mirage_env.backends import procedural_kernels

    oracle = run(monkeypatch, False, 2, batch=1, views=1)
    monkeypatch.setattr(compiled, "_broken", None)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second segment: its cast kernel has already updated the model's state
            raise RuntimeError("test: numba could not compile the shading kernel")
        return original(*args, **kwargs)

    original = procedural_kernels.shade
    monkeypatch.setattr(procedural_kernels, "shade", broken)
    with pytest.warns(RuntimeWarning, match="torch path"):
        fast = run(monkeypatch, True, 2, batch=1, views=1)
    assert len(calls) == 2  # the third segment ran on the torch path
    assert_same(fast, oracle)


@pytest.mark.parametrize("options", [{"scene": "indoor", "busy": True}, {"scene": "outdoor"}])
def test_the_collision_kernel_places_the_boxes_where_the_numpy_code_does(monkeypatch, options):
    # The kernel places the boxes itself (the sliding crate, the busy scene's movers) at each world's next frame.
    model = ProceduralWorldModel(image_size=16, **options)
    model.start(torch.eye(4, dtype=torch.float64).expand(3, 1, 4, 4), [torch.Generator().manual_seed(s) for s in range(3)])
    rng = np.random.default_rng(3)
    n = 3000
    worlds = rng.integers(0, 3, n)
    start = rng.uniform(-4, 4, (n, 3)) * [1, 0.3, 1]
    end = start + rng.normal(0, 0.4, (n, 3))
    for clock in (1, 37, 180):  # the movers elsewhere
        model.time[:] = clock
        answers = {}
        for kernels in (True, False):
            monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
            answers[kernels] = model.blocked(torch.from_numpy(worlds), start, end, 0.3).numpy()
        np.testing.assert_array_equal(answers[True], answers[False])
        assert 0.05 < answers[True].mean() < 0.95


def test_the_mover_kernels_place_the_busy_scene_movers_as_the_torch_code_does():
    from mirage_env.backends import procedural_kernels
    from mirage_env.backends.movers import draw_movers, mover_boxes

    rng = np.random.default_rng(4)
    worlds = 12  # more views than a vector register: torch's cos and sin take their vectorised loop
    parameters = torch.stack([draw_movers(rng.random, 3.0 + 3.0 * rng.random(), 3.0 + 3.0 * rng.random())
                              for _ in range(worlds)])
    room_hi = torch.tensor(rng.uniform(1.0, 2.0, (worlds, 3)), dtype=torch.float32)
    world = np.array([3, 0, 7, 11, 5, 1, 2, 4, 6, 8, 9, 10, 3, 3], dtype=np.int64)[:worlds]
    time = rng.integers(0, 2000, (worlds, 5))
    angle = torch.from_numpy(procedural_kernels.mover_angles(world, time, parameters.numpy()))
    lo, hi = procedural_kernels.mover_boxes(world, time, parameters.numpy(), room_hi.numpy(),
                                            torch.cos(angle).numpy(), torch.sin(angle).numpy())
    rows = torch.from_numpy(world)
    expected_lo, expected_hi = mover_boxes(parameters[rows], torch.from_numpy(time), room_hi[rows][:, 1])
    np.testing.assert_array_equal(lo, expected_lo.numpy())
    np.testing.assert_array_equal(hi, expected_hi.numpy())


# ---------------------------------------------------------------- the cast's cull, at cameras that hug boxes

def _axis_rotation(rng) -> np.ndarray:
    """A rotation whose rows are signed unit axes (det +1): faces seen exactly edge-on or head-on."""
    while True:
        rotation = np.zeros((3, 3))
        rotation[np.arange(3), rng.permutation(3)] = rng.choice([-1.0, 1.0], 3)
        if np.linalg.det(rotation) > 0:
            return rotation


def _grazing_rotation(rng, model) -> np.ndarray:
    """Turned so that one column or row of rays is parallel to a world axis plane (to float32's rounding or
    exactly): their direction along that axis is tiny or zero, the slab test's 1e-9 guard."""
    rays = model._rays.double().numpy()
    if rng.random() < 0.5:
        yaw, pitch = math.atan(rays[rng.integers(rays.shape[0]), 0]), 0.0
    else:
        yaw, pitch = 0.0, -math.atan(rays[rng.integers(rays.shape[0]), 1])
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    turn = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]]) @ np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return _axis_rotation(rng) @ turn


def poses_hugging_boxes(rng, model, batch, frames) -> torch.Tensor:
    """(B, T, 4, 4) cameras on a face, edge or corner of a box (where it stands at the next frame), or a
    hair's breadth (1e-7 to 3e-4) outside or inside it, or a little further; looking along the axes, grazing
    along a plane of rays, or anywhere. Boxes beside such a camera straddle its plane at every angle."""
    if model.room_lo.shape[0] < batch:  # not started yet
        return random_poses(rng, model, batch, frames)
    index = torch.arange(batch)
    box_lo, box_hi = model._object_boxes(index, model.time[index][:, None].expand(batch, frames))
    offsets = [0.0, 1e-7, 1e-5, 1e-4, 1.05e-4, 1.5e-4, 3e-4, 1e-3, 0.05, -1e-5, -1.5e-4, -0.05]
    poses = np.zeros((batch, frames, 4, 4))
    for b in range(batch):
        for t in range(frames):
            k = rng.integers(box_lo.shape[2])
            lo, hi = box_lo[b, t, k].double().numpy(), box_hi[b, t, k].double().numpy()
            position = lo + (hi - lo) * rng.uniform(-0.2, 1.2, 3)
            face = rng.integers(3)
            for a in range(3):  # one axis on a face; the others on an edge or a corner, or anywhere
                if a == face or rng.random() < 0.5:
                    side = rng.integers(2)
                    outward = 1.0 if side else -1.0
                    position[a] = (hi if side else lo)[a] + outward * offsets[rng.integers(len(offsets))]
            choice = rng.random()
            if choice < 0.4:
                rotation = _axis_rotation(rng)
            elif choice < 0.7:
                rotation = _grazing_rotation(rng, model)
            else:
                rotation = random_poses(rng, model, 1, 1)[0, 0, :3, :3].numpy()
            poses[b, t, :3, :3] = rotation
            # Inside the room (outside it the exit distance is negative, and the fog's factor inf).
            room = model.room_lo[b].double().numpy() + 1e-3, model.room_hi[b].double().numpy() - 1e-3
            poses[b, t, :3, 3] = np.clip(position, *room)
            poses[b, t, 3, 3] = 1.0
    return torch.from_numpy(poses)


def cull_leaks(model, poses) -> tuple[int, int, int]:
    """For (B, T, 4, 4) ``poses`` at the model's current time: the ray-box pairs that pass the slab test among
    those the torch path tests but that the kernel's cull leaves out (none, or the output would differ), the
    pairs it tests that torch does not (none, likewise), how many pairs each tests, and how many pairs with a
    box straddling the camera plane pass (the boxes whose cull differs from torch's)."""
    from mirage_env.backends import procedural_kernels
    from mirage_env.backends.procedural import _rotate

    batch, frames = poses.shape[:2]
    camera = model.camera
    index = torch.arange(batch)
    box_lo, box_hi = model._object_boxes(index, model.time[index][:, None].expand(batch, frames))  # (B, T, K, 3)
    poses32 = poses.float()
    rotation, origin = poses32[..., :3, :3], poses32[..., :3, 3]
    # Every pair's slab test, in the float32 operations of the kernel and the torch path: (B, T, P, K).
    directions = _rotate(rotation[:, :, None], model._rays)
    inverse = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    to_lo = (box_lo - origin[:, :, None])[:, :, None] * inverse[:, :, :, None]
    to_hi = (box_hi - origin[:, :, None])[:, :, None] * inverse[:, :, :, None]
    near, far = torch.minimum(to_lo, to_hi).unbind(-1), torch.maximum(to_lo, to_hi).unbind(-1)
    t_near = torch.maximum(torch.maximum(near[0], near[1]), near[2])
    t_far = torch.minimum(torch.minimum(far[0], far[1]), far[2])
    hit = ((t_near <= t_far) & (t_near > 1e-4)).reshape(batch, frames, camera.height, camera.width, -1)
    # The torch path's cull (ProceduralWorldModel._cast_objects), as (B, T, H, W, K) candidates.
    bits = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.bool)
    corners = torch.where(bits, box_hi[:, :, :, None], box_lo[:, :, :, None])
    local = _rotate(rotation.transpose(-1, -2)[:, :, None, None], corners - origin[:, :, None, None])
    z = local[..., 2]
    safe_z = torch.where(z > 1e-2, z, torch.ones_like(z))
    u = camera.fx * local[..., 0] / safe_z + camera.cx
    v = camera.fy * local[..., 1] / safe_z + camera.cy
    whole, hidden = ~(z > 1e-2).all(-1) & (z > 0).any(-1), ~(z > 0).any(-1)
    inf = torch.full_like(z[..., 0], math.inf)
    u_lo = torch.where(whole, -inf, torch.where(hidden, inf, u.amin(-1) - 1.0))
    u_hi = torch.where(whole, inf, torch.where(hidden, -inf, u.amax(-1) + 1.0))
    v_lo = torch.where(whole, -inf, torch.where(hidden, inf, v.amin(-1) - 1.0))
    v_hi = torch.where(whole, inf, torch.where(hidden, -inf, v.amax(-1) + 1.0))
    columns = torch.arange(camera.width, dtype=torch.float32) + 0.5
    rows = torch.arange(camera.height, dtype=torch.float32) + 0.5
    in_columns = (columns[:, None] >= u_lo[:, :, None]) & (columns[:, None] <= u_hi[:, :, None])
    in_rows = (rows[:, None] >= v_lo[:, :, None]) & (rows[:, None] <= v_hi[:, :, None])
    torch_tests = in_rows[:, :, :, None] & in_columns[:, :, None]
    # The kernel's cull.
    kernel_tests = torch.zeros_like(torch_tests)
    boxes = box_lo.shape[2]
    fx, fy, cx, cy = (np.float32(x) for x in (camera.fx, camera.fy, camera.cx, camera.cy))
    for b in range(batch):
        for t in range(frames):
            span = np.empty((boxes, 4), np.int64)
            planes = np.empty((2, boxes, 3), np.float32)
            o = origin[b, t].numpy()
            procedural_kernels._screen_intervals(
                rotation[b, t].numpy(), o[0], o[1], o[2], box_lo[b, t].numpy(), box_hi[b, t].numpy(), fx, fy, cx, cy,
                camera.width, camera.height, span, planes[0], planes[1])
            for k in range(boxes):
                kernel_tests[b, t, span[k, 2]:span[k, 3] + 1, span[k, 0]:span[k, 1] + 1, k] = True
    dropped = int((hit & torch_tests & ~kernel_tests).sum())
    extra = int((kernel_tests & ~torch_tests).sum())
    straddling_hits = int((hit & whole[:, :, None, None]).sum())
    return dropped, extra, int(torch_tests.sum()), int(kernel_tests.sum()), straddling_hits


# Scenes and image shapes the cameras hugging boxes are tried in.
HUGGING_SCENES = [
    {"scene": "indoor"},
    {"scene": "outdoor"},
    {"scene": "indoor", "busy": True},
    {"scene": "indoor", "image_size": (32, 48)},
    {"scene": "indoor", "image_size": (128, 128)},
]


@pytest.mark.parametrize("options", [*HUGGING_SCENES, {"scene": "indoor", "fov_degrees": 30.0},
                                     {"scene": "indoor", "fov_degrees": 150.0}])
def test_the_kernel_cull_keeps_every_pair_that_hits_at_cameras_hugging_boxes(options):
    model = ProceduralWorldModel(**options)
    rng = np.random.default_rng(5)
    batch, frames = 3, 4
    model.start(random_poses(rng, model, batch, 1), [torch.Generator().manual_seed(s) for s in range(batch)])
    totals = np.zeros(3, np.int64)
    for draw in range(12):
        model.time[:] = torch.from_numpy(rng.integers(0, 2000, batch))  # the moving boxes elsewhere
        dropped, extra, *counts = cull_leaks(model, poses_hugging_boxes(rng, model, batch, frames))
        assert dropped == 0, f"the cull drops {dropped} ray-box pairs that hit (draw {draw})"
        assert extra == 0, f"the cull tests {extra} pairs the torch path does not (draw {draw})"
        totals += counts
    torch_pairs, kernel_pairs, straddling_hits = totals
    assert kernel_pairs < 0.5 * torch_pairs  # it does cull the boxes that straddle the camera plane
    assert straddling_hits > 1000  # and those boxes are hit: the test reaches the pairs the new cull decides


@pytest.mark.parametrize("options", HUGGING_SCENES)
def test_cameras_hugging_boxes_are_bit_exact_with_the_torch_path(monkeypatch, options):
    from mirage_env.agents.evaluate import torch_threads

    with torch_threads(1):
        fast = run(monkeypatch, True, 4, batch=3, views=3, cameras=poses_hugging_boxes, **options)
        assert compiled._broken is None
        oracle = run(monkeypatch, False, 4, batch=3, views=3, cameras=poses_hugging_boxes, **options)
    assert_same(fast, oracle)
    for segment in (item for item in fast if not isinstance(item, dict)):  # grazing rays exit in front: no NaN
        assert not torch.isnan(segment.latents).any() and (segment.image_depth > 0).all()


def grazing_pose(model) -> torch.Tensor:
    """(1, 1, 4, 4) a camera pitched so that a ray of its top row has a world y-direction of exactly zero
    (in the cast's float32), found by trying pitches a nanoradian apart around that row's angle."""
    from mirage_env.backends.procedural import _rotate
    from mirage_env.geometry import CameraRig, pose_from_rig

    row = model._rays.reshape(model.camera.height, model.camera.width, 3)[0]
    base = math.atan(float(row[0, 1]))
    for sign in (1, -1):
        for k in range(-3000, 3000):
            pose = torch.from_numpy(pose_from_rig(CameraRig(0.1, -1.2, 0.3, yaw=0.0, pitch=-sign * (base + k * 1e-9),
                                                            roll=0.0)))[None, None]
            directions = _rotate(pose[..., :3, :3].float()[:, :, None], row)
            if (directions[..., 1] == 0).any():
                return pose
    raise AssertionError("no grazing pitch found")


@pytest.mark.parametrize("kernels", [False, True])
def test_a_ray_along_a_room_plane_exits_in_front_of_the_camera(monkeypatch, kernels):
    # The 1e-9 guard on a direction's inverse makes it positive; the room's exit face must be picked on that
    # side too, or the exit lies ~1e9 m behind the camera: negative depth, NaN colours, NaN in memory.
    monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
    model = ProceduralWorldModel()
    segment = model.start(grazing_pose(model), [torch.Generator().manual_seed(0)])
    assert (segment.image_depth > 0).all()
    assert torch.isfinite(segment.latents).all()


def test_the_patch_median_is_the_sorted_middle_value_with_ties_infinities_and_nan():
    from mirage_env.backends import procedural_kernels

    rng = np.random.default_rng(6)
    order = np.array([36, 35, 37] + [i for i in range(64) if i not in (35, 36, 37)], dtype=np.int64)
    for trial in range(3000):
        kind = trial % 6
        if kind == 0:  # a smooth depth: a plane's, rising across the patch
            values = (2.0 + np.add.outer(np.arange(8), rng.uniform(-1, 1) * np.arange(8)).ravel() * 0.01)
        elif kind == 1:  # few distinct values: ties at the middle
            values = rng.choice([0.5, 1.0, 1.0, 2.0], 64)
        elif kind == 2:  # sky: +inf, most or some of the patch
            values = np.where(rng.random(64) < rng.random(), np.inf, rng.uniform(0.1, 50, 64))
        elif kind == 3:  # NaN (not from the cast, but kth_smallest's contract), -inf, and zeros
            values = rng.uniform(-1, 1, 64)
            values[rng.random(64) < 0.2] = np.nan
            values[rng.random(64) < 0.1] = -np.inf
            values[rng.random(64) < 0.1] = 0.0
        elif kind == 4:  # all equal
            values = np.full(64, rng.uniform(0.1, 5))
        else:
            values = rng.uniform(0.1, 20, 64)
        values = values.astype(np.float32)
        expected = np.sort(values)[32]
        got = procedural_kernels._patch_median(values.copy(), 32, order)
        assert np.array_equal(np.float32(got), expected, equal_nan=True), (trial, values)
