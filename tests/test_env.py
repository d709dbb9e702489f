"""The single-agent env on the default procedural world."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import mirage_env  # noqa: F401
from mirage_env.agents.scripted import closed_loop_moves
from mirage_env.env import MirageEnv
from mirage_env.geometry import Move
from mirage_env.metrics import psnr


def make(**kwargs):
    return MirageEnv(**{"max_episode_steps": 50, **kwargs})


def run(env, seed, moves):
    observation, _ = env.reset(seed=seed)
    frames = [observation["rgb"]]
    rewards = []
    for move in moves:
        observation, reward, *_ = env.step(move)
        frames.append(observation["rgb"])
        rewards.append(reward)
    return np.stack(frames), np.array(rewards)


def test_spaces_and_observations():
    env = make(observations=("rgb", "pose", "depth", "latent"))
    observation, info = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    assert observation["rgb"].shape == (64, 64, 3) and observation["rgb"].dtype == np.uint8
    assert observation["depth"].shape == (8, 8) and observation["latent"].shape == (48, 8, 8)
    assert env.action_space == gym.spaces.Discrete(len(Move))
    observation, reward, terminated, truncated, info = env.step(Move.FORWARD)
    assert env.observation_space.contains(observation)
    assert {"memory_entries", "memory_bytes", "memory_hit"} <= set(info)
    assert observation["pose"][2] == pytest.approx(0.25)


def test_a_mapping_in_the_task_place_is_options_as_rllib_passes_env_config():
    from mirage_env.env import MirageEnv

    env = MirageEnv({"task": "pointnav", "image_size": 32}, max_episode_steps=7)
    assert env.config.task == "pointnav" and env.observation_space["rgb"].shape == (32, 32, 3)
    assert env.config.agent.max_episode_steps == 7
    with pytest.raises(ValueError, match="image_size"):
        MirageEnv({"imagesize": 32})


def test_checkers_pass_through_gym_make():
    env = gym.make("Mirage/Explore-v0", max_episode_steps=20)
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env, warn=False)
    continuous = make(action_type="continuous")
    check_env(continuous, skip_render_check=True)


def test_same_seed_same_episode_and_different_seed_differs():
    moves = [Move.FORWARD, Move.TURN_LEFT, Move.FORWARD, Move.STRAFE_RIGHT, Move.LOOK_UP]
    a_frames, a_rewards = run(make(), 3, moves)
    b_frames, b_rewards = run(make(), 3, moves)
    assert np.array_equal(a_frames, b_frames) and np.array_equal(a_rewards, b_rewards)
    c_frames, _ = run(make(), 4, moves)
    assert not np.array_equal(a_frames, c_frames)


def test_memory_makes_a_revisit_look_the_same():
    moves = closed_loop_moves(side_steps=3)
    results = {}
    for use_memory in (True, False):
        env = make(use_memory=use_memory, max_episode_steps=500)
        frames, _ = run(env, 0, moves)
        assert np.allclose(env.batch.rigs[0], env.batch.start_rigs[0], atol=1e-9), "the loop must close"
        results[use_memory] = psnr(frames[0], frames[-1])
    assert results[True] > 30.0
    assert results[False] < results[True] - 10.0


def test_explore_rewards_new_space_and_not_standing_still():
    env = make()
    env.reset(seed=0)
    _, first, *_ = env.step(Move.TURN_LEFT)
    assert first > 0
    rewards = [env.step(Move.STAY)[1] for _ in range(3)]
    assert rewards[-1] < first


def test_truncation_at_max_steps():
    env = make(max_episode_steps=3)
    env.reset(seed=0)
    outcomes = [env.step(Move.TURN_LEFT)[3] for _ in range(3)]
    assert outcomes == [False, False, True]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(Move.STAY)


def test_save_load_continues_bit_for_bit(tmp_path):
    env = make()
    run(env, 5, [Move.FORWARD, Move.TURN_RIGHT, Move.FORWARD])
    path = tmp_path / "world.safetensors"
    env.save_world(path)
    later = [Move.FORWARD, Move.TURN_LEFT, Move.LOOK_DOWN, Move.FORWARD]
    expected = [env.step(m) for m in later]
    resumed = make()
    resumed.reset(seed=123)  # a different world, replaced by the saved one
    resumed.load_world(path)
    for (obs_a, r_a, *_), move in zip(expected, later):
        obs_b, r_b, *_ = resumed.step(move)
        assert np.array_equal(obs_a["rgb"], obs_b["rgb"]) and np.array_equal(obs_a["pose"], obs_b["pose"])
        assert r_a == r_b


def test_bad_inputs_raise_clear_errors(tmp_path):
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(42)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(-1)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step("forward")
    continuous = make(action_type="continuous")
    continuous.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        continuous.step(np.array([np.nan, 0, 0, 0, 0, 0], dtype=np.float32))
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"colour": "red"})
    with pytest.raises(ValueError, match="unknown task"):
        MirageEnv(task="juggling")
    with pytest.raises(ValueError, match="unknown backend"):
        MirageEnv(backend="sora")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a world")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        env.load_world(broken)
