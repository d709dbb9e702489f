"""The default procedural world and the latent memory on a CUDA device.

On a GPU the torch code runs (the compiled kernels are CPU-only, :mod:`mirage_env.compiled`), so
these tests hold it to what a user relies on: an episode on ``cuda`` shows what the CPU's torch path
shows, a seed repeats its episode, the memory reads back what it wrote, and N batched worlds equal N
single envs. They skip without a CUDA device; the first test (the memory lives where the model
renders) runs anywhere on torch's "meta" device.

    python -m pytest -m gpu tests/test_gpu.py

Tolerances: float32 maths on a GPU rounds differently in the last bit (its sin, exp and products),
and a last-bit change flips a pixel's pattern stripe or a sample's voxel now and then, so frames are
compared as the share of pixels within 1 of each other, not bit for bit. The figures measured are
given beside each bound.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import mirage_env  # noqa: F401  (registers the ids)
from mirage_env import compiled
from mirage_env.backends.procedural import ProceduralWorldModel
from mirage_env.config import WorldConfig
from mirage_env.env import MirageEnv
from mirage_env.geometry import Camera, CameraRig, Move
from mirage_env.memory import LatentSpatialMemory
from mirage_env.vector import MirageVectorEnv
from mirage_env.world import World

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Out and back with turns: later steps look again at what earlier ones wrote, so memory supplies pixels.
MOVES = [Move.FORWARD, Move.FORWARD, Move.TURN_LEFT, Move.TURN_LEFT, Move.STRAFE_RIGHT, Move.TURN_RIGHT,
         Move.TURN_RIGHT, Move.BACKWARD, Move.BACKWARD, Move.LOOK_UP, Move.LOOK_DOWN, Move.STAY]
OBSERVATIONS = ("rgb", "pose", "depth")


def episode(env, seed: int = 0) -> dict[str, np.ndarray]:
    """Every observation, reward and memory hit of one scripted episode of ``env``, stacked per key."""
    observation, info = env.reset(seed=seed)
    steps = [dict(observation, reward=0.0, memory_hit=info["memory_hit"])]
    for move in MOVES:
        observation, reward, terminated, truncated, info = env.step(int(move))
        assert not (terminated or truncated), "the scripted episode must not end early"
        steps.append(dict(observation, reward=reward, memory_hit=info["memory_hit"]))
    env.close()
    return {key: np.stack([np.asarray(step[key]) for step in steps]) for key in steps[0]}


def share_within_one(a: np.ndarray, b: np.ndarray) -> float:
    """Share of uint8 values of ``a`` and ``b`` that differ by at most 1."""
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)) <= 1).mean())


def share_close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> float:
    """Share of depth values equal within ``rtol`` (inf only equals inf)."""
    both_inf = np.isinf(a) & np.isinf(b)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= rtol * np.abs(b)
    return float((both_inf | close).mean())


# ---------------------------------------------------------------------- anywhere


def test_the_memory_lives_on_the_device_the_model_renders_on():
    """A world built for a device keeps its memory there too: a model on a GPU reads and writes a GPU
    memory (not a CPU one, which the default left it on, and whose reads the GPU filters could not take);
    an explicit memory device still wins. "meta" stands in for a GPU: it allocates nothing."""
    world = WorldConfig(image_size=32, backend_options={"device": "meta"}).build(num_worlds=2)
    assert world.model.device.type == "meta"
    assert world.memory.device.type == "meta"
    assert world.memory.entries_per_world().device.type == "meta"  # its storage, not only its label
    assert World(ProceduralWorldModel(image_size=(32, 32), device="meta"), device="cpu").memory.device.type == "cpu"
    assert World(ProceduralWorldModel(image_size=(32, 32))).memory.device.type == "cpu"


# ---------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.gpu
def test_the_default_env_on_cuda_runs_an_episode_that_matches_the_cpu_torch_path(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "0")  # the CPU reference is the torch path, the code the GPU runs
    env = gym.make("Mirage/Explore-v0", backend_options={"device": "cuda"}, observations=OBSERVATIONS)
    world = env.unwrapped.world
    assert world.model.device.type == "cuda" and world.memory.device.type == "cuda"
    on_gpu = episode(env)
    assert world.memory.stored_points().is_cuda and world.memory.stats()["entries"] > 0
    assert on_gpu["memory_hit"][1:].max() > 0.3, "the scripted path must look again at what memory holds"
    on_cpu = episode(gym.make("Mirage/Explore-v0", observations=OBSERVATIONS))

    np.testing.assert_array_equal(on_gpu["pose"], on_cpu["pose"])  # the same moves, none refused on one only
    # Measured on an H200 (13 frames): every pixel within 1 (99.998% identical), every latent depth within
    # 1e-4 (99.88% identical); memory hits and rewards identical.
    assert share_within_one(on_gpu["rgb"], on_cpu["rgb"]) >= 0.999
    assert share_close(on_gpu["depth"], on_cpu["depth"]) >= 0.999
    # Memory hits and rewards count latent pixels (64 a frame): a sample in a neighbouring voxel moves one.
    np.testing.assert_allclose(on_gpu["memory_hit"], on_cpu["memory_hit"], atol=3 / 64)
    np.testing.assert_allclose(on_gpu["reward"], on_cpu["reward"], atol=3 / 64)


@cuda
@pytest.mark.gpu
def test_a_seed_repeats_its_episode_on_cuda_and_another_seed_differs():
    make = lambda: MirageEnv(backend_options={"device": "cuda"}, observations=OBSERVATIONS)  # noqa: E731
    first, again, other = episode(make(), seed=5), episode(make(), seed=5), episode(make(), seed=6)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=f"{key} differs between two runs of seed 5")
    assert not np.array_equal(first["rgb"], other["rgb"])


@cuda
@pytest.mark.gpu
def test_a_cuda_model_with_its_memory_on_the_cpu_runs_the_same_episode(monkeypatch):
    """Mixed devices: the model renders on the GPU, the memory stays on the host (World(device="cpu"))."""
    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    mixed = World(ProceduralWorldModel(image_size=(64, 64), device="cuda"), device="cpu")
    assert mixed.memory.device.type == "cpu"
    on_host_memory = episode(MirageEnv(world=mixed, observations=OBSERVATIONS))
    assert mixed.memory.stats()["entries"] > 0
    on_gpu = episode(MirageEnv(backend_options={"device": "cuda"}, observations=OBSERVATIONS))
    np.testing.assert_array_equal(on_host_memory["pose"], on_gpu["pose"])
    # Measured on an H200: identical frames and memory hits.
    assert share_within_one(on_host_memory["rgb"], on_gpu["rgb"]) >= 0.999
    np.testing.assert_allclose(on_host_memory["memory_hit"], on_gpu["memory_hit"], atol=3 / 64)


LATENT = Camera.from_fov(128, 128, 90).scaled(1 / 8)  # a 16x16 latent grid
CHANNELS = 48  # the default procedural codec's


def written_scene(seed: int = 0, worlds: int = 3, frames: int = 2):
    """fp16-representable features (exact after storage), a bumpy surface with sky, poses of a few rigs."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(worlds, frames, CHANNELS, 16, 16, generator=generator).half().float()
    depth = 2.0 + 2.0 * torch.rand(worlds, frames, 16, 16, generator=generator)
    depth[:, :, :2] = float("inf")  # the top rows are sky: never written
    rigs = [[CameraRig(0.1 * w, 0.0, 0.05 * f, yaw=0.3 * f - 0.2 * w, pitch=0.05).c2w() for f in range(frames)]
            for w in range(worlds)]
    return latents, depth, torch.from_numpy(np.array(rigs))


