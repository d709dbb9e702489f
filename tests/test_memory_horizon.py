"""The memory horizon: "short-term memory only" (what the last K segments wrote or saw) vs full memory.

With ``horizon=K`` a world's memory forgets every entry that none of its last K
writes observed, so a returning camera finds only what it saw recently; with
``horizon=None`` (the default) nothing is forgotten.
"""

import math

import numpy as np
import pytest
import torch

import mirage_env.memory.fileformat as memory_module
from mirage_env.agents.evaluate import torch_threads
from mirage_env.env import MirageEnv
from mirage_env.geometry import Camera, CameraRig, Move
from mirage_env.memory import LatentSpatialMemory, MemoryFileError, save_state
from mirage_env.metrics import psnr
from mirage_env.vector import MirageVectorEnv
from mirage_env.world import World

LATENT = Camera.from_fov(64, 64, 90).scaled(1 / 8)  # an 8x8 latent grid
CHANNELS = 6
WALL = torch.full((8, 8), 3.0)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


def features(seed=0):
    generator = torch.Generator().manual_seed(seed)
    # fp16-representable, so exact equality after storage is meaningful.
    return torch.randn(CHANNELS, 8, 8, generator=generator).half().float()


def place(i):
    """Camera i, 10 m from camera i - 1: what one sees, no other does."""
    pose = torch.eye(4, dtype=torch.float64)
    pose[0, 3] = 10.0 * i
    return pose


def reads_back(memory, i, seed) -> bool:
    """Camera ``i`` reads back exactly the features ``features(seed)`` it wrote."""
    read = memory.read(LATENT, place(i))
    return bool(read.mask.all()) and torch.equal(read.latents, features(seed))


def test_with_horizon_k_a_camera_reads_back_what_the_last_k_writes_wrote_and_nothing_older():
    horizon = 3
    short = LatentSpatialMemory(CHANNELS, voxel_size=0.05, horizon=horizon)
    full = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    for i in range(6):
        for memory in (short, full):
            memory.write(features(i), WALL, LATENT, place(i))
        assert short.write_clock().tolist() == [i + 1]
        for j in range(i + 1):
            written_ago = i - j  # 0: by the last write
            assert reads_back(full, j, j), "full memory reads back everything it wrote"
            if written_ago < horizon:
                assert reads_back(short, j, j), f"written {written_ago} writes ago, within the horizon"
            else:
                assert not short.read(LATENT, place(j)).mask.any(), f"written {written_ago} writes ago: forgotten"
    assert short.entries_per_world().tolist() == [horizon * 64]
    assert sorted(set(short.stored_ages().tolist())) == [0, 1, 2]
    assert short.stats()["horizon"] == horizon and full.stats()["horizon"] is None


def test_a_short_memory_stays_the_same_size_however_far_the_camera_goes():
    """Freed entries are reused and bricks left empty are released, so K segments bound the size."""
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, horizon=2)
    sizes = []
    for i in range(12):
        memory.write(features(i), WALL, LATENT, place(i))
        stats = memory.stats(bounds=False)
        assert stats["entries"] == 64 * min(i + 1, 2)
        sizes.append((stats["bricks"], stats["bytes"], memory.entries_in_use))
    assert len(set(sizes[3:])) == 1, f"size still changes after the horizon filled: {sizes}"


