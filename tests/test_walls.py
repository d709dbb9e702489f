"""Walls: no move, discrete or continuous, in any direction, takes a camera through the scene."""

import numpy as np
import pytest
import torch

from mirage_env.agents.evaluate import torch_threads
from mirage_env.backends.procedural import ProceduralWorldModel
from mirage_env.env import MirageEnv
from mirage_env.geometry import Move
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.vector import MirageVectorEnv
from mirage_env.world import World

CLEARANCE = 0.3  # the envs' default collision_distance
STEP = 0.25  # MotionConfig's step_metres and max_speed_metres


@pytest.fixture(autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


def room_of(env, world: int = 0) -> tuple[np.ndarray, np.ndarray]:
    model = env.world.model
    return model.room_lo[world].double().numpy(), model.room_hi[world].double().numpy()


def empty_the_room(env, world: int = 0) -> None:
    """Move every object outside the room's walls, so a camera walking straight meets a wall."""
    model = env.world.model
    outside = model.room_hi[world] + 10.0
    model.box_lo[world] = outside
    model.box_hi[world] = outside


def assert_inside(position, lo, hi) -> None:
    assert (position - lo >= CLEARANCE - 1e-9).all() and (hi - position >= CLEARANCE - 1e-9).all(), \
        f"camera at {position.tolist()} is not inside the room {lo.tolist()} .. {hi.tolist()} with its clearance"


# The wall each move walks into from the start (facing +z): (axis, +1 towards hi / -1 towards lo).
DISCRETE = [(Move.FORWARD, 2, +1), (Move.BACKWARD, 2, -1), (Move.STRAFE_LEFT, 0, -1), (Move.STRAFE_RIGHT, 0, +1)]


@pytest.mark.parametrize("move, axis, sign", DISCRETE, ids=[m.name for m, _, _ in DISCRETE])
def test_every_move_into_a_wall_stops_at_the_clearance_and_reports_a_collision(move, axis, sign):
    env = MirageEnv(image_size=16, max_episode_steps=1000)
    env.reset(seed=3)
    empty_the_room(env)
    lo, hi = room_of(env)
    for _ in range(40):  # rooms are at most 12 m across: 40 steps of 0.25 m reach any wall
        observation, _, _, _, info = env.step(move)
    position = env.batch.rigs[0, :3]
    assert info["collided"]
    assert_inside(position, lo, hi)
    gap = hi[axis] - position[axis] if sign > 0 else position[axis] - lo[axis]
    assert CLEARANCE <= gap < CLEARANCE + STEP  # walked up to the wall, not stopped early
    np.testing.assert_array_equal(np.delete(position, axis), 0.0)  # and straight
    np.testing.assert_array_equal(observation["pose"][:3], position.astype(np.float32))


# Continuous velocities (forward, right, up, yaw, pitch, roll rates): each translation, both ways,
# and the wall it meets: (axis, +1 towards the room's hi side / -1 towards lo). World up is -y.
CONTINUOUS = {"forward": (0, 1.0, 2, +1), "backward": (0, -1.0, 2, -1), "right": (1, 1.0, 0, +1),
              "left": (1, -1.0, 0, -1), "up": (2, 1.0, 1, -1), "down": (2, -1.0, 1, +1)}


@pytest.mark.parametrize("direction", list(CONTINUOUS))
def test_a_velocity_in_each_direction_stops_at_the_walls_ceiling_and_floor(direction):
    component, value, axis, sign = CONTINUOUS[direction]
    env = MirageEnv(image_size=16, action_type="continuous", max_episode_steps=1000)
    env.reset(seed=4)
    empty_the_room(env)
    lo, hi = room_of(env)
    velocity = np.zeros(6, dtype=np.float32)
    velocity[component] = value
    for _ in range(40):
        _, _, _, _, info = env.step(velocity)
    position = env.batch.rigs[0, :3]
    assert info["collided"]
    assert_inside(position, lo, hi)
    gap = hi[axis] - position[axis] if sign > 0 else position[axis] - lo[axis]
    assert CLEARANCE <= gap < CLEARANCE + STEP


def test_two_hundred_steps_back_end_inside_the_room_among_its_objects():
    # The case: backward used to go unchecked and left the room by 45 m.
    env = MirageEnv(image_size=16, max_episode_steps=1000)
    env.reset(seed=0)
    lo, hi = room_of(env)
    collided = []
    for _ in range(200):
        _, _, _, _, info = env.step(Move.BACKWARD)
        collided.append(info["collided"])
    assert_inside(env.batch.rigs[0, :3], lo, hi)
    assert collided[-1] and sum(collided) > 150
    assert info["path_length"] < hi[2] - lo[2]


def test_turned_cameras_walking_diagonally_stay_inside_every_world_of_a_batch():
    venv = MirageVectorEnv(3, image_size=16, max_episode_steps=1000)
    venv.reset(seed=10)
    for _ in range(3):  # turn 45 degrees: every step now moves along both x and z
        venv.step(np.full(3, int(Move.TURN_RIGHT)))
    for _ in range(60):
        _, _, _, _, infos = venv.step(np.array([Move.FORWARD, Move.BACKWARD, Move.STRAFE_LEFT], dtype=np.int64))
    assert infos["collided"].all()
    for world in range(3):
        assert_inside(venv.batch.rigs[world, :3], *room_of(venv, world))


def test_agents_sharing_a_world_each_stop_at_its_walls():
    env = MirageParallelEnv(n_agents=3, image_size=16, max_episode_steps=1000)
    env.reset(seed=2)
    lo, hi = room_of(env)
    for _ in range(60):
        _, _, _, _, infos = env.step({agent: Move.BACKWARD for agent in env.agents})
    assert all(infos[agent]["collided"] for agent in env.agents)
    for rig in env.batch.rigs:
        assert_inside(rig[:3], lo, hi)


# ---------------------------------------------------------------- the model's query, exactly


def one_box_model(lo, hi) -> ProceduralWorldModel:
    """A started procedural world whose only object is the box [lo, hi] (x, z); the rest lie outside the room."""
    model = ProceduralWorldModel(image_size=16)
    model.start(torch.eye(4, dtype=torch.float64)[None, None], [torch.Generator().manual_seed(0)])
    model.room_lo[0] = torch.tensor([-10.0, -3.0, -10.0])
    model.room_hi[0] = torch.tensor([10.0, 1.5, 10.0])
    model.box_lo[0] = model.box_hi[0] = torch.tensor([50.0, 1.5, 50.0])
    model.box_lo[0, 0] = torch.tensor([lo[0], 0.5, lo[1]])
    model.box_hi[0, 0] = torch.tensor([hi[0], 1.5, hi[1]])
    return model


def blocked(model, start, end, clearance=CLEARANCE) -> bool:
    start = torch.tensor([start], dtype=torch.float64)
    end = torch.tensor([end], dtype=torch.float64)
    return bool(model.blocked(torch.tensor([0]), start, end, clearance)[0])


def test_a_move_through_a_thin_object_is_blocked_though_both_ends_are_clear():
    model = one_box_model((-0.05, 1.0), (0.05, 3.0))  # a 10 cm wall panel across x = 0
    assert blocked(model, (-0.5, 0.0, 2.0), (0.5, 0.0, 2.0))
    assert not blocked(model, (-0.5, 0.0, 0.0), (0.5, 0.0, 0.0))  # passes 1 m in front of it


def test_clearance_is_measured_exactly_from_faces_and_corners():
    model = one_box_model((1.0, 1.0), (2.0, 2.0))
    # Straight at a face: stopping 0.31 m short is fine, 0.29 m short is not.
    assert not blocked(model, (0.0, 0.0, 1.5), (0.69, 0.0, 1.5))
    assert blocked(model, (0.0, 0.0, 1.5), (0.71, 0.0, 1.5))
    # Past a corner: the path's least distance to the corner (1, 1) counts, not its ends.
    assert blocked(model, (0.0, 0.8, 1.7), (1.7, 0.8, 0.0))  # passes 0.21 m from the corner
    assert not blocked(model, (0.0, 0.0, 1.5), (1.5, 0.0, 0.0))  # passes 0.35 m from it
    # The object stands on the floor: a camera higher up is stopped all the same.
    assert blocked(model, (0.0, -1.0, 1.5), (0.8, -1.0, 1.5))


def test_a_camera_already_too_close_may_move_but_not_closer():
    model = one_box_model((1.0, 1.0), (2.0, 2.0))
    start = (0.8, 0.0, 1.5)  # 0.2 m from the face: the moving crate could have slid this near
    assert not blocked(model, start, (0.6, 0.0, 1.5))  # away
    assert not blocked(model, start, (0.8, 0.0, 1.3))  # along the face
    assert blocked(model, start, (0.9, 0.0, 1.5))  # nearer


# ---------------------------------------------------------------- without geometry, and determinism


class PixelsOnly(ProceduralWorldModel):
    """The procedural world with its geometry hidden, as a generator that only makes pixels (Wan)."""

    blocked = None


def test_without_geometry_only_a_move_towards_what_the_camera_sees_is_checked():
    env = MirageEnv(world=World(PixelsOnly(image_size=16)), max_episode_steps=1000)
    env.reset(seed=0)
    for _ in range(80):
        _, _, _, _, info = env.step(Move.FORWARD)
    assert info["collided"]  # the depth ahead stopped it
    lo, hi = room_of(env)
    assert lo[2] < env.batch.rigs[0, 2] < hi[2]
    for _ in range(80):
        _, _, _, _, info = env.step(Move.BACKWARD)
    assert not info["collided"] and env.batch.rigs[0, 2] < lo[2]  # backward is not seen: documented limit


def test_the_same_seed_gives_the_same_episode_with_its_collisions():
    def run():
        env = MirageEnv(image_size=16, max_episode_steps=1000)
        observation, _ = env.reset(seed=7)
        rng = np.random.default_rng(1)
        frames, collisions = [observation["rgb"]], []
        for move in rng.choice([Move.FORWARD, Move.BACKWARD, Move.STRAFE_LEFT, Move.TURN_LEFT], 80):
            observation, _, _, _, info = env.step(move)
            frames.append(observation["rgb"])
            collisions.append(info["collided"])
        return np.stack(frames), collisions

    first, again = run(), run()
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1] and any(first[1])


