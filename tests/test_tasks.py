"""PointNav and ReturnHome: rewards, termination and measures on hand-built trajectories.

Most tests run on ``CorridorWorldModel``, a deterministic stand-in whose depth
is a wall at a fixed distance and whose frames are a pure function of the
pose, so distances, SPL and revisit PSNR have exact expected values. The
checker tests run every registered id on the default procedural world.
"""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import mirage_env  # noqa: F401
from mirage_env.backends.base import LatentSpec, Segment
from mirage_env.env import MirageEnv
from mirage_env.geometry import Camera, Move
from mirage_env.tasks import TASKS, PointNavTask, ReturnHomeTask
from mirage_env.tasks.pointnav import goal_vectors
from mirage_env.world import World

F, L, R, B = Move.FORWARD, Move.TURN_LEFT, Move.TURN_RIGHT, Move.BACKWARD


class CorridorWorldModel:
    """Every view: depth ``wall`` metres everywhere; frames a smooth pattern set by the pose alone."""

    latent = LatentSpec(channels=4, spatial_factor=8)

    def __init__(self, wall: float = 20.0, image_size: int = 64):
        self.wall = wall
        self.camera = Camera.from_fov(image_size, image_size, 90.0)

    def _segment(self, poses: torch.Tensor) -> Segment:
        n, t = poses.shape[:2]
        h = w = self.camera.width // 8
        x, z = poses[..., 0, 3], poses[..., 2, 3]
        yaw = torch.atan2(poses[..., 0, 2], poses[..., 2, 2])
        grid = torch.arange(h * w, dtype=torch.float64).reshape(h, w)
        channels = [torch.sin(grid * (c + 1) * 0.37 + (3 * x + 5 * z + 7 * yaw)[..., None, None] * (c + 1))
                    for c in range(4)]
        latents = torch.stack(channels, 2).float()
        depth = torch.full((n, t, h, w), self.wall)
        return Segment(latents=latents, depth=depth, poses=poses)

    def start(self, poses, generators, conditioning=None, worlds=None):
        return self._segment(poses)

    def generate(self, request):
        return self._segment(request.poses)

    def decode(self, latents):
        rgb = ((latents[:, :, :3] + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        return rgb.repeat_interleave(8, -1).repeat_interleave(8, -2).permute(0, 1, 3, 4, 2).contiguous()

    def config(self):
        return {"name": "corridor", "wall": self.wall}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def corridor_env(task, wall: float = 20.0, **kwargs) -> MirageEnv:
    world = World(CorridorWorldModel(wall))
    return MirageEnv(task=task, world=world, **{"max_episode_steps": 40, **kwargs})


def put_goal(env, x: float, z: float) -> None:
    """Replace the sampled goal (pointnav) or waypoint (returnhome) of agent 0, keeping measures coherent."""
    task, goal = env.task, np.array([x, z])
    if isinstance(task, PointNavTask):
        task.goals[0] = goal
        task.shortest[0] = task.previous_distance[0] = math.hypot(x, z)
    else:
        task.waypoints[0] = goal
        task.previous_distance[0] = math.hypot(x, z)
        task.shortest[0] = 2 * math.hypot(x, z)


def play(env, moves):
    steps = []
    for move in moves:
        steps.append(env.step(move))
        if steps[-1][2] or steps[-1][3]:
            break
    return steps


# ---------------------------------------------------------------- goal geometry


def test_goal_vector_is_in_the_agent_frame():
    rigs = np.zeros((3, 6))
    rigs[1, 3] = math.pi / 2  # facing +x
    rigs[2, :3] = [1.0, 0.0, 1.0]
    goals = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 3.0]])
    vectors = goal_vectors(rigs, goals)
    np.testing.assert_allclose(vectors[0], [1.0, 0.0, 1.0], atol=1e-6)  # to the right of a +z-facing agent
    np.testing.assert_allclose(vectors[1], [1.0, 1.0, 0.0], atol=1e-6)  # straight ahead once turned to +x
    np.testing.assert_allclose(vectors[2], [2.0, 1.0, 0.0], atol=1e-6)


def test_goals_are_sampled_in_view_in_range_and_reproducibly():
    task = PointNavTask(min_distance=1.0, max_distance=2.0, max_bearing_degrees=30.0)
    env = corridor_env(task)
    seen = []
    for seed in range(20):
        observation, _ = env.reset(seed=seed)
        distance, cos, sin = observation["goal"]
        assert 1.0 - 1e-5 <= distance <= 2.0 + 1e-5
        assert abs(math.atan2(sin, cos)) <= math.radians(30.0) + 1e-5
        seen.append(observation["goal"].copy())
    env.reset(seed=7)
    np.testing.assert_array_equal(task.observe(env.batch, np.array([0]))["goal"][0], seen[7])
    assert len({tuple(g) for g in seen}) > 15


