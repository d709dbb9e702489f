"""MirageParallelEnv: several cameras in one world with one memory."""

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test, parallel_seed_test

from mirage_env.agents.evaluate import torch_threads
from mirage_env.geometry import MotionConfig, Move
from mirage_env.metrics import psnr
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.tasks import CoverageTask, Task, TaskStep


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Two threads on a CPU another process is using run these small tensors many times slower.
    with torch_threads(1):
        yield


@pytest.mark.filterwarnings("ignore:ignoring unknown reset option")
@pytest.mark.parametrize("kwargs", [{}, {"task": "pointnav"}, {"shared_memory": False},
                                    {"action_type": "continuous"}])
def test_passes_the_pettingzoo_parallel_api_test(kwargs):
    # A short horizon makes every cycle of episodes end, so agents leave and the env is reset.
    parallel_api_test(MirageParallelEnv(n_agents=3, max_episode_steps=8, **kwargs), num_cycles=20)


def test_passes_the_pettingzoo_seed_test():
    parallel_seed_test(lambda: MirageParallelEnv(n_agents=3, task="pointnav", max_episode_steps=8), num_cycles=10)


def revisit_psnr(shared_memory: bool, seed: int) -> float:
    """A turns round to look behind the start, then turns back; B walks to A's spot and turns as A did.

    Returns the PSNR between what B sees there and what A saw from the same pose.
    Nobody saw the place at reset (it is behind both cameras), so only memory can
    carry A's view of it to B.
    """
    motion = MotionConfig()
    env = MirageParallelEnv(n_agents=2, shared_memory=shared_memory, max_episode_steps=100, motion=motion)
    env.reset(seed=seed)
    a_start, b_start = env.batch.rigs.copy()
    strafes = round((b_start[0] - a_start[0]) / motion.step_metres)  # B starts this many steps to A's right
    turns = round(180 / motion.turn_degrees)
    assert strafes >= 1 and turns * motion.turn_degrees == 180

    def step(a: Move, b: Move) -> dict:
        return env.step({"camera_0": int(a), "camera_1": int(b)})[0]

    for _ in range(turns):
        observations = step(Move.TURN_LEFT, Move.STAY)
    seen, pose = observations["camera_0"]["rgb"], observations["camera_0"]["pose"]
    plan_a = [Move.TURN_RIGHT] * turns + [Move.STAY] * strafes  # A faces the front again: the place leaves its view
    plan_b = [Move.STRAFE_LEFT] * strafes + [Move.TURN_LEFT] * turns
    for a, b in zip(plan_a, plan_b):
        observations = step(a, b)
    np.testing.assert_array_equal(observations["camera_1"]["pose"], pose)  # B stands exactly where A stood
    assert not np.array_equal(observations["camera_0"]["pose"], pose)
    return psnr(observations["camera_1"]["rgb"], seen)


def test_what_one_agent_saw_another_finds_the_same_only_with_a_shared_memory():
    # Measured on seeds 0-11: shared 32.6-76 dB (median 38), separate memories 15.6-29.7 dB (median 21).
    seeds = (0, 1, 2)
    shared = np.array([revisit_psnr(True, seed) for seed in seeds])
    separate = np.array([revisit_psnr(False, seed) for seed in seeds])
    assert (shared >= 30.0).all(), shared
    assert (separate <= 27.0).all(), separate
    assert shared.mean() - separate.mean() >= 10.0, (shared, separate)


def test_every_step_is_one_generator_call_for_all_agents():
    env = MirageParallelEnv(n_agents=4)
    env.reset(seed=0)
    calls = []
    generate = env.world.model.generate
    env.world.model.generate = lambda request: calls.append(tuple(request.poses.shape)) or generate(request)
    for _ in range(3):
        env.step({agent: int(Move.TURN_LEFT) for agent in env.agents})
    assert calls == [(1, 4, 4, 4)] * 3  # one world, four views