def test_without_a_horizon_reads_are_bit_identical_to_a_horizon_that_never_expires():
    """horizon=None (the default) and a horizon longer than the episode store and read the same."""
    generator = torch.Generator().manual_seed(3)
    memories = [LatentSpatialMemory(CHANNELS, voxel_size=0.1, num_worlds=2, max_bricks_per_world=200, horizon=h)
                for h in (None, 1000)]
    rigs = [CameraRig(x, 0.0, z, yaw=yaw) for x, z, yaw in
            [(0.0, 0.0, 0.0), (0.3, 0.2, 0.4), (-1.0, 1.0, 2.0), (0.1, -0.5, -0.7), (0.0, 0.0, 0.0)]]
    poses = torch.stack([torch.from_numpy(rig.c2w()) for rig in rigs])
    for pose in poses:
        depth = 1.0 + 4.0 * torch.rand(2, 1, 8, 8, generator=generator)
        latents = torch.randn(2, 1, CHANNELS, 8, 8, generator=generator)
        for memory in memories:
            memory.write(latents, depth, LATENT, pose.expand(2, 1, 4, 4))
    a, b = (memory.read(LATENT, poses[None].expand(2, -1, -1, -1)) for memory in memories)
    assert a.mask.any()
    assert torch.equal(a.latents, b.latents) and torch.equal(a.mask, b.mask) and torch.equal(a.depth, b.depth)
    assert torch.equal(a.points.nan_to_num(-1.0), b.points.nan_to_num(-1.0))
    assert torch.equal(memories[0].entries_per_world(), memories[1].entries_per_world())


def test_a_voxel_whose_entry_expired_is_written_anew_even_when_the_first_sample_wins():
    """merge="first" keeps the first sample of a voxel, but not one the horizon has freed."""
    short = LatentSpatialMemory(CHANNELS, voxel_size=0.05, horizon=1, merge="first")
    full = LatentSpatialMemory(CHANNELS, voxel_size=0.05, merge="first")
    for memory in (short, full):
        memory.write(features(1), WALL, LATENT, place(0))
        memory.write(features(2), WALL, LATENT, place(1))  # looking elsewhere: place 0 expires (K=1)
        memory.write(features(3), WALL, LATENT, place(0))  # back: the same voxels are seen again
    assert reads_back(full, 0, 1), "full memory keeps the first samples"
    assert reads_back(short, 0, 3), "the expired voxels took the new samples"
    # Expiry runs before a write merges, so each write reused the entries the previous one held.
    assert short.entries_in_use == 64 and full.entries_in_use == 2 * 64


def test_what_memory_shows_the_generator_stays_remembered_under_a_horizon():
    """A World that does not write back what memory supplied (write="unseen") passes the read as ``seen``."""
    nothing_new = torch.zeros(8, 8, dtype=torch.bool)
    kept, forgotten = (LatentSpatialMemory(CHANNELS, voxel_size=0.05, horizon=1) for _ in range(2))
    for memory in (kept, forgotten):
        memory.write(features(1), WALL, LATENT, place(0))
    for _ in range(3):  # a still camera, three more segments
        kept.write(features(9), WALL, LATENT, place(0), keep=nothing_new, seen=kept.read(LATENT, place(0)).points)
        forgotten.write(features(9), WALL, LATENT, place(0), keep=nothing_new)
    assert reads_back(kept, 0, 1)
    assert not forgotten.read(LATENT, place(0)).mask.any()
    # Samples that fall in stored voxels refresh them too, whichever sample the merge keeps.
    again = LatentSpatialMemory(CHANNELS, voxel_size=0.05, horizon=1)
    for seed in (1, 2, 3):
        again.write(features(seed), WALL, LATENT, place(0))
    assert reads_back(again, 0, 1) and again.stored_ages().tolist() == [0] * 64


def test_batched_worlds_keep_their_own_clocks():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, num_worlds=2, horizon=1)
    both = place(0).expand(2, 1, 4, 4)
    memory.write(torch.stack([features(1), features(2)])[:, None], WALL.expand(2, 1, 8, 8), LATENT, both)
    memory.write(features(3)[None, None], WALL[None, None], LATENT, place(1)[None, None], worlds=[1])
    assert memory.write_clock().tolist() == [1, 2]
    read = memory.read(LATENT, both)
    assert read.mask[0].all() and torch.equal(read.latents[0, 0], features(1)), "world 0 was not written since"
    assert not read.mask[1].any(), "world 1 looked away"
    memory.clear([1])
    assert memory.write_clock().tolist() == [1, 0]