def test_goals_stay_short_of_a_wall_seen_ahead():
    env = corridor_env(PointNavTask(min_distance=1.0, max_distance=3.0, clearance=0.5), wall=2.0)
    for seed in range(10):
        observation, _ = env.reset(seed=seed)
        distance, cos, _ = observation["goal"]
        # Free range along a bearing b is wall / cos(b) (z-depth), the goal stays clearance short of it.
        assert distance * cos <= 2.0 - 0.5 * cos + 1e-5


# ---------------------------------------------------------------- PointNav


def test_pointnav_straight_walk_succeeds_with_spl_one_and_shaped_reward():
    env = corridor_env(PointNavTask(min_distance=0.5, max_distance=2.0, success_distance=0.3))
    env.reset(seed=0)
    put_goal(env, 0.0, 1.0)
    steps = play(env, [F] * 10)
    assert len(steps) == 3  # 1.0 -> 0.75 -> 0.5 -> 0.25 <= 0.3
    rewards = [s[1] for s in steps]
    np.testing.assert_allclose(rewards, [0.25 - 0.01, 0.25 - 0.01, 0.25 - 0.01 + 2.5])
    _, _, terminated, truncated, info = steps[-1]
    assert terminated and not truncated
    assert info["success"] and info["spl"] == pytest.approx(1.0)
    assert info["distance_to_goal"] == pytest.approx(0.25) and info["path_length"] == pytest.approx(0.75)


def test_pointnav_detour_lowers_spl():
    env = corridor_env(PointNavTask(min_distance=0.5, max_distance=2.0, success_distance=0.3))
    env.reset(seed=0)
    put_goal(env, 0.0, 1.0)
    steps = play(env, [B, B] + [F] * 10)
    info = steps[-1][4]
    assert info["success"]
    assert steps[0][1] == pytest.approx(-0.25 - 0.01)  # moving away is penalised
    # path 0.5 back + 1.25 forward = 1.75; shortest 1.0
    assert info["path_length"] == pytest.approx(1.75) and info["spl"] == pytest.approx(1.0 / 1.75)


def test_pointnav_timeout_is_truncation_without_success():
    env = corridor_env(PointNavTask(min_distance=1.5, max_distance=2.0), max_episode_steps=5)
    env.reset(seed=1)
    steps = play(env, [L] * 10)
    _, reward, terminated, truncated, info = steps[-1]
    assert len(steps) == 5 and truncated and not terminated
    assert not info["success"] and info["spl"] == 0.0 and reward == pytest.approx(-0.01)


def test_pointnav_forward_into_a_wall_is_refused_and_not_rewarded():
    env = corridor_env(PointNavTask(min_distance=0.5, max_distance=1.0), wall=0.4)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(F)
    assert info["collided"] and info["path_length"] == 0.0
    assert reward == pytest.approx(-0.01) and not terminated


def test_pointnav_resumes_exactly_from_a_saved_world(tmp_path):
    moves = [F, L, F, R, F, F, L]
    env = corridor_env(PointNavTask(min_distance=1.5, max_distance=3.0))
    env.reset(seed=3)
    play(env, moves[:3])
    env.save_world(tmp_path / "world.safetensors")
    rest = [(o["goal"].tolist(), r, t, info["spl"]) for o, r, t, _, info in play(env, moves[3:])]
    other = corridor_env(PointNavTask(min_distance=1.5, max_distance=3.0))
    other.reset(seed=99)
    other.load_world(tmp_path / "world.safetensors")
    resumed = [(o["goal"].tolist(), r, t, info["spl"]) for o, r, t, _, info in play(other, moves[3:])]
    assert rest == resumed


# ---------------------------------------------------------------- ReturnHome