def test_coverage_pays_every_agent_the_team_gain_and_explore_splits_it():
    rewards = {}
    for task in ("coverage", "explore"):
        env = MirageParallelEnv(n_agents=3, task=task)
        env.reset(seed=4)
        entries = env.batch.world.memory.entries_per_world().item()
        _, reward, _, _, infos = env.step({"camera_0": 5, "camera_1": 0, "camera_2": 6})
        gained = env.batch.world.memory.entries_per_world().item() - entries
        assert gained > 0
        rewards[task] = np.array(list(reward.values()))
        assert np.allclose(rewards[task], rewards[task][0])
        assert len({info["memory_entries"] for info in infos.values()}) == 1  # one memory for the team
    pixels = env.batch.latent_pixels_per_frame
    np.testing.assert_allclose(rewards["coverage"], gained / pixels)
    np.testing.assert_allclose(rewards["explore"], gained / pixels / 3)


def test_coverage_target_ends_the_episode_for_the_whole_team():
    with pytest.raises(ValueError, match="target_entries"):
        CoverageTask(target_entries=0)
    env = MirageParallelEnv(n_agents=2, task=CoverageTask(target_entries=1))
    env.reset(seed=0)
    _, _, terminated, truncated, infos = env.step({"camera_0": 5, "camera_1": 6})
    assert all(terminated.values()) and not any(truncated.values())
    assert all(info["success"] and info["team_coverage"] >= 1 for info in infos.values())
    assert env.agents == []
    with pytest.raises(RuntimeError, match="reset"):
        env.step({})


class EndsFirstAgentEarly(Task):
    """Terminates camera_0 on its second step; the others never terminate."""

    name = "ends_first_agent_early"

    def step(self, batch, agents):
        terminated = (agents == 0) & (batch.steps[agents] >= 2)
        return TaskStep(np.zeros(len(agents)), terminated, [{} for _ in agents])


def test_an_agent_whose_episode_ended_leaves_and_its_camera_stands_still():
    env = MirageParallelEnv(n_agents=3, task=EndsFirstAgentEarly(), max_episode_steps=50)
    env.reset(seed=0)
    env.step({agent: 5 for agent in env.agents})
    _, _, terminated, _, _ = env.step({agent: 5 for agent in env.agents})
    assert terminated == {"camera_0": True, "camera_1": False, "camera_2": False}
    assert env.agents == ["camera_1", "camera_2"]
    parked = env.batch.rigs[0].copy()
    observations, rewards, terminated, truncated, infos = env.step({"camera_1": 1, "camera_2": 5})
    for answer in (observations, rewards, terminated, truncated, infos):
        assert set(answer) == {"camera_1", "camera_2"}
    np.testing.assert_array_equal(env.batch.rigs[0], parked)
    with pytest.raises(ValueError, match="camera_0"):
        env.step({"camera_0": 1, "camera_1": 1, "camera_2": 1})


@pytest.mark.parametrize("actions, message", [
    ({"camera_0": 0}, "missing \\['camera_1'\\]"),
    ({"camera_0": 0, "camera_1": 9}, r"camera_1 got action\(s\) \[9\]"),
    ({"camera_0": 0, "camera_1": float("nan")}, r"camera_1 got action\(s\) \[nan\]"),
    ({"camera_0": 0, "camera_1": 0, "camera_7": 0}, "camera_7"),
    ([0, 0], "dict"),
])
def test_bad_actions_raise_value_errors_naming_the_agent(actions, message):
    env = MirageParallelEnv(n_agents=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        env.step(actions)


def test_spaces_render_and_argument_checks():
    env = MirageParallelEnv(n_agents=3, render_mode="rgb_array", image_size=32)
    observations, infos = env.reset(seed=1)
    assert env.agents == env.possible_agents == ["camera_0", "camera_1", "camera_2"]
    for agent in env.agents:
        assert env.observation_space(agent).contains(observations[agent])
    assert env.action_space("camera_0") is not env.action_space("camera_1")  # seeded independently
    assert env.render().shape == (32, 96, 3)
    poses = np.stack([observations[agent]["pose"] for agent in env.agents])
    np.testing.assert_allclose(poses[:, 0], [-0.5, 0.0, 0.5])  # side by side, start_spread apart
    with pytest.raises(ValueError, match="n_agents"):
        MirageParallelEnv(n_agents=0)
    with pytest.raises(ValueError, match="unknown agent"):
        env.action_space("camera_9")
