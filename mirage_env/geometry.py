"""Cameras, poses and camera motion.

Conventions (decided once for the whole package, tested in tests/test_geometry.py):

- Camera axes follow OpenCV: x right, y down, z forward. A point in front of a
  camera has z > 0 in that camera's frame.
- Intrinsics ``K`` are in pixels for one image size. Pixel (row i, column j)
  covers the continuous square [j, j+1) x [i, i+1); its centre is (j + 0.5,
  i + 0.5). The same camera at another resolution (the latent grid of a VAE
  with spatial factor f) is ``camera.scaled(1 / f)``, never arithmetic at a
  call site.
- Poses are camera-to-world 4x4 matrices (``c2w``). Composition is done in
  float64 on the host; bulk projection runs in float32 on the device.
- The world frame is the first camera of an episode; world "up" is -y.
- Depth is z-depth (distance along the optical axis); sky / invalid is +inf.
- A camera *rig* (what an agent drives) is a position plus yaw, pitch and roll:
  yaw turns about world up (positive yaw turns right, towards +x), pitch tilts
  the optical axis (positive pitch looks up, towards -y) and is clamped, roll
  is about the optical axis.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import rig_motion

__all__ = [
    "Camera",
    "CameraRig",
    "Move",
    "MotionConfig",
    "invert_pose",
    "pose_from_rig",
    "project",
    "unproject",
    "pixel_centres",
    "check_pose",
]


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics for an image of ``width`` x ``height`` pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_fov(cls, width: int, height: int, fov_x_degrees: float = 90.0) -> "Camera":
        """A centred camera with square pixels and the given horizontal field of view."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got width={width}, height={height}")
        if not 1.0 <= fov_x_degrees <= 179.0:
            raise ValueError(f"fov_x_degrees must be in [1, 179], got {fov_x_degrees}")
        fx = 0.5 * width / math.tan(math.radians(fov_x_degrees) / 2)
        return cls(fx=fx, fy=fx, cx=width / 2, cy=height / 2, width=width, height=height)

    def scaled(self, factor: float) -> "Camera":
        """The same camera on an image ``factor`` times the size (0.125 for an 8x VAE grid)."""
        width, height = self.width * factor, self.height * factor
        if abs(width - round(width)) > 1e-6 or abs(height - round(height)) > 1e-6:
            raise ValueError(
                f"scaling a {self.width}x{self.height} camera by {factor} gives a non-integer "
                f"image size {width}x{height}; choose image sides divisible by the VAE factor"
            )
        return Camera(
            fx=self.fx * factor,
            fy=self.fy * factor,
            cx=self.cx * factor,
            cy=self.cy * factor,
            width=int(round(width)),
            height=int(round(height)),
        )

    def K(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """The 3x3 intrinsics matrix."""
        return torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=dtype, device=device
        )

    def to_dict(self) -> dict:
        return {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy, "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, data: dict) -> "Camera":
        return cls(**{k: data[k] for k in ("fx", "fy", "cx", "cy")}, width=int(data["width"]), height=int(data["height"]))


def check_pose(c2w: torch.Tensor | np.ndarray, name: str = "pose") -> torch.Tensor:
    """Validate a (..., 4, 4) camera-to-world pose and return it as a tensor."""
    c2w = torch.as_tensor(c2w)
    if c2w.shape[-2:] != (4, 4):
        raise ValueError(f"{name} must have shape (..., 4, 4), got {tuple(c2w.shape)}")
    if c2w.device.type == "cpu" and c2w.dtype in (torch.float32, torch.float64) and not c2w.requires_grad:
        # The same checks in numpy: on a few poses its per-call cost is far below torch's.
        array = c2w.numpy()
        finite = bool(np.isfinite(array).all())
        rigid = finite and bool((np.abs(array[..., 3, :] - _LAST_ROW) <= 1e-5 + 1e-5 * _LAST_ROW).all())
    else:
        finite = bool(torch.isfinite(c2w).all())
        bottom = c2w[..., 3, :].to(torch.float64)
        expected = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=bottom.device)
        rigid = finite and torch.allclose(bottom, expected.expand_as(bottom), atol=1e-5)
    if not finite:
        raise ValueError(f"{name} contains NaN or inf; poses must be finite camera-to-world matrices")
    if not rigid:
        raise ValueError(f"{name} must be a rigid 4x4 transform with last row [0, 0, 0, 1]")
    return c2w