@cuda
@pytest.mark.gpu
def test_latent_memory_on_cuda_reads_back_what_it_wrote_and_reads_as_on_the_cpu(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    latents, depth, poses = written_scene()
    one_view = poses[:1, :1]
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.02, num_worlds=3, device="cuda")
    # A write then a read from the same camera returns what was written, where it was written.
    memory.write(latents[:1, :1].cuda(), depth[:1, :1].cuda(), LATENT, one_view, worlds=[0])
    read = memory.read(LATENT, one_view, worlds=[0])
    assert read.latents.is_cuda and read.mask.is_cuda
    written = torch.isfinite(depth[:1, :1])
    assert torch.equal(read.mask.cpu(), written)
    assert torch.equal(read.latents.cpu()[..., written[0, 0]], latents[:1, :1][..., written[0, 0]])
    torch.testing.assert_close(read.depth.cpu()[written], depth[:1, :1][written], rtol=1e-5, atol=0)

    # Three worlds, two frames each, then reads from cameras moved aside: as the CPU memory reads.
    memories = {device: LatentSpatialMemory(CHANNELS, voxel_size=0.05, num_worlds=3, device=device)
                for device in ("cpu", "cuda")}
    for device, held in memories.items():
        held.write(latents.to(device), depth.to(device), LATENT, poses)
    assert memories["cuda"].stats()["entries"] == memories["cpu"].stats()["entries"]
    aside = poses.clone()
    aside[..., 0, 3] += 0.15
    reads = {device: held.read(LATENT, aside) for device, held in memories.items()}
    gpu, cpu = reads["cuda"], reads["cpu"]
    assert cpu.mask.float().mean() > 0.5, "the moved cameras must see much of what was written"
    # Measured on an H200: the masks agree everywhere, the hit latents are identical, depths within 1.2e-7.
    assert (gpu.mask.cpu() == cpu.mask).float().mean() >= 0.999
    both = gpu.mask.cpu() & cpu.mask
    same = (gpu.latents.cpu() == cpu.latents).all(dim=-3)
    assert same[both].float().mean() >= 0.999
    torch.testing.assert_close(gpu.depth.cpu()[both], cpu.depth[both], rtol=1e-4, atol=0)