def test_save_load_round_trips_clocks_and_ages_and_expires_the_same_entries_later(tmp_path):
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, num_worlds=2, horizon=2)
    for i in range(3):
        memory.write(torch.stack([features(i), features(10 + i)])[:, None], WALL.expand(2, 1, 8, 8), LATENT,
                     place(i).expand(2, 1, 4, 4))
    memory.write(features(7)[None, None], WALL[None, None], LATENT, place(5)[None, None], worlds=[0])
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    loaded = LatentSpatialMemory.load(path)
    assert loaded.config() == memory.config() and loaded.horizon == 2
    assert loaded.write_clock().tolist() == memory.write_clock().tolist() == [4, 3]
    saved, restored = memory.state_tensors(), loaded.state_tensors()
    assert saved.keys() == restored.keys()
    for name in saved:
        assert saved[name].dtype == restored[name].dtype and torch.equal(saved[name], restored[name]), name
    for i in (3, 4):  # both continue alike: the same entries expire
        for m in (memory, loaded):
            m.write(torch.stack([features(i), features(10 + i)])[:, None], WALL.expand(2, 1, 8, 8), LATENT,
                    place(i).expand(2, 1, 4, 4))
        assert torch.equal(memory.entries_per_world(), loaded.entries_per_world())
        everywhere = torch.stack([place(j) for j in range(6)])[None].expand(2, -1, -1, -1)
        a, b = memory.read(LATENT, everywhere), loaded.read(LATENT, everywhere)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.latents, b.latents)
    assert a.mask[:, 3:5].all() and not a.mask[:, :3].any() and not a.mask[:, 5].any()
    assert torch.equal(memory.entry_last_write[:memory.entries_in_use], loaded.entry_last_write[:loaded.entries_in_use])
    # (Bytes may differ: the chunk index is rebuilt on load with its own capacity.)
    assert {**memory.stats(), "bytes": 0} == {**loaded.stats(), "bytes": 0}


def _save_with(memory, path, drop=(), replace=None, config=None):
    """Save ``memory`` with some of its state dropped or replaced (the checksum made to match)."""
    tensors = {k: v for k, v in memory.state_tensors().items() if k.removeprefix("memory.") not in drop}
    tensors.update({"memory." + k: v for k, v in (replace or {}).items()})
    config = {k: v for k, v in {**memory.config(), **(config or {})}.items() if k not in drop}
    save_state(path, kind="memory", config=config, tensors=tensors)


def test_a_version_3_file_loads_with_derived_clocks(tmp_path, monkeypatch):
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    for i in range(3):
        memory.write(features(i), WALL, LATENT, place(i))
    old = tmp_path / "v3.safetensors"
    monkeypatch.setattr(memory_module, "FORMAT_VERSION", 3)
    _save_with(memory, old, drop=("write_clock", "entry_last_write", "horizon"))  # what version 3 wrote
    monkeypatch.undo()
    loaded = LatentSpatialMemory.load(old)
    assert loaded.horizon is None and loaded.write_clock().tolist() == [3]
    assert torch.equal(loaded.entry_last_write[:192], memory.entry_last_write[:192])  # one world: exact
    for i in range(3):
        assert reads_back(loaded, i, i)


