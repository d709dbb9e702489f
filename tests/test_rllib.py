"""RLlib on Mirage worlds, and a world model served by a Ray actor (the ``ray`` extra).

Run in a venv with ``pip install -e ".[dev,ray]"`` (``ray[rllib]`` pins gymnasium 1.2.2,
so it has a venv of its own; ``.ci/run`` builds it). Elsewhere every test here is
skipped. One local Ray of 2 CPUs serves the whole module; configs are tiny (32x32
frames, short episodes, small batches) so the module runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[dev,ray]')")
pytest.importorskip("ray.rllib", reason="the ray extra is not installed (pip install -e '.[dev,ray]')")

pytestmark = pytest.mark.ray

import mirage_env  # noqa: E402,F401  (registers the ids)
from mirage_env.env import MirageEnv  # noqa: E402
from mirage_env.rllib import (MirageRLModule, NoEnvStepsError, env_steps,  # noqa: E402
                              learner_stats, policy_network, ppo_config, train)

SIZE = 32
TINY = {"train_batch_size": 128, "minibatch_size": 64, "num_epochs": 2, "model": {"cnn_dim": 32, "hiddens": [32]}}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ppo_on_pointnav_with_two_env_runners_collects_steps_and_its_loss_changes():
    config = ppo_config({"task": "pointnav", "image_size": SIZE, "max_episode_steps": 20}, num_env_runners=2,
                        seed=0, **TINY)
    algo, results = train(config, iterations=3)
    try:
        steps = [env_steps(r) for r in results]
        assert steps[0] > 0 and steps == sorted(steps) and steps[-1] > steps[0]
        losses = [learner_stats(r)["total_loss"] for r in results]
        assert all(np.isfinite(losses)) and len(set(losses)) == len(losses)
        runners = algo.env_runner_group.num_remote_env_runners()
        assert runners == 2
    finally:
        algo.stop()


def test_multi_agent_ppo_runs_an_iteration_with_a_shared_and_with_per_agent_policies():
    for shared in (True, False):
        config = ppo_config({"n_agents": 2, "task": "coverage", "image_size": SIZE, "max_episode_steps": 10},
                            multi_agent=True, shared_policy=shared, num_env_runners=1, seed=0, **TINY)
        algo, results = train(config, iterations=1)
        try:
            assert env_steps(results[0]) > 0
            trained = set(results[0]["learners"]) - {"__all_modules__"}
            assert trained == ({"shared"} if shared else {"camera_0", "camera_1"})
        finally:
            algo.stop()


def test_env_classes_uint8_images_and_dict_observations_work_directly():
    """The env class itself as RLlib's env, every observation key (depth holds inf for sky), no connector."""
    env_config = {"task": "returnhome", "image_size": SIZE, "max_episode_steps": 10,
                  "observations": ["rgb", "pose", "depth", "latent"], "backend_options": {"scene": "outdoor"}}
    config = ppo_config(env_config, num_env_runners=0, seed=0, **TINY).environment(MirageEnv,
                                                                                   env_config=env_config)
    algo, results = train(config, iterations=1)
    try:
        assert env_steps(results[0]) > 0
        assert np.isfinite(learner_stats(results[0])["total_loss"])
        module = algo.get_module()
        assert isinstance(module, MirageRLModule)
        assert module.observation_space["rgb"].dtype == np.uint8  # the image reached the model as uint8
        network = policy_network(algo)
        observation, _ = MirageEnv(**env_config).reset(seed=0)
        assert network.predict(observation)[0] in range(9)
    finally:
        algo.stop()


def test_rllibs_pettingzoo_wrapper_renders_the_team_and_passes_actions_through():
    from mirage_env.rllib import make_multi_agent_env

    env = make_multi_agent_env({"n_agents": 2, "image_size": SIZE, "render_mode": "rgb_array"})
    observations, _ = env.reset(seed=0)
    assert set(observations) == {"camera_0", "camera_1"} and observations["camera_0"]["rgb"].dtype == np.uint8
    assert env.render().shape == (SIZE, 2 * SIZE, 3)  # RLlib calls render(its render_mode)
    env.step({"camera_0": 1, "camera_1": 5})


