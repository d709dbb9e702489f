"""The kernels compile in the background: steps never wait, and the switch changes no bit."""

import subprocess
import sys
import textwrap
import threading

import numpy as np

from mirage_env import compiled, kernel_warmup
from mirage_env.env import MirageEnv


def _rollout(env, actions):
    frames, depths = [], []
    for action in actions:
        observation, *_ = env.step(int(action))
        frames.append(observation["rgb"])
        depths.append(env.batch.last_depth.copy())
    return frames, depths


def test_steps_before_and_after_the_kernels_are_ready_are_the_steps_of_the_compiled_path(monkeypatch):
    assert kernel_warmup.wait(), "the tests run where numba works: the compiled path must be ready"
    actions = np.random.default_rng(3).integers(0, 9, 60)
    compiled_env = MirageEnv(image_size=64, max_episode_steps=None)
    compiled_env.reset(seed=11)
    reference = _rollout(compiled_env, actions)

    # A process whose warm-up is still running: the torch path until it is done, then the kernels.
    monkeypatch.delenv(compiled.KERNELS_ENV, raising=False)
    not_yet = threading.Event()
    monkeypatch.setattr(kernel_warmup, "_done", not_yet)
    monkeypatch.setattr(kernel_warmup, "start", lambda: None)
    assert not compiled.kernels_enabled("cpu")
    switching_env = MirageEnv(image_size=64, max_episode_steps=None)
    switching_env.reset(seed=11)
    before = _rollout(switching_env, actions[:25])
    not_yet.set()
    assert compiled.kernels_enabled("cpu")
    after = _rollout(switching_env, actions[25:])
    for expected, got in zip(reference, (a + b for a, b in zip(before, after))):
        for i, (x, y) in enumerate(zip(expected, got)):
            np.testing.assert_array_equal(x, y, err_msg=f"step {i}")
    assert switching_env.batch.world.memory.entries_per_world().tolist() == \
        compiled_env.batch.world.memory.entries_per_world().tolist()


def _python(code: str, **env) -> str:
    import os

    base = {k: v for k, v in os.environ.items() if k != compiled.KERNELS_ENV}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env={**base, **env}, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_fresh_process_warms_up_in_the_background_without_moving_the_users_random_streams():
    out = _python("""
        import random, numpy as np, torch
        from mirage_env import kernel_warmup
        from mirage_env.compiled import kernels_enabled
        torch.manual_seed(5); np.random.seed(5); random.seed(5)
        states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        print(kernels_enabled("cpu"))  # the first ask starts the warm-up and answers "not yet"
        print(kernel_warmup.wait(), kernels_enabled("cpu"))
        assert torch.equal(states[0], torch.get_rng_state())
        assert (states[1] == np.random.get_state()[1]).all() and states[2] == random.getstate()
    """)
    first, second = out.splitlines()[:2]
    assert first == "False"
    assert second == "True True"


def test_kernels_turned_off_or_on_at_once_start_no_warm_up():
    code = """
        from mirage_env import kernel_warmup
        from mirage_env.compiled import kernels_enabled
        print(kernels_enabled("cpu"), kernel_warmup._thread is None)
    """
    assert _python(code, MIRAGE_ENV_KERNELS="0").split() == ["False", "True"]
    assert _python(code, MIRAGE_ENV_KERNELS="1").split() == ["True", "True"]


def test_a_fork_waits_for_a_warm_up_in_flight():
    # A child forked mid-compile would inherit numba's compiler lock held by a thread it lacks.
    out = _python("""
        import os, time
        from mirage_env import kernel_warmup
        kernel_warmup._exercise = lambda: time.sleep(1.0)  # a warm-up that takes a while
        kernel_warmup.start()
        assert not kernel_warmup.ready()
        pid = os.fork()
        if pid == 0:
            os.write(1, f"child {kernel_warmup.ready()}\\n".encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent", kernel_warmup.ready())
    """)
    assert out.split("\n")[:2] == ["child True", "parent True"]
