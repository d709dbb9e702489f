"""MirageVectorEnv: N worlds in one batched call behave exactly like N single envs."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import mirage_env  # noqa: F401  (registers the ids)
from mirage_env.agents.evaluate import make_env, make_vector_env, torch_threads
from mirage_env.env import MirageEnv
from mirage_env.tasks import PointNavTask
from mirage_env.vector import MirageVectorEnv


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Two threads on a CPU another process is using run these small tensors many times slower.
    with torch_threads(1):
        yield


def assert_same_observation(batched: dict, single: dict, where: str) -> None:
    assert batched.keys() == single.keys(), where
    for key in single:
        np.testing.assert_array_equal(batched[key], single[key], err_msg=f"{key} differs {where}")


def step_side_by_side(venv, envs, seeds, steps: int) -> int:
    """Step ``venv`` and its single-env twins with the same random actions; assert they agree on every
    observation, reward, end, final observation and info (all but the shared memory's bytes).
    Returns the number of episodes that ended."""
    observations, _ = venv.reset(seed=seeds)
    for i, env in enumerate(envs):
        assert_same_observation({k: v[i] for k, v in observations.items()}, env.reset(seed=seeds[i])[0], f"reset {i}")
    rng = np.random.default_rng(0)
    ended = 0
    for t in range(steps):
        actions = rng.integers(0, venv.single_action_space.n, len(envs))
        observations, rewards, terminated, truncated, infos = venv.step(actions)
        for i, env in enumerate(envs):
            observation, reward, term, trunc, info = env.step(int(actions[i]))
            assert (rewards[i], terminated[i], truncated[i]) == (reward, term, trunc), f"step {t}, env {i}"
            if term or trunc:
                # SAME_STEP: the ended episode's last observation is in info, the new episode's first is returned.
                assert infos["_final_obs"][i]
                assert_same_observation(infos["final_obs"][i], observation, f"at the end of step {t}, env {i}")
                for key, value in info.items():
                    if key != "memory_bytes":  # the batched memory's bytes, all worlds together
                        assert infos["final_info"][key][i] == value, f"{key} at the end of step {t}, env {i}"
                observation, info = env.reset()
                ended += 1
            else:
                assert not infos.get("_final_obs", np.zeros(len(envs), bool))[i]
            assert_same_observation({k: v[i] for k, v in observations.items()}, observation, f"after step {t}, env {i}")
            for key, value in info.items():
                if key != "memory_bytes":
                    assert infos[key][i] == value, f"info {key!r} after step {t}, env {i}"
    return ended


@pytest.mark.parametrize("task", ["pointnav", "explore"])
def test_four_batched_worlds_equal_four_single_envs_through_an_autoreset(task):
    num_envs, horizon, steps = 4, 6, 20
    venv = MirageVectorEnv(num_envs, task=task, max_episode_steps=horizon)
    envs = [MirageEnv(task=task, max_episode_steps=horizon) for _ in range(num_envs)]
    assert step_side_by_side(venv, envs, [3, 11, 5, 42], steps) >= num_envs * (steps // horizon)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["explore", "pointnav", "returnhome"])
def test_eight_batched_worlds_equal_eight_single_envs_for_400_steps_and_many_episodes(task):
    """Bit for bit: frames, and the depth and latents under them, rewards, ends and infos.

    16x16 frames keep it quick; frames alone rarely show a rounding difference at that
    size, but depth and latents show one at once (batch-size-dependent rounding of the
    ray directions made sub-environments drift from single envs within a few steps).
    """
    num_envs, horizon, steps, seed = 8, 60, 400, 100
    settings = {"task": task, "image_size": 16, "max_episode_steps": horizon,
                "observations": ("rgb", "pose", "depth", "latent")}
    venv = MirageVectorEnv(num_envs, **settings)
    envs = [MirageEnv(**settings) for _ in range(num_envs)]
    seeds = [seed + i for i in range(num_envs)]
    assert step_side_by_side(venv, envs, seeds, steps) >= num_envs * (steps // horizon)


def test_a_step_is_one_generator_call_for_all_worlds():
    venv = MirageVectorEnv(5, max_episode_steps=2)
    venv.reset(seed=0)
    calls = []
    generate = venv.world.model.generate
    venv.world.model.generate = lambda request: calls.append(tuple(request.poses.shape)) or generate(request)
    for _ in range(4):  # with two autoresets, which restart worlds without generating a step
        venv.step(np.full(5, 5))
    assert calls == [(5, 1, 4, 4)] * 4


def test_make_vec_returns_the_batched_env_with_its_kwargs():
    envs = gym.make_vec("Mirage/PointNav-v0", num_envs=3, vectorization_mode="vector_entry_point",
                        max_episode_steps=2, task=PointNavTask(min_distance=0.75, max_distance=1.5))
    assert isinstance(envs, MirageVectorEnv) and envs.num_envs == 3
    assert envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert envs.single_action_space == gym.spaces.Discrete(9)
    assert envs.action_space == gym.spaces.MultiDiscrete([9, 9, 9])
    observations, infos = envs.reset(seed=0)
    assert envs.observation_space.contains(observations)
    assert observations["goal"].shape == (3, 3) and infos["_memory_entries"].all()
    _, _, _, truncated, _ = envs.step(np.zeros(3, dtype=np.int64))
    assert not truncated.any()
    observations, rewards, terminated, truncated, infos = envs.step(np.zeros(3, dtype=np.int64))
    assert truncated.all() and not terminated.any() and infos["_final_info"].all()
    assert envs.observation_space.contains(observations) and rewards.dtype == np.float64
    assert set(infos["final_info"]) >= {"success", "spl", "distance_to_goal", "path_length"}


def test_a_seed_draws_the_same_worlds_again_and_different_seeds_differ():
    venv = MirageVectorEnv(2)
    first = venv.reset(seed=5)[0]["rgb"]
    again = venv.reset(seed=5)[0]["rgb"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])  # env 1 is seeded 6, not 5
    np.testing.assert_array_equal(venv.reset(seed=[6, 5])[0]["rgb"], first[::-1])


def test_reset_mask_restarts_only_the_chosen_worlds():
    venv = MirageVectorEnv(3, max_episode_steps=50)
    venv.reset(seed=0)
    for _ in range(3):
        moved, *_ = venv.step(np.full(3, 5))  # turn left: every view changes
    observations, infos = venv.reset(seed=[None, 1, None], options={"reset_mask": np.array([False, True, False])})
    np.testing.assert_array_equal(observations["rgb"][[0, 2]], moved["rgb"][[0, 2]])
    np.testing.assert_array_equal(observations["rgb"][1], MirageEnv().reset(seed=1)[0]["rgb"])
    assert infos["_memory_entries"].tolist() == [False, True, False]


def test_a_partial_reset_leaves_the_previous_steps_arrays_alone():
    """The env and the World keep a step's frames, latents, depth (and the World its tail) as views of that
    step's arrays (no copy); resetting some worlds then writes into copies, never into the step's arrays."""
    venv = MirageVectorEnv(3, max_episode_steps=50, observations=("rgb", "latent", "depth"))
    venv.reset(seed=0)
    venv.step(np.full(3, 5))
    step = venv.batch.last_step
    held = [step.frames.clone(), step.latents.clone(), step.depth.clone()]
    observations, _ = venv.reset(seed=[None, 1, None], options={"reset_mask": np.array([False, True, False])})
    for before, after in zip(held, (step.frames, step.latents, step.depth)):
        assert torch.equal(before, after)
    fresh = MirageEnv(observations=("rgb", "latent", "depth")).reset(seed=1)[0]
    for key in ("rgb", "latent", "depth"):
        np.testing.assert_array_equal(observations[key][1], fresh[key])
        np.testing.assert_array_equal(getattr(venv.batch, {"rgb": "last_frames", "latent": "last_latents",
                                                            "depth": "last_depth"}[key])[1], fresh[key])


@pytest.mark.parametrize("actions, message", [
    (np.zeros(2, dtype=np.int64), "shape (3,)"),
    (np.zeros((3, 1), dtype=np.int64), "shape (3,)"),
    (np.array([0, 9, 1]), "[9]"),
    (np.array([0, -1, 1]), "[-1]"),
    (np.array([0.0, np.nan, 1.0]), "nan"),
    (np.array([0.0, 1.5, 1.0]), "1.5"),
    (np.array(["a", "b", "c"]), "integers"),
])
def test_bad_discrete_actions_raise_value_errors_naming_the_problem(actions, message):
    venv = MirageVectorEnv(3)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match="action") as error:
        venv.step(actions)
    assert message in str(error.value)


@pytest.mark.parametrize("actions, message", [
    (np.zeros((3, 6)), r"shape \(2, 6\)"),
    (np.zeros(6), r"shape \(2, 6\)"),
    (np.array([[0, 0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0, 0]]), r"sub-environment\(s\) \[1\].*outside Box"),
    (np.array([[0, 0, 0, 0, 0, 0], [np.nan, 0, 0, 0, 0, 0]]), r"sub-environment\(s\) \[1\].*NaN"),
])
def test_bad_continuous_actions_raise_value_errors(actions, message):
    venv = MirageVectorEnv(2, action_type="continuous")
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=message):
        venv.step(actions)


def test_misuse_is_reported_clearly():
    with pytest.raises(ValueError, match="num_envs"):
        MirageVectorEnv(0)
    venv = MirageVectorEnv(2)
    with pytest.raises(RuntimeError, match="reset"):
        venv.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="one entry per sub-environment"):
        venv.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown reset option"):
        venv.reset(seed=0, options={"colour": "red"})


def test_sb3_adapter_gives_the_same_data_as_a_dummy_vec_env_of_single_envs():
    from stable_baselines3.common.vec_env import DummyVecEnv

    from mirage_env.agents.sb3 import MirageSB3VecEnv

    settings = {"task": "pointnav", "max_episode_steps": 5}
    native = MirageSB3VecEnv(make_vector_env(3, **settings))
    dummy = DummyVecEnv([lambda: make_env(**settings) for _ in range(3)])
    native.seed(7)
    dummy.seed(7)
    assert_same_observation(native.reset(), dummy.reset(), "at reset")
    rng = np.random.default_rng(1)
    ended = 0
    for t in range(12):
        actions = rng.integers(0, 9, 3)
        observations, rewards, dones, infos = native.step(actions)
        expected_observations, expected_rewards, expected_dones, expected_infos = dummy.step(actions)
        assert_same_observation(observations, expected_observations, f"after step {t}")
        np.testing.assert_array_equal(rewards, expected_rewards)
        np.testing.assert_array_equal(dones, expected_dones)
        for info, expected in zip(infos, expected_infos):
            assert info["TimeLimit.truncated"] == expected["TimeLimit.truncated"]
            assert info["success"] == expected["success"] and info["spl"] == expected["spl"]
            assert ("terminal_observation" in info) == ("terminal_observation" in expected)
            if "terminal_observation" in info:
                assert_same_observation(info["terminal_observation"], expected["terminal_observation"], f"step {t}")
                ended += 1
    assert ended == 6  # every env ended twice (steps 5 and 10)


def test_ppo_learns_on_the_batched_env_through_the_adapter():
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    from mirage_env.agents.sb3 import MirageSB3VecEnv

    venv = VecMonitor(MirageSB3VecEnv(make_vector_env(4, task="pointnav", max_episode_steps=16)),
                      info_keywords=("success",))
    model = PPO("MultiInputPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, device="cpu", seed=0,
                policy_kwargs={"net_arch": [32], "features_extractor_kwargs": {"cnn_output_dim": 32}})
    model.learn(128)
    assert model.num_timesteps == 128
    episodes = list(model.ep_info_buffer)
    assert len(episodes) == 8 and all(e["l"] == 16 and "success" in e for e in episodes)


@pytest.mark.parametrize("kind", ["native", "dummy"])
@pytest.mark.parametrize("task", ["explore", "pointnav"])
def test_train_builds_monitored_vec_envs_for_tasks_with_and_without_success(kind, task):
    from mirage_env.agents.train import build_vec_env

    settings = {"task": task, "task_options": {}, "image_size": 32, "observations": ["rgb", "pose"],
                "max_episode_steps": 2}
    venv = build_vec_env(settings, num_envs=2, seed=0, kind=kind)
    venv.reset()
    venv.step(np.zeros(2, dtype=np.int64))
    _, _, dones, infos = venv.step(np.zeros(2, dtype=np.int64))
    assert dones.all() and all(info["episode"]["l"] == 2 for info in infos)
    assert all(("success" in info["episode"]) == (task == "pointnav") for info in infos)


def test_infos_built_a_key_at_a_time_are_what_gymnasium_builds_an_entry_at_a_time():
    from mirage_env.vector import _batched_infos

    envs = MirageVectorEnv(3, image_size=32)
    infos = [{"memory_entries": 5 * i, "memory_hit": 0.25 * i, "collided": i == 1, "coverage": np.int64(i)}
             for i in range(3)]
    expected: dict = {}
    for i, info in enumerate(infos):
        expected = envs._add_info(expected, info, i)
    batched = _batched_infos(infos)
    assert list(batched) == list(expected)
    for key in expected:
        assert batched[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(batched[key], expected[key])
    assert _batched_infos([{"a": 1}, {"b": 2}, {"a": 3}]) is None  # different keys: gymnasium's loop
    assert _batched_infos([{"a": {"nested": 1}}] * 3) is None
