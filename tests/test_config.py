"""One way to build an env: EnvConfig, its flat options, its CLI flags, the one action check."""

import argparse
import json

import gymnasium as gym
import numpy as np
import pytest

import mirage_env  # noqa: F401
from mirage_env.actions import check_actions
from mirage_env.config import AgentConfig, EnvConfig, MemoryConfig, WorldConfig, add_env_arguments, options_from_args
from mirage_env.env import MirageEnv
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.vector import MirageVectorEnv


@pytest.mark.parametrize("make", [
    lambda **o: MirageEnv(**o),
    lambda **o: MirageVectorEnv(2, **o),
    lambda **o: MirageParallelEnv(2, **o),
    lambda **o: gym.make("Mirage/Explore-v0", **o),
])
def test_a_misspelt_option_names_the_closest_valid_one_in_every_env(make):
    with pytest.raises(ValueError, match="did you mean 'image_size'"):
        make(imagesize=32)
    with pytest.raises(ValueError, match="did you mean 'memory_horizon'"):
        make(memory_horizn=2)


def test_flat_options_land_in_their_sections_and_round_trip():
    config = EnvConfig.from_options({"task": "pointnav", "image_size": 32, "memory_horizon": 2, "max_episode_steps": 7,
                                     "observations": ["rgb", "depth"], "backend_options": {"scene": "outdoor"}})
    assert config.world.image_size == 32 and config.world.backend_options == {"scene": "outdoor"}
    assert config.world.memory.memory_horizon == 2 and config.world.memory.memory_kwargs() == {"horizon": 2}
    assert config.agent.max_episode_steps == 7 and config.agent.observations == ("rgb", "depth")
    again = EnvConfig.from_options(json.loads(config.to_json()))
    assert again == config


def test_a_config_and_keywords_build_the_same_env():
    config = EnvConfig(task="explore", world=WorldConfig(image_size=32, memory=MemoryConfig(memory_horizon=1)),
                       agent=AgentConfig(max_episode_steps=5))
    a = MirageEnv(config=config)
    b = MirageEnv("explore", image_size=32, memory_horizon=1, max_episode_steps=5)
    oa, _ = a.reset(seed=3)
    ob, _ = b.reset(seed=3)
    for _ in range(3):
        oa, *_ = a.step(1)
        ob, *_ = b.step(1)
    assert np.array_equal(oa["rgb"], ob["rgb"])
    assert a.batch.max_episode_steps == 5 and a.world.memory.horizon == 1
    # Keywords override the config they are given with.
    assert MirageEnv(config=config, image_size=16).observation_space["rgb"].shape == (16, 16, 3)


@pytest.mark.parametrize("options, message", [
    ({"max_episode_steps": 2.5}, "max_episode_steps must be a positive integer"),
    ({"max_episode_steps": 0}, "max_episode_steps must be a positive integer"),
    ({"image_size": (64,)}, "image_size must be"),
    ({"action_type": "discreet"}, "did you mean 'discrete'"),
    ({"observations": ("rgb", "colour")}, "observations must be"),
    ({"backend_options": {"scen": "indoor"}}, "did you mean 'scene'"),
    ({"memory_options": {"brick_sise": 4}}, "did you mean 'brick_size'"),
    ({"task": "pointnav", "task_options": {"max_distanse": 1.0}}, "did you mean 'max_distance'"),
    ({"motion": {"step_meters": 0.5}}, "did you mean 'step_metres'"),
    ({"collision_distance": -1.0}, "collision_distance must be"),
    ({"voxel_size": 0}, "voxel_size must be"),
    ({"render_mode": "human"}, "render_mode must be"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        EnvConfig.from_options(options)


def test_cli_flags_come_from_the_config_fields():
    parser = argparse.ArgumentParser()
    add_env_arguments(parser, defaults={"max_episode_steps": 50})
    args = parser.parse_args(["--image-size", "32", "--no-memory", "--observations", "rgb,depth",
                              "--collision-distance", "0.5", "--memory-horizon", "3"])
    options = options_from_args(args)
    assert options["image_size"] == 32 and options["use_memory"] is False and options["max_episode_steps"] == 50
    assert options["observations"] == ("rgb", "depth") and options["collision_distance"] == 0.5
    config = EnvConfig.from_options(options)
    assert config.world.memory.memory_horizon == 3 and config.agent.collision_distance == 0.5


def test_one_action_check_serves_every_env_and_names_the_agent():
    assert check_actions([3, 4.0], "discrete", 2).tolist() == [3, 4]
    with pytest.raises(ValueError, match=r"sub-environment\(s\) \[1\]"):
        check_actions([0, 9], "discrete", 2, "sub-environment")
    with pytest.raises(ValueError, match="shape"):
        check_actions(np.zeros((2, 3)), "continuous", 1)  # never reshaped to fit
    with pytest.raises(ValueError, match="camera_1 got NaN"):
        check_actions([np.zeros(6), np.full(6, np.nan)], "continuous", 2, ["camera_0", "camera_1"])
    env = MirageEnv(action_type="continuous", image_size=16)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 2)))


def test_a_new_option_reaches_every_env_the_cli_and_training_from_one_field():
    from mirage_env.agents import evaluate, train
    from mirage_env.cli import build_parser

    assert MirageEnv(memory_write="all", image_size=16).world.write == "all"
    assert MirageVectorEnv(2, memory_write="all", image_size=16).world.write == "all"
    assert MirageParallelEnv(2, memory_write="all", image_size=16).world.write == "all"
    assert gym.make("Mirage/Explore-v0", memory_write="all", image_size=16).unwrapped.world.write == "all"
    args = build_parser().parse_args(["rollout", "--memory-write", "all"])
    assert options_from_args(args)["memory_write"] == "all"
    for module in (train, evaluate):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        assert options_from_args(parser.parse_args(["--memory-write", "all"]))["memory_write"] == "all"
    assert json.loads(EnvConfig.from_options({"memory_write": "all"}).to_json())["memory_write"] == "all"


def test_any_image_size_shows_the_centre_of_the_next_size_the_model_makes():
    from gymnasium.utils.env_checker import check_env

    check_env(gym.make("Mirage/Explore-v0", image_size=84).unwrapped)
    asked, made = MirageEnv(image_size=84), MirageEnv(image_size=88)
    assert asked.world.camera.width == 88 and asked.observation_space["rgb"].shape == (84, 84, 3)
    a, _ = asked.reset(seed=5)
    b, _ = made.reset(seed=5)
    for move in (1, 5, 1, 3):
        a, *_ = asked.step(move)
        b, *_ = made.step(move)
        assert np.array_equal(a["rgb"], b["rgb"][2:86, 2:86])
    assert asked.step_frames().shape[1:] == (84, 84, 3)
    assert MirageVectorEnv(2, image_size=(84, 100)).observation_space["rgb"].shape == (2, 84, 100, 3)
