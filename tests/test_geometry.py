import math

import numpy as np
import pytest
import torch

from mirage_env.geometry import (
    Camera,
    CameraRig,
    MotionConfig,
    Move,
    apply_move,
    apply_velocity,
    check_pose,
    invert_pose,
    project,
    unproject,
)


def random_pose(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rig = CameraRig(*rng.normal(size=3), yaw=rng.uniform(-3, 3), pitch=rng.uniform(-1, 1), roll=rng.uniform(-0.5, 0.5))
    return torch.from_numpy(rig.c2w())


def test_point_in_front_of_camera_has_positive_z():
    camera = Camera.from_fov(64, 48)
    pose = random_pose(0)
    in_front = pose[:3, 3] + 2.0 * pose[:3, 2]  # two units along the optical axis
    uv, z = project(in_front[None], camera, pose)
    assert z.item() == pytest.approx(2.0)
    assert uv[0].tolist() == pytest.approx([camera.cx, camera.cy])


def test_project_unproject_round_trip():
    camera = Camera.from_fov(32, 24, 70)
    pose = random_pose(1)
    depth = torch.rand(24, 32, dtype=torch.float64) * 5 + 0.5
    points = unproject(depth, camera, pose)
    uv, z = project(points.reshape(-1, 3), camera, pose)
    v, u = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    assert torch.allclose(uv[:, 0], u.reshape(-1).double(), atol=1e-9)
    assert torch.allclose(uv[:, 1], v.reshape(-1).double(), atol=1e-9)
    assert torch.allclose(z, depth.reshape(-1), atol=1e-9)


def test_pose_composed_with_inverse_is_identity():
    pose = random_pose(2)
    assert torch.allclose(pose @ invert_pose(pose), torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(invert_pose(pose) @ pose, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_latent_camera_is_the_same_camera_scaled():
    camera = Camera.from_fov(64, 64)
    latent = camera.scaled(1 / 8)
    assert (latent.width, latent.height) == (8, 8)
    point = torch.tensor([[0.3, -0.2, 2.0]], dtype=torch.float64)
    uv_full, _ = project(point, camera, torch.eye(4, dtype=torch.float64))
    uv_latent, _ = project(point, latent, torch.eye(4, dtype=torch.float64))
    assert torch.allclose(uv_full / 8, uv_latent)
    with pytest.raises(ValueError, match="non-integer"):
        Camera.from_fov(60, 60).scaled(1 / 8)


def test_forward_moves_along_optical_axis_and_world_up_is_minus_y():
    rig = CameraRig()
    moved = apply_move(rig, Move.FORWARD, MotionConfig(step_metres=1.0))
    assert moved.position.tolist() == pytest.approx([0, 0, 1])
    up = apply_velocity(rig, [0, 0, 1, 0, 0, 0], MotionConfig(max_speed_metres=1.0))
    assert up.position.tolist() == pytest.approx([0, -1, 0])


def test_turning_is_about_world_up_and_right_turn_looks_to_plus_x():
    rig = apply_move(CameraRig(), Move.LOOK_UP)
    turned = apply_move(rig, Move.TURN_RIGHT, MotionConfig(turn_degrees=90))
    pose = turned.c2w()
    forward = pose[:3, 2]
    assert forward[0] > 0.9  # now looking mostly along +x
    assert turned.pitch == pytest.approx(rig.pitch)  # turning keeps the pitch
    # Looking up tilts the optical axis towards world up (-y).
    assert pose_forward_y(rig) < 0


def pose_forward_y(rig):
    return rig.c2w()[1, 2]


def test_pitch_is_clamped():
    rig = CameraRig()
    for _ in range(50):
        rig = apply_move(rig, Move.LOOK_UP, MotionConfig(look_degrees=10, max_pitch_degrees=60))
    assert rig.pitch == pytest.approx(math.radians(60))


def test_bad_actions_and_poses_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown move"):
        apply_move(CameraRig(), 42)
    with pytest.raises(ValueError, match="NaN"):
        apply_velocity(CameraRig(), [float("nan"), 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        apply_velocity(CameraRig(), [2, 0, 0, 0, 0, 0])
    bad = torch.eye(4)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_pose(bad)
    with pytest.raises(ValueError, match="shape"):
        check_pose(torch.eye(3))


def test_batched_motion_matches_single_rig_motion():
    from mirage_env.geometry import apply_moves, apply_velocities, poses_from_rigs

    rng = np.random.default_rng(0)
    rigs = [CameraRig(*rng.normal(size=3), yaw=rng.uniform(-3, 3), pitch=rng.uniform(-0.5, 0.5)) for _ in range(len(Move))]
    array = np.stack([r.as_array() for r in rigs])
    moved = apply_moves(array, np.arange(len(Move)))
    for i, rig in enumerate(rigs):
        assert moved[i] == pytest.approx(apply_move(rig, Move(i)).as_array())
    velocity = rng.uniform(-1, 1, size=(len(rigs), 6))
    flown = apply_velocities(array, velocity)
    for i, rig in enumerate(rigs):
        assert flown[i] == pytest.approx(apply_velocity(rig, velocity[i]).as_array())
    assert poses_from_rigs(array) == pytest.approx(np.stack([r.c2w() for r in rigs]))
    with pytest.raises(ValueError, match="outside the action space"):
        apply_moves(array[:1], np.array([99]))
