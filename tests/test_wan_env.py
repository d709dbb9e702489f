"""The Wan backend inside the envs, on tiny random-weight checkpoints (CPU).

Every env class drives the Wan world model exactly as it drives the procedural
one: episodes, batched worlds that match single envs, bit-exact save / resume,
and segments as long as the model's ``frames_per_segment`` says.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import mirage_env  # noqa: E402,F401  (registers the ids)
from mirage_env.agents.evaluate import torch_threads  # noqa: E402
from mirage_env.backends.depth import ConstantDepth  # noqa: E402
from mirage_env.backends.tiny import build_tiny_checkpoint  # noqa: E402
from mirage_env.env import MirageEnv  # noqa: E402
from mirage_env.vector import MirageVectorEnv  # noqa: E402
from mirage_env.world import World  # noqa: E402

OBSERVATIONS = ("rgb", "pose", "depth", "latent")


def wan_options(frames_per_segment: int = 5, **extra) -> dict:
    """Tiny sampler settings; 5 frames on Wan's 4x temporal VAE = 2 latent frames per segment."""
    options = dict(tokenizer=None, text_encoder=None, num_inference_steps=2, max_sequence_length=8,
                   depth_estimator=ConstantDepth(2.0), frames_per_segment=frames_per_segment)
    return options | extra


@pytest.fixture(autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("wan") / "ckpt", z_dim=16, num_layers=4)