@cuda
@pytest.mark.gpu
def test_four_batched_worlds_on_cuda_equal_four_single_envs_on_cuda():
    seeds, steps = [3, 11, 5, 42], 8
    # With "latent": an env on a GPU leaves each step's latents there until an observation or a save asks.
    options = {"backend_options": {"device": "cuda"}, "observations": (*OBSERVATIONS, "latent"), "max_episode_steps": 100}
    venv = MirageVectorEnv(len(seeds), **options)
    envs = [MirageEnv(**options) for _ in seeds]
    assert venv.world.memory.device.type == "cuda"
    batched, _ = venv.reset(seed=seeds)
    singles = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)]
    rng = np.random.default_rng(0)
    hits = []
    for t in range(steps + 1):
        for i, single in enumerate(singles):
            np.testing.assert_array_equal(batched["pose"][i], single["pose"], err_msg=f"pose, step {t}, env {i}")
            # Measured on an H200: every pixel, depth and reward equal (the maths rounds alike at any batch size).
            assert share_within_one(batched["rgb"][i], single["rgb"]) >= 0.999, f"rgb, step {t}, env {i}"
            assert share_close(batched["depth"][i], single["depth"]) >= 0.999, f"depth, step {t}, env {i}"
            assert batched["latent"][i].shape == single["latent"].shape == (48, 8, 8)
            np.testing.assert_allclose(batched["latent"][i], single["latent"], rtol=0, atol=1e-4,
                                       err_msg=f"latent, step {t}, env {i}")
        if t == steps:
            break
        actions = rng.integers(0, venv.single_action_space.n, len(envs))
        batched, rewards, _, _, infos = venv.step(actions)
        singles = []
        for i, env in enumerate(envs):
            single, reward, _, _, info = env.step(int(actions[i]))
            singles.append(single)
            assert reward == pytest.approx(rewards[i], abs=1 / 64), f"reward, step {t}, env {i}"
        hits.append(infos["memory_hit"])
    assert np.max(hits) > 0, "memory must supply some pixels over the steps"
    venv.close()
