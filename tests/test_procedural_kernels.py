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
        **options) -> list:
    """Start ``batch`` worlds, then ``steps`` segments at random cameras, each with the previous segment as
    memory under a random mask (so memory is pasted, refused as too far or too near, or not offered)."""
    monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
    model = ProceduralWorldModel(**options)
    generators = [torch.Generator().manual_seed(10 + b) for b in range(batch)]
    rng = np.random.default_rng(0)
    frames = views * frames_per_view
    segment = model.start(random_poses(rng, model, batch, frames), generators, views=views)
    out = [segment]
    for step in range(steps):
        mask = torch.from_numpy(rng.random(segment.depth.shape) < 0.5)
        request = SegmentRequest(poses=random_poses(rng, model, batch, frames), memory_latents=segment.latents,
                                 memory_mask=mask, memory_depth=segment.depth * float(rng.uniform(0.95, 1.05)),
                                 generators=generators, use_memory=step % 3 != 2, views=views)
        segment = model.generate(request)
        out.append(segment)
        out.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
    return out


def assert_same(fast, oracle):
    assert len(fast) == len(oracle)
    for step, (a, b) in enumerate(zip(fast, oracle)):
        if isinstance(a, dict):  # the model's state after a segment
            for name in a:
                assert torch.equal(a[name], b[name]), f"state {name} differs after step {step}"
            continue
        for name in ("latents", "depth", "poses", "image_depth", "frames"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert torch.equal(x, y), f"{name} differs at step {step}"
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