_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])


def invert_pose(c2w: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid (..., 4, 4) transforms: world-to-camera from camera-to-world."""
    rotation = c2w[..., :3, :3]
    translation = c2w[..., :3, 3:]
    inverse = torch.zeros_like(c2w)
    inverse[..., :3, :3] = rotation.transpose(-1, -2)
    inverse[..., :3, 3:] = -rotation.transpose(-1, -2) @ translation
    inverse[..., 3, 3] = 1.0
    return inverse


def pixel_centres(camera: Camera, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) coordinates of every pixel centre, each (height, width)."""
    v, u = torch.meshgrid(
        torch.arange(camera.height, dtype=dtype, device=device) + 0.5,
        torch.arange(camera.width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return u, v


def unproject(depth: torch.Tensor, camera: Camera, c2w: torch.Tensor) -> torch.Tensor:
    """Lift every pixel to a world point.

    Args:
        depth: (..., height, width) z-depth; +inf where there is nothing.
        camera: intrinsics at the depth map's resolution.
        c2w: (..., 4, 4) camera-to-world poses, one per leading index of ``depth``.

    Returns:
        (..., height, width, 3) world points (inf where depth is inf).
    """
    if depth.shape[-2:] != (camera.height, camera.width):
        raise ValueError(
            f"depth of shape {tuple(depth.shape[-2:])} does not match the camera's "
            f"{camera.height}x{camera.width}; scale the camera with camera.scaled(...)"
        )
    dtype = depth.dtype if depth.is_floating_point() else torch.float32
    u, v = pixel_centres(camera, dtype=dtype, device=depth.device)
    x = (u - camera.cx) / camera.fx * depth
    y = (v - camera.cy) / camera.fy * depth
    points_camera = torch.stack([x, y, depth], dim=-1)
    c2w = c2w.to(dtype=dtype, device=depth.device)
    rotation = c2w[..., None, None, :3, :3]
    translation = c2w[..., None, None, :3, 3]
    return (rotation @ points_camera[..., None])[..., 0] + translation


def project(points_world: torch.Tensor, camera: Camera, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points into a camera.

    Args:
        points_world: (..., N, 3) world points.
        camera: intrinsics of the target image.
        c2w: (..., 4, 4) camera-to-world pose(s), broadcast against the points' batch.

    Returns:
        uv: (..., N, 2) continuous pixel coordinates (centre of pixel (i, j) is (j+0.5, i+0.5)).
        z: (..., N) z-depth in the camera; points behind the camera have z <= 0.
    """
    w2c = invert_pose(c2w.to(points_world.dtype))
    points_camera = points_world @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = points_camera[..., 2]
    safe_z = torch.where(z.abs() > 1e-9, z, torch.full_like(z, 1e-9))
    u = camera.fx * points_camera[..., 0] / safe_z + camera.cx
    v = camera.fy * points_camera[..., 1] / safe_z + camera.cy
    return torch.stack([u, v], dim=-1), z


# --------------------------------------------------------------------------- rig and motion


def _rotation_yaw_pitch_roll(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    # Yaw about the world y axis; positive yaw swings +z towards +x (a right turn).
    r_yaw = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    # Pitch about the camera x axis; positive pitch swings +z towards -y (looking up).
    r_pitch = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    r_roll = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return r_yaw @ r_pitch @ r_roll


@dataclass(frozen=True)
class CameraRig:
    """What an agent drives: a position and yaw / pitch / roll in radians (see module docstring)."""

    x: float = 0.0
    y: float = 0.0
    z: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    @property
    def position(self) -> np.ndarray:
        return np.array([self.x, self.y, self.z], dtype=np.float64)

    def c2w(self) -> np.ndarray:
        """The rig's camera-to-world pose, float64 (4, 4)."""
        return pose_from_rig(self)

    def as_array(self) -> np.ndarray:
        return np.array([self.x, self.y, self.z, self.yaw, self.pitch, self.roll], dtype=np.float64)

    @classmethod
    def from_array(cls, values) -> "CameraRig":
        values = [float(v) for v in values]
        if len(values) != 6 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"a rig is 6 finite numbers (x, y, z, yaw, pitch, roll), got {values}")
        return cls(*values)


def pose_from_rig(rig: CameraRig) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _rotation_yaw_pitch_roll(rig.yaw, rig.pitch, rig.roll)
    pose[:3, 3] = rig.position
    return pose


class Move(enum.IntEnum):
    """Discrete navigation moves, the default action space of the envs."""

    STAY = 0
    FORWARD = 1
    BACKWARD = 2
    STRAFE_LEFT = 3
    STRAFE_RIGHT = 4
    TURN_LEFT = 5
    TURN_RIGHT = 6
    LOOK_UP = 7
    LOOK_DOWN = 8


@dataclass(frozen=True)
class MotionConfig:
    """How far one action moves the camera.

    Translations are along the rig's heading projected on the ground plane, so
    looking up or down does not make an agent fly; vertical motion exists only
    in the continuous velocity action.
    """

    step_metres: float = 0.25
    turn_degrees: float = 15.0
    look_degrees: float = 10.0
    max_pitch_degrees: float = 60.0
    max_roll_degrees: float = 30.0
    # Continuous actions are velocities in [-1, 1] scaled by these per step.
    max_speed_metres: float = 0.25
    max_turn_degrees: float = 15.0


def _clamp(value: float, limit: float) -> float:
    return max(-limit, min(limit, value))


def apply_move(rig: CameraRig, move: int | Move, motion: MotionConfig = MotionConfig()) -> CameraRig:
    """The rig after one discrete move."""
    try:
        move = Move(int(move))
    except (ValueError, TypeError):
        raise ValueError(f"unknown move {move!r}; expected one of {[m.value for m in Move]} ({', '.join(m.name for m in Move)})") from None
    forward = np.array([math.sin(rig.yaw), 0.0, math.cos(rig.yaw)])
    right = np.array([math.cos(rig.yaw), 0.0, -math.sin(rig.yaw)])
    position, yaw, pitch = rig.position, rig.yaw, rig.pitch
    step = motion.step_metres
    if move == Move.FORWARD:
        position = position + step * forward
    elif move == Move.BACKWARD:
        position = position - step * forward
    elif move == Move.STRAFE_LEFT:
        position = position - step * right
    elif move == Move.STRAFE_RIGHT:
        position = position + step * right
    elif move == Move.TURN_LEFT:
        yaw -= math.radians(motion.turn_degrees)
    elif move == Move.TURN_RIGHT:
        yaw += math.radians(motion.turn_degrees)
    elif move == Move.LOOK_UP:
        pitch += math.radians(motion.look_degrees)
    elif move == Move.LOOK_DOWN:
        pitch -= math.radians(motion.look_degrees)
    pitch = _clamp(pitch, math.radians(motion.max_pitch_degrees))
    yaw = math.atan2(math.sin(yaw), math.cos(yaw))
    return CameraRig(*position, yaw=yaw, pitch=pitch, roll=rig.roll)


def apply_velocity(rig: CameraRig, velocity, motion: MotionConfig = MotionConfig()) -> CameraRig:
    """The rig after one step of a continuous 6-DoF velocity.

    ``velocity`` is (forward, right, up, yaw_rate, pitch_rate, roll_rate), each in
    [-1, 1] and scaled by ``motion``; translation is in the rig's heading frame
    (forward/right on the ground plane, up along world up = -y).
    """
    velocity = np.asarray(velocity, dtype=np.float64).reshape(-1)
    if velocity.shape != (6,):
        raise ValueError(f"a velocity action has 6 components (forward, right, up, yaw, pitch, roll), got shape {velocity.shape}")
    if not np.isfinite(velocity).all():
        raise ValueError(f"velocity action contains NaN or inf: {velocity.tolist()}")
    if np.abs(velocity).max() > 1.0 + 1e-6:
        raise ValueError(f"velocity action components must lie in [-1, 1], got {velocity.tolist()}")
    forward = np.array([math.sin(rig.yaw), 0.0, math.cos(rig.yaw)])
    right = np.array([math.cos(rig.yaw), 0.0, -math.sin(rig.yaw)])
    up = np.array([0.0, -1.0, 0.0])
    speed = motion.max_speed_metres
    position = rig.position + speed * (velocity[0] * forward + velocity[1] * right + velocity[2] * up)
    turn = math.radians(motion.max_turn_degrees)
    yaw = rig.yaw + turn * velocity[3]
    pitch = _clamp(rig.pitch + turn * velocity[4], math.radians(motion.max_pitch_degrees))
    roll = _clamp(rig.roll + turn * velocity[5], math.radians(motion.max_roll_degrees))
    yaw = math.atan2(math.sin(yaw), math.cos(yaw))
    return CameraRig(*position, yaw=yaw, pitch=pitch, roll=roll)


# --------------------------------------------------------------------------- batched motion
# The same motion as above, for (N, 6) arrays of rigs (x, y, z, yaw, pitch, roll): vector and
# multi-agent envs move every camera in one call (mirage_env.rig_motion, compiled where numba runs).


def poses_from_rigs(rigs: np.ndarray) -> np.ndarray:
    """(N, 6) rigs -> (N, 4, 4) float64 camera-to-world poses (same convention as pose_from_rig)."""
    rigs = np.ascontiguousarray(rigs, dtype=np.float64).reshape(-1, 6)
    return path_poses(rigs, rigs, 1)  # a path of one frame from a rig to itself: its pose


def path_poses(start: np.ndarray, end: np.ndarray, frames: int) -> np.ndarray:
    """(N, 6) rigs -> (N * frames, 4, 4) poses at fractions 1/frames .. 1 of the way, yaw the short way round."""
    poses = np.empty((start.shape[0] * frames, 4, 4))
    rig_motion.run(rig_motion.path_poses, start, end, frames, poses)
    return poses


# Each move's sign along (forward, right, turn right, look up).
_MOVE_SIGNS = np.zeros((len(Move), 4))
for _move, _axis, _sign in ((Move.FORWARD, 0, 1.0), (Move.BACKWARD, 0, -1.0), (Move.STRAFE_RIGHT, 1, 1.0),
                            (Move.STRAFE_LEFT, 1, -1.0), (Move.TURN_RIGHT, 2, 1.0), (Move.TURN_LEFT, 2, -1.0),
                            (Move.LOOK_UP, 3, 1.0), (Move.LOOK_DOWN, 3, -1.0)):
    _MOVE_SIGNS[_move, _axis] = _sign


def apply_moves(rigs: np.ndarray, moves: np.ndarray, motion: MotionConfig = MotionConfig()) -> np.ndarray:
    """Batched ``apply_move``: (N, 6) rigs and (N,) moves -> (N, 6) rigs."""
    from .actions import check_actions

    rigs = np.array(rigs, dtype=np.float64).reshape(-1, 6)
    return apply_checked_moves(rigs, check_actions(moves, "discrete", len(rigs), "rig"), motion)


def apply_checked_moves(rigs: np.ndarray, moves: np.ndarray, motion: MotionConfig) -> np.ndarray:
    """``apply_moves`` for moves that :func:`~mirage_env.actions.check_actions` returned (int64 (N,)), on
    (N, 6) float64 rigs; returns new rigs (an env checks its actions once, not once per use)."""
    out = np.empty_like(rigs)
    rig_motion.run(rig_motion.move_rigs, rigs, moves, _MOVE_SIGNS, motion.step_metres,
                   math.radians(motion.turn_degrees), math.radians(motion.look_degrees),
                   math.radians(motion.max_pitch_degrees), out)
    return out


def apply_velocities(rigs: np.ndarray, velocities: np.ndarray, motion: MotionConfig = MotionConfig()) -> np.ndarray:
    """Batched ``apply_velocity``: (N, 6) rigs and (N, 6) velocities in [-1, 1] -> (N, 6) rigs."""
    from .actions import check_actions

    rigs = np.array(rigs, dtype=np.float64).reshape(-1, 6)
    return apply_checked_velocities(rigs, check_actions(velocities, "continuous", len(rigs), "rig"), motion)


def apply_checked_velocities(rigs: np.ndarray, velocities: np.ndarray, motion: MotionConfig) -> np.ndarray:
    """``apply_velocities`` for velocities that :func:`~mirage_env.actions.check_actions` returned
    (float64 (N, 6)), on (N, 6) float64 rigs; returns new rigs."""
    out = np.empty_like(rigs)
    rig_motion.run(rig_motion.fly_rigs, rigs, velocities, motion.max_speed_metres,
                   math.radians(motion.max_turn_degrees), math.radians(motion.max_pitch_degrees),
                   math.radians(motion.max_roll_degrees), out)
    return out