@pytest.fixture(scope="module")
def dct_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint with the DCT autoencoder as its VAE (48 channels, no temporal compression)."""
    from mirage_env.backends.dct_autoencoder import PatchDCTAutoencoder

    directory = build_tiny_checkpoint(tmp_path_factory.mktemp("wan_dct") / "ckpt", z_dim=48, num_layers=4)
    shutil.rmtree(directory / "vae")
    PatchDCTAutoencoder(scale_factor_spatial=16, dct_keep=4).save_pretrained(directory / "vae")
    return directory


def wan_env(checkpoint, **kwargs) -> MirageEnv:
    kwargs.setdefault("backend_options", wan_options())
    return MirageEnv(backend="wan", checkpoint=str(checkpoint), observations=OBSERVATIONS, **kwargs)


def assert_same(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs {where}")


def assert_same_up_to_batched_rounding(batched: dict, single: dict, where: str) -> None:
    """World i of a batch vs a batch of one: CPU convolutions and matmuls pick other kernels for
    another batch size, so latents differ by float rounding and a decoded pixel by at most 1;
    poses and depth (geometry) are exact. See the determinism contract in backends/base.py."""
    assert batched.keys() == single.keys(), where
    np.testing.assert_array_equal(batched["pose"], single["pose"], err_msg=f"pose differs {where}")
    np.testing.assert_array_equal(batched["depth"], single["depth"], err_msg=f"depth differs {where}")
    np.testing.assert_allclose(batched["latent"], single["latent"], atol=1e-4, err_msg=f"latent differs {where}")
    rgb = np.abs(batched["rgb"].astype(int) - single["rgb"].astype(int))
    assert rgb.max() <= 1, f"rgb differs by {rgb.max()} {where}"


# ----------------------------------------------------------------------------- episodes


def test_a_wan_env_plays_an_episode_to_truncation_with_observations_in_its_space(checkpoint):
    # gym.make takes max_episode_steps itself (a TimeLimit wrapper): truncation after 3 steps.
    env = gym.make("Mirage/Explore-v0", backend="wan", checkpoint=str(checkpoint), backend_options=wan_options(),
                   max_episode_steps=3, observations=OBSERVATIONS)
    observation, info = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    assert observation["rgb"].shape == (64, 64, 3) and observation["latent"].shape == (16, 4, 4)
    truncated, steps = False, 0
    while not truncated:
        observation, reward, terminated, truncated, info = env.step(steps % 2 + 1)  # forward, backward, ...
        steps += 1
        assert env.observation_space.contains(observation), f"step {steps}"
        assert not terminated and np.isfinite(reward) and info["memory_entries"] > 0
    assert steps == 3
    # One step is one segment of 2 latent frames = 5 video frames; rgb is the last, at the step's end pose.
    frames = env.unwrapped.step_frames()
    assert frames.shape == (5, 64, 64, 3)
    np.testing.assert_array_equal(observation["rgb"], frames[-1])
    observation, _ = env.reset()  # the next episode: a new world
    assert env.observation_space.contains(observation)


def test_wan_vector_env_world_1_equals_a_single_env_with_its_seed(checkpoint):
    venv = MirageVectorEnv(2, backend="wan", checkpoint=str(checkpoint), backend_options=wan_options(),
                           max_episode_steps=2, observations=OBSERVATIONS)
    single = wan_env(checkpoint, max_episode_steps=2)
    observations, _ = venv.reset(seed=[3, 7])
    assert venv.observation_space.contains(observations)
    observation, _ = single.reset(seed=7)
    assert_same_up_to_batched_rounding({k: v[1] for k, v in observations.items()}, observation, "at reset")
    assert not np.array_equal(observations["rgb"][0], observations["rgb"][1])  # other seed, other world
    for t, actions in enumerate([np.array([1, 5]), np.array([2, 1]), np.array([6, 6])]):  # with an autoreset
        observations, rewards, terminated, truncated, infos = venv.step(actions)
        observation, reward, term, trunc, _ = single.step(int(actions[1]))
        assert (rewards[1], terminated[1], truncated[1]) == (reward, term, trunc), f"step {t}"
        if trunc:
            assert_same_up_to_batched_rounding(infos["final_obs"][1], observation, f"at the end of step {t}")
            observation, _ = single.reset()
        assert_same_up_to_batched_rounding({k: v[1] for k, v in observations.items()}, observation,
                                           f"after step {t}")
    assert venv.batch.frames_per_step == 2


# ----------------------------------------------------------------------------- save and resume


def test_a_wan_world_saves_and_resumes_bit_exactly(tmp_path, checkpoint):
    from mirage_env.backends.wan import WanWorldModel

    # A depth other than ConstantDepth's default: the rebuilt model must use the saved one.
    options = wan_options(depth_estimator=ConstantDepth(2.5))
    env = wan_env(checkpoint, max_episode_steps=10, backend_options=options)
    env.reset(seed=4)
    env.step(1)
    env.save_world(tmp_path / "world.safetensors")
    expected = env.step(5)
    uninterrupted = env.batch.last_step

    # The env resumes the episode: same observation, reward and generated segment.
    resumed = wan_env(checkpoint, max_episode_steps=10, backend_options=options)
    resumed.load_world(tmp_path / "world.safetensors")
    got = resumed.step(5)
    assert_same(got[0], expected[0], "after resuming the env")
    assert got[1:4] == expected[1:4]
    assert torch.equal(resumed.batch.last_step.latents, uninterrupted.latents)
    assert torch.equal(resumed.batch.last_step.frames, uninterrupted.frames)

    # The World alone rebuilds its Wan model from the file (no text encoder needed: the prompt
    # embedding is part of the world) and generates the same next segment.
    world, extra, _ = World.load(tmp_path / "world.safetensors")
    assert isinstance(world.model, WanWorldModel) and world.model.text_encoder is None
    assert world.model.config() == env.world.model.config()
    step = world.step(uninterrupted.poses)
    assert torch.equal(step.latents, uninterrupted.latents)
    assert torch.equal(step.frames, uninterrupted.frames)
    assert torch.equal(step.depth, uninterrupted.depth)
    assert extra["task"] == "explore"


def test_a_world_whose_depth_estimator_cannot_be_rebuilt_says_to_pass_one(tmp_path, checkpoint):
    env = wan_env(checkpoint, backend_options=wan_options(depth_estimator=_Depth()))
    env.reset(seed=0)
    env.save_world(tmp_path / "world.safetensors")
    with pytest.raises(ValueError, match="depth_estimator=.*model="):
        World.load(tmp_path / "world.safetensors")
    world, _, _ = World.load(tmp_path / "world.safetensors", model=env.world.model)
    assert world.model is env.world.model


class _Depth(ConstantDepth):
    """A caller's own estimator: the model cannot know how to rebuild it."""


# ----------------------------------------------------------------------------- segment length