def test_returnhome_out_and_back_succeeds_when_the_view_matches():
    env = corridor_env(ReturnHomeTask(revisit_psnr_threshold=30.0))
    observation, _ = env.reset(seed=0)
    put_goal(env, 0.0, 0.75)
    assert int(observation["phase"]) == 0
    steps = play(env, [F, F])  # 0.75 -> 0.25 from the waypoint: within 0.3, the goal becomes home
    observation, reward, _, _, info = steps[-1]
    assert info["phase"] == 1 and int(observation["phase"]) == 1
    assert reward == pytest.approx(0.25 - 0.01 + 1.0)
    np.testing.assert_allclose(observation["goal"], [0.5, -1.0, 0.0], atol=1e-6)  # home is behind
    steps = play(env, [L] * 12 + [F, F])  # about turn, walk back: home but facing away
    observation, _, terminated, _, info = steps[-1]
    assert not terminated and info["distance_to_goal"] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(observation["home_heading"], [-1.0, 0.0], atol=1e-6)
    steps = play(env, [R] * 12)  # face the starting way: the frame equals the first one
    _, reward, terminated, _, info = steps[-1]
    assert terminated and info["success"] and info["revisit_psnr"] == 100.0
    assert reward == pytest.approx(-0.01 + 2.5)
    # 1.0 m walked, shortest 1.5 m (the waypoint itself was never reached, only its radius).
    assert info["path_length"] == pytest.approx(1.0) and info["spl"] == pytest.approx(1.0)


def test_returnhome_is_not_success_when_home_looks_different():
    env = corridor_env(ReturnHomeTask(revisit_psnr_threshold=30.0), max_episode_steps=30)
    env.reset(seed=0)
    put_goal(env, 0.0, 0.75)
    env.batch.first_frames[0] = 255 - env.batch.first_frames[0]  # as if the world forgot home
    steps = play(env, [F, F] + [L] * 12 + [F, F] + [R] * 12 + [Move.STAY] * 10)
    _, _, terminated, truncated, info = steps[-1]
    assert truncated and not terminated and not info["success"] and info["revisit_psnr"] < 30.0


def test_returnhome_waypoints_lie_on_the_move_lattice():
    task = ReturnHomeTask(min_steps=2, max_steps=5)
    env = corridor_env(task)
    for seed in range(10):
        env.reset(seed=seed)
        distance = math.hypot(*task.waypoints[0])
        bearing = math.degrees(math.atan2(*task.waypoints[0]))
        assert distance / 0.25 == pytest.approx(round(distance / 0.25)) and 2 <= round(distance / 0.25) <= 5
        assert bearing / 15.0 == pytest.approx(round(bearing / 15.0), abs=1e-6)


def test_returnhome_resumes_phase_from_a_saved_world(tmp_path):
    env = corridor_env(ReturnHomeTask())
    env.reset(seed=0)
    put_goal(env, 0.0, 0.75)
    play(env, [F, F])
    env.save_world(tmp_path / "world.safetensors")
    other = corridor_env(ReturnHomeTask())
    other.reset(seed=5)
    other.load_world(tmp_path / "world.safetensors")
    assert other.task.phase[0] == 1
    np.testing.assert_array_equal(other.task.waypoints, env.task.waypoints)
    a, b = env.step(L), other.step(L)
    assert a[1] == b[1] and np.array_equal(a[0]["goal"], b[0]["goal"])


# ---------------------------------------------------------------- registered ids on the default world


def test_every_task_is_registered():
    assert {"explore", "pointnav", "returnhome"} <= set(TASKS)


@pytest.mark.parametrize("env_id", ["Mirage/Explore-v0", "Mirage/PointNav-v0", "Mirage/ReturnHome-v0"])
def test_checkers_pass_on_every_registered_id(env_id):
    env = gym.make(env_id, max_episode_steps=20)
    sb3_check_env(env.unwrapped, warn=False)
    check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_declares_the_measures_it_reports(name):
    env = MirageEnv(task=name, image_size=16, max_episode_steps=3)
    env.reset(seed=0)
    reported = set()
    done = False
    while not done:
        _, _, terminated, truncated, info = env.step(Move.FORWARD)
        reported |= set(info) & (set(info) - {"memory_entries", "memory_bytes", "memory_hit", "collided",
                                              "path_length"})
        done = terminated or truncated
    declared = set(TASKS[name].measures)
    assert reported <= declared, f"{name} reports {sorted(reported - declared)} without declaring them"
    assert {m for m in declared if m != "revisit_psnr"} <= reported


def test_a_task_sees_a_read_only_view_and_serves_one_env():
    task = PointNavTask()
    env = MirageEnv(task=task, image_size=16)
    env.reset(seed=0)
    view = env.batch.view
    with pytest.raises(ValueError, match="read-only"):
        view.rigs[0, 0] = 5.0
    with pytest.raises(AttributeError, match="no 'world'"):
        view.world
    assert view.rigs.shape == (1, 6) and view.memory_entries_per_world().shape == (1,)
    with pytest.raises(ValueError, match="already serves another env"):
        MirageEnv(task=task, image_size=16)
    # By name, every env gets its own instance.
    a, b = MirageEnv(task="pointnav", image_size=16), MirageEnv(task="pointnav", image_size=16)
    assert a.task is not b.task
