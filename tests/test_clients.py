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
