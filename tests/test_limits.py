"""Episode limits reach the env however they are given; bad bounds and CLI arguments are refused up front."""

import gymnasium as gym
import numpy as np
import pytest

import mirage_env  # noqa: F401
from mirage_env.cli import main
from mirage_env.env import MirageEnv
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.vector import MirageVectorEnv


def steps_until_truncated(env, limit):
    env.reset(seed=0)
    for step in range(1, limit + 1):
        *_, terminated, truncated, _ = env.step(0)
        if truncated:
            return step
    return None


def test_gym_make_max_episode_steps_is_the_one_limit():
    assert gym.make("Mirage/Explore-v0", image_size=16).spec.max_episode_steps == 500
    longer = gym.make("Mirage/Explore-v0", image_size=16, max_episode_steps=520)
    assert longer.spec.max_episode_steps == 520
    assert steps_until_truncated(longer, 600) == 520  # not the env's own 500
    shorter = gym.make("Mirage/Explore-v0", image_size=16, max_episode_steps=7)
    assert steps_until_truncated(shorter, 20) == 7
    assert steps_until_truncated(MirageEnv(image_size=16, max_episode_steps=9), 20) == 9
    vector = gym.make_vec("Mirage/Explore-v0", num_envs=2, vectorization_mode="vector_entry_point", image_size=16)
    assert vector.batch.max_episode_steps == 500


def test_time_aware_observation_accepts_the_env():
    from gymnasium.wrappers import TimeAwareObservation

    env = TimeAwareObservation(gym.make("Mirage/Explore-v0", image_size=16), flatten=False)
    observation, _ = env.reset(seed=0)
    assert "time" in observation


@pytest.mark.parametrize("options, message", [
    ({"max_episode_steps": 2.5}, "max_episode_steps must be a positive integer"),
    ({"image_size": 100_000}, "too large"),
    ({"image_size": (64,)}, "image_size must be"),
])
def test_bad_bounds_are_refused_before_anything_is_built(options, message):
    for make in (MirageEnv, lambda **o: MirageVectorEnv(2, **o), lambda **o: MirageParallelEnv(2, **o)):
        with pytest.raises(ValueError, match=message):
            make(**options)


def test_reset_options_must_be_a_dict():
    for env in (MirageEnv(image_size=16), MirageVectorEnv(2, image_size=16), MirageParallelEnv(2, image_size=16)):
        with pytest.raises(ValueError, match="reset options must be a dict"):
            env.reset(seed=0, options="x")


def test_a_huge_discrete_action_is_refused_by_name():
    env = MirageEnv(image_size=16)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(2**63)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(np.uint64(2**63))


@pytest.mark.parametrize("argv, message", [
    (["rollout", "--steps", "-5"], "--steps: must be >= 1"),
    (["rollout", "--steps", "3", "--out", "video.avi"], "ends in .mp4 or .gif"),
    (["rollout", "--fps", "0"], "--fps: must be >= 1"),
    (["rollout", "--seed", "-1"], "--seed: must be >= 0"),
    (["rollout", "--save-world", __file__ + "/world.safetensors"], "is a file, not a folder"),
    (["eval", "consistency", "--episodes", "0"], "--episodes: must be >= 1"),
    (["train", "--timesteps", "-1"], "--timesteps: must be >= 1"),
    (["evaluate", "--episodes", "0"], "--episodes: must be >= 1"),
    (["rollout", "--max-episode-steps", "2.5"], "expected a whole number"),
])
def test_bad_cli_arguments_exit_non_zero_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_errors_are_one_line_and_a_rollout_is_one_episode_unless_asked(tmp_path, capsys):
    assert main(["rollout", "--env", "Nope-v0", "--steps", "2", "--out", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a Mirage env id" in err
    assert main(["rollout", "--steps", "12", "--image-size", "16", "--out", str(tmp_path / "b.mp4"), "--quiet",
                 "--max-episode-steps", "5"]) == 0
    assert "3 episodes" in capsys.readouterr().out
    assert main(["rollout", "--steps", "12", "--image-size", "16", "--out", str(tmp_path / "c.mp4"), "--quiet"]) == 0
    assert "1 episode" in capsys.readouterr().out