# ---------------------------------------------------------------- a refused step changes nothing


def far_stepping_env(**options):
    # Without geometry nothing stops a 6 km step; the second one would leave the world's 10 km range.
    return MirageEnv(world=World(PixelsOnly(image_size=16)), motion={"step_metres": 6000.0},
                     max_episode_steps=100, **options)


def test_a_step_out_of_the_worlds_range_is_refused_before_anything_moves():
    env, twin = far_stepping_env(), far_stepping_env()
    env.reset(seed=5)
    twin.reset(seed=5)
    for e in (env, twin):
        e.step(Move.BACKWARD)
    rigs, steps = env.batch.rigs.copy(), env.batch.steps.copy()
    entries, time = env.world.memory.entries_per_world(), env.world.model.time.clone()
    for _ in range(2):  # used to raise on every step until reset
        with pytest.raises(ValueError, match=r"outside the world's range; the step was not taken"):
            env.step(Move.BACKWARD)
    np.testing.assert_array_equal(env.batch.rigs, rigs)
    np.testing.assert_array_equal(env.batch.steps, steps)
    assert torch.equal(env.world.memory.entries_per_world(), entries) and torch.equal(env.world.model.time, time)
    # The episode goes on as if the refused steps had never been asked for.
    for move in (Move.TURN_LEFT, Move.FORWARD, Move.STRAFE_RIGHT):
        observation, reward, _, _, _ = env.step(move)
        expected, expected_reward, _, _, _ = twin.step(move)
        np.testing.assert_array_equal(observation["rgb"], expected["rgb"])
        np.testing.assert_array_equal(observation["pose"], expected["pose"])
        assert reward == expected_reward


def test_the_world_refuses_poses_out_of_range_before_it_changes():
    world = World(ProceduralWorldModel(image_size=16))
    start = torch.eye(4, dtype=torch.float64)[None, None]
    world.reset(start, seeds=[0])
    far = start.clone()
    far[..., 0, 3] = 2e4
    generator_state = world.generators[0].get_state()
    with pytest.raises(ValueError, match=r"world\(s\) \[0\].*outside the world's range"):
        world.step(far)
    assert torch.equal(world.generators[0].get_state(), generator_state)
    assert int(world.segments_generated[0]) == 1