def test_frames_per_segment_sets_the_latent_frames_of_every_env_step(checkpoint):
    from mirage_env.multi_agent import MirageParallelEnv

    env = wan_env(checkpoint)  # frames_per_segment=5 on a 4x temporal VAE
    model = env.world.model
    assert model.latent.temporal_factor == 4 and model.latent_frames == 2 and env.batch.frames_per_step == 2
    asked = []
    start, generate = model.start, model.generate
    model.start = lambda poses, *a, **k: asked.append(("start", poses.shape[1])) or start(poses, *a, **k)
    model.generate = lambda request: asked.append(("generate", request.poses.shape[1])) or generate(request)
    env.reset(seed=1)
    observation, *_ = env.step(1)
    assert asked == [("start", 2), ("generate", 2)]
    step = env.batch.last_step
    assert step.frames.shape[1] == 5 and step.pose_frames.shape[1] == 2
    # Latent frame k ends on video frame 4k: the pose frames are frames 0 and 4.
    assert torch.equal(step.pose_frames, step.frames[:, [0, 4]])
    np.testing.assert_array_equal(observation["rgb"], step.frames[0, 4].numpy())
    np.testing.assert_array_equal(observation["latent"], step.latents[0, -1].numpy())

    # A frames_per_step that contradicts the model is refused by every env, naming both numbers.
    for make in (lambda: wan_env(checkpoint, frames_per_step=3),
                 lambda: MirageVectorEnv(2, backend="wan", checkpoint=str(checkpoint), backend_options=wan_options(),
                                         frames_per_step=1),
                 lambda: MirageParallelEnv(2, shared_memory=False, backend="wan", checkpoint=str(checkpoint),
                                           backend_options=wan_options(), frames_per_step=4)):
        with pytest.raises(ValueError, match=r"frames_per_step=\d conflicts .* 2 latent frames per segment "
                                             r"\(frames_per_segment=5\)"):
            make()
    assert wan_env(checkpoint, frames_per_step=2).batch.frames_per_step == 2  # repeating it is fine
    # The multi-agent env follows the model too (one agent per world: Wan renders one camera).
    agents = MirageParallelEnv(2, shared_memory=False, backend="wan", checkpoint=str(checkpoint),
                               backend_options=wan_options(frames_per_segment=9))
    assert agents.batch.frames_per_step == 3

    # The model itself refuses any other segment length, saying how to get one.
    with pytest.raises(ValueError, match="segments of 2 latent frames .* got poses for 3.*frames_per_segment=9"):
        model.start(torch.eye(4, dtype=torch.float64).repeat(1, 3, 1, 1), [torch.Generator()])


def test_the_procedural_model_keeps_any_frames_per_step():
    env = MirageEnv(frames_per_step=3)
    env.reset(seed=0)
    env.step(1)
    assert env.batch.frames_per_step == 3 and env.batch.last_step.frames.shape[1] == 3
    assert MirageEnv().batch.frames_per_step == 1
    with pytest.raises(ValueError, match="frames_per_step must be a positive integer"):
        MirageEnv(frames_per_step=0)


def test_a_dct_autoencoder_checkpoint_steps_an_env_with_two_frames_per_segment(dct_checkpoint):
    env = wan_env(dct_checkpoint, max_episode_steps=3,
                  backend_options=wan_options(frames_per_segment=2))
    model = env.world.model
    assert type(model.vae).__name__ == "PatchDCTAutoencoder"
    assert model.latent.temporal_factor == 1 and model.latent.channels == 48 and model.latent_frames == 2
    assert env.batch.frames_per_step == 2
    observation, _ = env.reset(seed=2)
    assert env.observation_space.contains(observation)
    for t in range(3):
        observation, reward, terminated, truncated, _ = env.step(t % 2 + 5)  # turn left, turn right, ...
        assert env.observation_space.contains(observation)
    assert truncated
    # No temporal compression: one frame per latent frame, and rgb decodes the last latent.
    step = env.batch.last_step
    assert step.frames.shape[1] == 2 and torch.equal(step.pose_frames, step.frames)
    np.testing.assert_array_equal(observation["rgb"], model.decode(torch.from_numpy(observation["latent"])[None, None])[0, 0])