@pytest.mark.parametrize("change, message", [
    ({"replace": {"write_clock": torch.tensor([3], dtype=torch.int32)}}, "write_clock must be int64"),
    ({"replace": {"write_clock": torch.tensor([3, 3])}}, r"write_clock must be int64 of shape \(1,\)"),
    ({"replace": {"write_clock": torch.tensor([-1])}}, "negative"),
    ({"replace": {"entry_last_write": torch.full((64,), 1, dtype=torch.int64)}}, "entry_last_write must be int32"),
    ({"replace": {"entry_last_write": torch.full((63,), 1, dtype=torch.int32)}}, r"shape \(64,\)"),
    ({"replace": {"entry_last_write": torch.full((64,), -2, dtype=torch.int32)}}, "negative"),
    ({"replace": {"entry_last_write": torch.full((64,), 5, dtype=torch.int32)}}, "after their world's last write"),
    ({"drop": ("write_clock",)}, "lacks tensor"),
    ({"config": {"horizon": 0}}, "horizon must be a positive integer"),
])
def test_altered_clock_fields_give_clear_errors(tmp_path, change, message):
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, horizon=2)
    memory.write(features(), WALL, LATENT, place(0))
    path = tmp_path / "altered.safetensors"
    _save_with(memory, path, **change)
    with pytest.raises(MemoryFileError, match=message):
        LatentSpatialMemory.load(path)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_horizons_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        LatentSpatialMemory(CHANNELS, horizon=bad)
    with pytest.raises(ValueError, match="memory_horizon must be a positive integer"):
        MirageEnv(memory_horizon=bad)
    with pytest.raises(ValueError, match="memory_horizon must be a positive integer"):
        MirageVectorEnv(2, memory_horizon=bad)


def test_the_horizon_is_given_once():
    with pytest.raises(ValueError, match="contradicts"):
        MirageEnv(memory_horizon=2, memory_options={"horizon": 3})
    env = MirageEnv(memory_horizon=2, memory_options={"horizon": 2})
    with pytest.raises(ValueError, match="given world's memory has horizon 2"):
        MirageEnv(world=env.world, memory_horizon=4)
    assert isinstance(env.world, World) and env.world.memory.horizon == 2


def turn_around(memory_horizon, seed=0):
    """Stand still, then turn a full circle in place; returns (hits while still, frames, last info)."""
    env = MirageEnv(memory_horizon=memory_horizon, max_episode_steps=100)
    first, _ = env.reset(seed=seed)
    still = [env.step(Move.STAY)[4]["memory_hit"] for _ in range(3)]
    for _ in range(24):  # 24 x 15 degrees
        observation, _, _, _, info = env.step(Move.TURN_LEFT)
    assert np.allclose(env.batch.rigs[0], env.batch.start_rigs[0], atol=1e-9), "back where it started"
    return still, first["rgb"], observation["rgb"], info


def test_short_term_memory_has_forgotten_the_start_when_the_camera_turns_back_to_it():
    still_full, start_full, back_full, full = turn_around(None)
    still_short, start_short, back_short, short = turn_around(1)
    # A still camera keeps what it looks at either way: memory shows it, so it counts as seen.
    assert still_full == still_short == [1.0, 1.0, 1.0]
    # Back at the start, full memory knows the whole view; one segment of memory only its last glimpse.
    assert full["memory_hit"] == 1.0
    assert short["memory_hit"] < 0.75
    assert psnr(start_full, back_full) > psnr(start_short, back_short) + 3.0
    assert short["memory_entries"] < full["memory_entries"] / 2, "forgotten entries are freed"


def test_a_vector_env_with_a_horizon_matches_single_envs():
    seeds = [3, 8]
    venv = MirageVectorEnv(2, memory_horizon=2, max_episode_steps=100)
    envs = [MirageEnv(memory_horizon=2, max_episode_steps=100) for _ in seeds]
    venv.reset(seed=seeds)
    for env, seed in zip(envs, seeds):
        env.reset(seed=seed)
    moves = [Move.TURN_LEFT] * 4 + [Move.FORWARD, Move.TURN_RIGHT, Move.TURN_RIGHT, Move.STAY]
    for move in moves:
        observations, _, _, _, infos = venv.step(np.full(2, int(move)))
        for i, env in enumerate(envs):
            observation, _, _, _, info = env.step(move)
            np.testing.assert_array_equal(observations["rgb"][i], observation["rgb"])
            assert infos["memory_hit"][i] == info["memory_hit"]
    assert math.isfinite(infos["memory_hit"].sum())