def test_a_run_that_collects_no_env_steps_is_an_error():
    class Silent:
        def train(self):
            return {"env_runners": {"num_env_steps_sampled_lifetime": 0}}

    with pytest.raises(NoEnvStepsError, match="no env steps"):
        train(None, iterations=2, algo=Silent())


def play(env, actions) -> list[np.ndarray]:
    """The frames of ``actions`` (a new episode where one ends), as the env shows them."""
    frames = []
    for action in actions:
        observation, _, terminated, truncated, _ = env.step(int(action))
        frames.append(observation["rgb"])
        if terminated or truncated:
            frames.append(env.reset()[0]["rgb"])
    return frames


def test_a_world_served_by_a_ray_actor_is_bit_identical_to_a_local_one_across_save_and_resume(tmp_path):
    from mirage_env.backends.model_server import serve_world_model, server_stats

    handle = serve_world_model("rooms-test", image_size=SIZE, num_cpus=0)
    try:
        options = {"task": "pointnav", "image_size": SIZE, "max_episode_steps": 8}
        local = MirageEnv(**options)
        remote = MirageEnv(backend="remote", checkpoint="rooms-test", **options)
        first, then = np.random.default_rng(1).integers(0, 9, size=(2, 12))
        for env in (local, remote):
            env.reset(seed=3)
        np.testing.assert_array_equal(play(local, first), play(remote, first))
        remote.save_world(tmp_path / "served.safetensors")
        expected = play(remote, then)
        np.testing.assert_array_equal(play(local, then), expected)

        resumed = MirageEnv(backend="remote", checkpoint="rooms-test", **options)
        resumed.reset(seed=0)
        resumed.load_world(tmp_path / "served.safetensors")
        np.testing.assert_array_equal(play(resumed, then), expected)
        assert server_stats("rooms-test")["calls"]["generate"]["requests"] >= 36
    finally:
        ray.kill(handle)


def test_a_client_finds_a_restarted_server_by_name_and_its_world_goes_on_unchanged():
    from mirage_env.backends.model_server import serve_world_model

    handle = serve_world_model("rooms-restart", image_size=SIZE, num_cpus=0)
    options = {"task": "explore", "image_size": SIZE}
    remote, local = MirageEnv(backend="remote", checkpoint="rooms-restart", **options), MirageEnv(**options)
    remote.reset(seed=8), local.reset(seed=8)
    moves = [1, 5, 1, 1, 6, 1]
    np.testing.assert_array_equal(play(remote, moves[:3]), play(local, moves[:3]))
    ray.kill(handle)
    handle = serve_world_model("rooms-restart", image_size=SIZE, num_cpus=0)  # nothing of the worlds was in it
    try:
        np.testing.assert_array_equal(play(remote, moves[3:]), play(local, moves[3:]))
    finally:
        ray.kill(handle)


def test_env_runners_share_one_served_model_and_the_cli_trains_saves_and_evaluates(tmp_path):
    from mirage_env.backends.model_server import serve_world_model, server_stats
    from mirage_env.cli import main

    handle = serve_world_model("rooms-train", image_size=SIZE, num_cpus=0)
    try:
        out = tmp_path / "policy"
        code = main(["train", "--engine", "rllib", "--num-env-runners", "2", "--task", "pointnav",
                     "--image-size", str(SIZE), "--backend", "remote", "--checkpoint", "rooms-train",
                     "--timesteps", "200", "--n-steps", "64", "--num-envs", "1", "--batch-size", "64",
                     "--n-epochs", "1", "--eval-episodes", "2", "--out", str(out), "--json", str(tmp_path / "r.json"),
                     "--quiet"])
        assert code == 0
        results = json.loads((tmp_path / "r.json").read_text())
        assert results["engine"] == "rllib" and results["timesteps"] >= 200
        stats = server_stats("rooms-train")["calls"]["generate"]
        assert stats["requests"] >= 200 and stats["model_calls"] <= stats["requests"]
        # The saved network is evaluated as any trained policy (its settings name the served model).
        assert main(["evaluate", "--policy", str(out), "--episodes", "2", "--quiet"]) == 0
    finally:
        ray.kill(handle)
