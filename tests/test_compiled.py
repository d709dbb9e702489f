"""The compiled CPU kernels give bit-for-bit what the torch path gives (the torch path is the oracle)."""

import numpy as np
import pytest
import torch

import mirage_env.compiled as compiled
from mirage_env.agents.evaluate import torch_threads
from mirage_env.env import MirageEnv
from mirage_env.vector import MirageVectorEnv

pytest.importorskip("numba")


def rollout(monkeypatch, kernels: bool, make, steps: int, actions_for) -> list[dict[str, np.ndarray]]:
    """Every observation, the generated latents, depth and the memory's read of each step."""
    monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
    env = make()
    env.reset(seed=[5, 6, 7][: getattr(env, "num_envs", 1)] if hasattr(env, "num_envs") else 5)
    world = env.world if hasattr(env, "world") else env.unwrapped.world
    reads = []
    original_read = world.memory.read

    def recording_read(*args, **kwargs):
        read = original_read(*args, **kwargs)
        reads.append(read)
        return read

    world.memory.read = recording_read
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        observation, _, terminated, truncated, _ = env.step(actions_for(rng))
        if np.ndim(terminated) == 0 and (terminated or truncated):  # a single env: a new episode
            env.reset(seed=int(rng.integers(1 << 30)))
        tail, read = world._tail, reads[-1]
        out.append({**{k: np.asarray(v).copy() for k, v in observation.items()},
                    "latents": tail.latents.numpy().copy(), "depth": tail.depth.numpy().copy(),
                    "read_latents": read.latents.numpy().copy(), "read_mask": read.mask.numpy().copy(),
                    "read_depth": read.depth.numpy().copy(), "read_points": read.points.numpy().copy(),
                    "entries": world.memory.entries_per_world().numpy().copy()})
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{key} differs at step {step}")


@pytest.mark.parametrize("scene", ["indoor", "outdoor"])
def test_one_env_steps_are_bit_exact_with_the_torch_path(monkeypatch, scene):
    make = lambda: MirageEnv(image_size=32, max_episode_steps=60, backend_options={"scene": scene})  # noqa: E731
    with torch_threads(1):
        fast = rollout(monkeypatch, True, make, 120, lambda rng: int(rng.integers(0, 9)))
        oracle = rollout(monkeypatch, False, make, 120, lambda rng: int(rng.integers(0, 9)))
    assert_same(fast, oracle)


def test_batched_worlds_on_two_threads_are_bit_exact_with_the_torch_path(monkeypatch):
    # Two threads take the kernels' parallel (prange over views) variants.
    make = lambda: MirageVectorEnv(3, image_size=32, max_episode_steps=40)  # noqa: E731
    with torch_threads(2):
        fast = rollout(monkeypatch, True, make, 80, lambda rng: rng.integers(0, 9, 3))
        oracle = rollout(monkeypatch, False, make, 80, lambda rng: rng.integers(0, 9, 3))
    assert_same(fast, oracle)


def test_kernels_run_on_cpu_only_and_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "1")
    assert compiled.kernels_enabled("cpu")
    assert not compiled.kernels_enabled(torch.device("meta"))
    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    assert not compiled.kernels_enabled("cpu")


def test_a_kernel_that_cannot_load_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "1")
    monkeypatch.setattr(compiled, "_broken", None)
    with pytest.warns(RuntimeWarning, match="torch path"):
        compiled.disable_kernels("test: compiler missing")
    assert not compiled.kernels_enabled("cpu")
    env = MirageEnv(image_size=32)
    env.reset(seed=0)
    env.step(0)  # runs on the torch path, no error


def test_a_kernel_that_fails_when_first_called_falls_back_to_torch_with_the_same_frames(monkeypatch):
    # numba compiles lazily, on the first call: a failure there must not reach the user either.
    from mirage_env.backends import procedural_kernels

    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    oracle = MirageEnv(image_size=32)
    expected = oracle.reset(seed=1)[0]["rgb"]
    monkeypatch.setenv(compiled.KERNELS_ENV, "1")
    monkeypatch.setattr(compiled, "_broken", None)

    def broken(*args, **kwargs):
        raise RuntimeError("test: numba could not compile the kernel")

    monkeypatch.setattr(procedural_kernels, "cast", broken)
    env = MirageEnv(image_size=32)
    with pytest.warns(RuntimeWarning, match="torch path"):
        observation = env.reset(seed=1)[0]
    np.testing.assert_array_equal(observation["rgb"], expected)
