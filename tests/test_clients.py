"""The env under the clients users bring: vector modes, pickle, PettingZoo's tests, SuperSuit, wrappers."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest

import mirage_env  # noqa: F401  (registers the ids)
from mirage_env.env import MirageEnv
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.vector import MirageVectorEnv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a hang fails the test after ``timeout`` instead of hanging it."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s (a deadlock?)")


# ---------------------------------------------------------------------- vector modes and fork safety


def test_make_vec_async_under_the_default_fork_context_does_not_hang_after_torch_ran_in_the_parent():
    result = run_python("""
        import multiprocessing, torch, gymnasium as gym, mirage_env
        assert multiprocessing.get_start_method() == "fork"
        torch.ones(256, 256) @ torch.ones(256, 256)  # starts torch's thread pool before the fork
        envs = gym.make_vec("Mirage/Explore-v0", num_envs=2, vectorization_mode="async")
        observations, infos = envs.reset(seed=0)
        for _ in range(3):
            observations, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        assert observations["rgb"].shape == (2, 64, 64, 3)
        envs.close()
        print("stepped")
    """, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stepped" in result.stdout


@pytest.mark.parametrize("mode", ["sync", "vector_entry_point"])
def test_make_vec_steps_and_resets_in_process_modes(mode):
    envs = gym.make_vec("Mirage/Explore-v0", num_envs=2, vectorization_mode=mode)
    observations, _ = envs.reset(seed=0)
    assert observations["rgb"].shape == (2, 64, 64, 3)
    for _ in range(2):
        observations, rewards, terminated, truncated, _ = envs.step(envs.action_space.sample())
    assert rewards.shape == (2,)
    envs.reset(seed=1)
    envs.close()


def _threads_in_a_spawned_env_worker(queue) -> None:
    import torch

    from mirage_env.env import MirageEnv

    MirageEnv()
    queue.put(torch.get_num_threads())


def test_an_env_built_in_a_spawned_worker_uses_one_torch_thread():
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_threads_in_a_spawned_env_worker, args=(queue,))
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        process.start()
        threads = queue.get(timeout=120)
    finally:
        process.join(timeout=30)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    assert threads == 1


def test_a_forked_child_is_single_threaded_in_torch():
    result = run_python("""
        import os, torch, mirage_env
        torch.ones(64, 64) @ torch.ones(64, 64)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if torch.get_num_threads() == 1 else 3)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
    """, timeout=60)
    assert "child exit 0" in result.stdout, result.stderr[-2000:]


# ---------------------------------------------------------------------- pickle


def _step_all(env, actions):
    return [env.step(action)[0]["rgb"].copy() for action in actions]


def test_a_pickled_mirage_env_steps_as_the_original():
    env = MirageEnv()
    env.reset(seed=3)
    env.step(1)
    twin = pickle.loads(pickle.dumps(env))
    actions = [1, 5, 1, 2, 6]
    for a, b in zip(_step_all(env, actions), _step_all(twin, actions)):
        np.testing.assert_array_equal(a, b)


def test_a_pickled_vector_env_steps_as_the_original():
    envs = MirageVectorEnv(num_envs=2)
    envs.reset(seed=3)
    twin = pickle.loads(pickle.dumps(envs))
    for action in ([1, 5], [1, 1], [6, 2]):
        a, b = envs.step(np.array(action))[0], twin.step(np.array(action))[0]
        np.testing.assert_array_equal(a["rgb"], b["rgb"])


def test_a_pickled_parallel_env_steps_as_the_original():
    env = MirageParallelEnv(n_agents=2)
    env.reset(seed=3)
    twin = pickle.loads(pickle.dumps(env))
    for move in (1, 5, 1):
        actions = {agent: move for agent in env.agents}
        a, b = env.step(actions)[0], twin.step(actions)[0]
        for agent in a:
            np.testing.assert_array_equal(a[agent]["rgb"], b[agent]["rgb"])


def test_a_pickled_env_has_a_thread_guard_of_its_own():
    env = MirageEnv()
    twin = pickle.loads(pickle.dumps(env))
    assert twin._exclusive is not env._exclusive
    with twin._exclusive:  # the restored lock works
        twin.reset(seed=0)


# ---------------------------------------------------------------------- PettingZoo's own tests


def test_pettingzoo_parallel_api_test_passes_without_warnings():
    from pettingzoo.test import parallel_api_test

    import warnings

    from mirage_env import multi_agent

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ignored reset option used to warn here
        parallel_api_test(multi_agent.parallel_env(), num_cycles=20)


def test_pettingzoo_seed_test_passes():
    from pettingzoo.test import parallel_seed_test

    from mirage_env import multi_agent

    parallel_seed_test(multi_agent.parallel_env, num_cycles=10)


def test_pettingzoo_max_cycles_test_passes_with_max_cycles_as_the_horizon():
    from pettingzoo.test import max_cycles_test

    from mirage_env import multi_agent

    max_cycles_test(multi_agent)
    assert multi_agent.parallel_env(max_cycles=7).config.agent.max_episode_steps == 7
    with pytest.raises(ValueError, match="max_cycles"):
        multi_agent.parallel_env(max_cycles=7, max_episode_steps=8)


def test_pettingzoo_render_test_passes_headless(monkeypatch):
    from pettingzoo.test import render_test

    from mirage_env import multi_agent

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.warns(UserWarning, match="no display"):
        render_test(multi_agent.env)


def test_pettingzoo_state_test_passes_and_the_state_is_the_shared_map():
    from pettingzoo.test import state_test

    from mirage_env import multi_agent

    state_test(multi_agent.env(), multi_agent.parallel_env())
    env = multi_agent.parallel_env(n_agents=3)
    env.reset(seed=0)
    state = env.state()
    assert state.shape == (64, 64, 3) and env.state_space.contains(state)
    separate = multi_agent.parallel_env(n_agents=2, shared_memory=False)
    separate.reset(seed=0)
    assert separate.state().shape == (64, 128, 3) == separate.state_space.shape


def test_raw_env_and_env_are_the_aec_forms():
    from pettingzoo import AECEnv

    from mirage_env import multi_agent

    for make in (multi_agent.env, multi_agent.raw_env):
        aec = make(n_agents=2)
        assert isinstance(aec, AECEnv)
        aec.reset(seed=0)
        assert aec.agent_selection == "camera_0"


# ---------------------------------------------------------------------- SuperSuit


def test_supersuit_concat_vec_envs_with_two_processes_steps():
    ss = pytest.importorskip("supersuit")
    from mirage_env import multi_agent

    vec = ss.concat_vec_envs_v1(ss.pettingzoo_env_to_vec_env_v1(multi_agent.parallel_env(n_agents=2)), 2,
                                num_cpus=2, base_class="gymnasium")
    try:
        observations, _ = vec.reset(seed=0)
        assert observations["rgb"].shape == (4, 64, 64, 3)
        for _ in range(2):
            observations, rewards, terminated, truncated, _ = vec.step(
                np.array([vec.action_space.sample() for _ in range(vec.num_envs)]))
        assert rewards.shape == (4,)
    finally:
        vec.close()


# ---------------------------------------------------------------------- the top-down map


def test_render_map_puts_the_map_beside_the_frame_and_the_default_render_is_unchanged():
    plain = gym.make("Mirage/PointNav-v0", render_mode="rgb_array")
    mapped = gym.make("Mirage/PointNav-v0", render_mode="rgb_array", render_map=True)
    for env in (plain, mapped):
        env.reset(seed=0)
        for action in (1, 1, 5, 1):
            env.step(action)
    frame, both = plain.render(), mapped.render()
    assert frame.shape == (64, 64, 3)
    assert both.shape == (64, 128, 3) and both.dtype == np.uint8
    np.testing.assert_array_equal(both[:, :64], frame)


def test_the_map_grows_as_the_world_is_seen_and_shows_the_agent_and_the_goal():
    from mirage_env.topdown import GOAL_COLOUR, UNSEEN

    env = MirageEnv(task="pointnav")
    env.reset(seed=0)
    first = env.top_down_map((96, 96))
    for action in (5, 5, 5, 5, 5, 5):  # look around
        env.step(action)
    later = env.top_down_map((96, 96))
    seen_before, seen_after = (~(first == UNSEEN).all(-1)).sum(), (~(later == UNSEEN).all(-1)).sum()
    assert seen_after > seen_before > 0
    assert (later == GOAL_COLOUR).all(-1).any()  # the PointNav goal is drawn
    assert (later == [255, 60, 60]).all(-1).any()  # the first agent's colour


def test_the_map_colours_by_height_when_asked_or_when_the_model_cannot_decode():
    from mirage_env.topdown import TopDownMap, render_top_down

    env = MirageEnv()
    env.reset(seed=0)
    env.step(1)
    memory, rigs = env.world.memory, env.batch.rigs
    by_height = render_top_down(memory, 0, rigs, settings=TopDownMap(colour="height"))
    no_model = render_top_down(memory, 0, rigs, model=None)
    np.testing.assert_array_equal(by_height, no_model)
    decoded = render_top_down(memory, 0, rigs, model=env.world.model)
    assert not np.array_equal(decoded, by_height)
    with pytest.raises(ValueError, match="colour"):
        TopDownMap(colour="rainbow")


def test_rollout_map_writes_a_video_with_the_map_beside_the_frame(tmp_path):
    import imageio.v3 as iio

    from mirage_env.cli import main

    video = tmp_path / "map.gif"
    assert main(["rollout", "--env", "Mirage/PointNav-v0", "--policy", "loop", "--steps", "3", "--map",
                 "--video-scale", "1", "--out", str(video), "--quiet"]) == 0
    frames = iio.imread(video)
    assert frames.shape[1:] == (64, 128, 3)


def test_stored_entries_lists_each_worlds_own_entries():
    envs = MirageVectorEnv(num_envs=3)
    envs.reset(seed=0)
    envs.step(np.array([1, 5, 1]))
    memory = envs.world.memory
    counts = [len(memory.stored_entries(world)[0]) for world in range(3)]
    assert counts == memory.entries_per_world().tolist()
    points, features = memory.stored_entries(1)
    assert points.shape == (counts[1], 3) and features.shape == (counts[1], memory.channels)
    with pytest.raises(ValueError, match="world"):
        memory.stored_entries(3)


def test_an_84_pixel_env_draws_its_map_at_its_own_size():
    env = MirageEnv(image_size=84, render_mode="rgb_array", render_map=True)
    env.reset(seed=0)
    env.step(1)
    assert env.render().shape == (84, 168, 3)
