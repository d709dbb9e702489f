import math

import pytest
import torch

from mirage_env.geometry import Camera, CameraRig
from mirage_env.memory import FORMAT_VERSION, LatentSpatialMemory, MemoryFileError, pool_depth

LATENT = Camera.from_fov(64, 64, 90).scaled(1 / 8)  # an 8x8 latent grid, fx = 4
CHANNELS = 6


def features(seed=0, shape=(CHANNELS, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    # fp16-representable, so exact equality after storage is meaningful.
    return torch.randn(*shape, generator=generator).half().float()


def identity():
    return torch.eye(4, dtype=torch.float64)


def translated(x=0.0, y=0.0, z=0.0):
    pose = identity()
    pose[:3, 3] = torch.tensor([x, y, z], dtype=torch.float64)
    return pose


def test_write_then_read_from_same_camera_returns_what_was_written():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    latents = features()
    depth = 2.0 + torch.rand(8, 8)  # a bumpy surface
    pose = torch.from_numpy(CameraRig(0.3, -0.1, 0.2, yaw=0.4, pitch=0.1).c2w())
    assert memory.write(latents, depth, LATENT, pose) == 64
    read = memory.read(LATENT, pose)
    assert read.mask.all(), "every pixel of a fully seen surface must be hit"
    assert torch.equal(read.latents, latents)
    assert torch.allclose(read.depth, depth, rtol=1e-5)


def test_unwritten_pixels_are_empty_and_keep_mask_is_respected():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[:, :4] = True
    depth = torch.full((8, 8), 3.0)
    depth[0, 0] = math.inf  # sky is never written
    memory.write(features(), depth, LATENT, identity(), keep=keep)
    read = memory.read(LATENT, identity())
    expected = keep.clone()
    expected[0, 0] = False
    assert torch.equal(read.mask, expected)
    assert (read.latents[:, ~expected] == 0).all()
    assert torch.isinf(read.depth[~expected]).all()


def test_nearer_surface_wins():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    wall, box = features(1), features(2)
    memory.write(wall, torch.full((8, 8), 4.0), LATENT, identity())
    near = torch.full((8, 8), math.inf)
    near[2:5, 2:5] = 2.0
    memory.write(box, near, LATENT, identity())
    read = memory.read(LATENT, identity())
    assert torch.equal(read.latents[:, 2:5, 2:5], box[:, 2:5, 2:5])
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:5, 2:5] = False
    assert torch.equal(read.latents[:, outside], wall[:, outside])


def test_sideways_camera_sees_features_shifted_by_predicted_pixels():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    latents = features(3)
    depth = 4.0
    memory.write(latents, torch.full((8, 8), depth), LATENT, identity())
    shift_pixels = 2
    # A latent pixel at depth d spans d / fx world units.
    pose = translated(x=shift_pixels * depth / LATENT.fx)
    read = memory.read(LATENT, pose)
    assert read.mask[:, : 8 - shift_pixels].all() and not read.mask[:, 8 - shift_pixels :].any()
    assert torch.equal(read.latents[:, :, : 8 - shift_pixels], latents[:, :, shift_pixels:])


@pytest.mark.parametrize("merge, kept_seed", [("first", 0), ("latest", 4)])
def test_rewriting_the_same_view_keeps_one_entry_per_voxel(merge, kept_seed):
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, merge=merge)
    depth = torch.full((8, 8), 3.0)
    for seed in range(5):
        memory.write(features(seed), depth, LATENT, identity())
    assert memory.stats()["entries"] == 64
    assert torch.equal(memory.read(LATENT, identity()).latents, features(kept_seed))


def test_a_returning_camera_reads_its_own_samples_past_a_thin_object_seen_elsewhere():
    """A post seen up close from elsewhere covers part of a pixel; the view from here saw the wall."""
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    wall = features(0)
    memory.write(wall, torch.full((8, 8), 4.0), LATENT, identity())
    # From 1 m to the right, a view whose centre pixel shows a post at 2 m that
    # projects into the original camera's pixel (4, 4).
    aside = identity()
    aside[0, 3] = 1.0
    post_depth = torch.full((8, 8), math.inf)
    post_depth[4, 2] = 2.0
    memory.write(features(1), post_depth, LATENT, aside)
    plain = LatentSpatialMemory(CHANNELS, voxel_size=0.05, revisit_radius=0.0)
    plain.write(wall, torch.full((8, 8), 4.0), LATENT, identity())
    plain.write(features(1), post_depth, LATENT, aside)
    assert plain.read(LATENT, identity()).depth.min() < 4.0, "the post must reach the original view for this test"
    read = memory.read(LATENT, identity())
    assert read.mask.all() and torch.equal(read.latents, wall.float())


def test_entries_in_one_voxel_merge_to_one():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=10.0)  # one voxel holds the whole wall
    # The wall spans x, y in [2.4, 7.6]: inside the single voxel [0, 10)^2.
    memory.write(features(), torch.full((8, 8), 3.0), LATENT, translated(x=5.0, y=5.0))
    assert memory.stats()["entries"] == 1


def test_closest_merge_keeps_the_detailed_view():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.5, merge="closest")
    close, far = features(5), features(6)
    wall_z = 4.0
    memory.write(close, torch.full((8, 8), wall_z), LATENT, identity())
    before = memory.read(LATENT, identity()).latents.clone()
    # The same wall seen from twice as far: its samples land in voxels already held.
    memory.write(far, torch.full((8, 8), 2 * wall_z), LATENT, translated(z=-wall_z))
    assert torch.equal(memory.read(LATENT, identity()).latents, before)


def test_batched_worlds_are_independent_and_match_single_worlds():
    batched = LatentSpatialMemory(CHANNELS, voxel_size=0.05, num_worlds=3)
    singles = [LatentSpatialMemory(CHANNELS, voxel_size=0.05) for _ in range(3)]
    poses = torch.stack([torch.from_numpy(CameraRig(0.1 * i, 0, 0, yaw=0.2 * i).c2w()) for i in range(3)])[:, None]
    latents = torch.stack([features(10 + i) for i in range(3)])[:, None]
    depth = torch.stack([torch.full((8, 8), 2.0 + i) for i in range(3)])[:, None]
    batched.write(latents, depth, LATENT, poses)
    for i, single in enumerate(singles):
        single.write(latents[i], depth[i], LATENT, poses[i])
    read = batched.read(LATENT, poses)
    for i, single in enumerate(singles):
        alone = single.read(LATENT, poses[i])
        assert torch.equal(read.latents[i], alone.latents)
        assert torch.equal(read.mask[i], alone.mask)
    batched.clear([1])
    assert batched.entries_per_world().tolist() == [64, 0, 64]
    assert not batched.read(LATENT, poses).mask[1].any()


def test_capacity_bound_evicts_least_recently_written_bricks():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, brick_size=2, max_bricks_per_world=80)
    for step in range(6):
        memory.write(features(step), torch.full((8, 8), 3.0), LATENT, translated(x=10.0 * step))
        assert memory.stats()["bricks"] <= 80
    # The newest view survives whole.
    assert memory.read(LATENT, translated(x=50.0)).mask.all()
    assert not memory.read(LATENT, translated(x=0.0)).mask.any()


def test_reads_batched_over_target_poses():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    memory.write(features(), torch.full((8, 8), 3.0), LATENT, identity())
    poses = torch.stack([identity(), translated(x=0.75), translated(x=100.0)])
    read = memory.read(LATENT, poses)
    assert read.latents.shape == (3, CHANNELS, 8, 8) and read.mask.shape == (3, 8, 8)
    assert read.mask[0].all() and read.mask[1].sum() == 56 and not read.mask[2].any()


def test_depth_at_image_resolution_is_pooled():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    depth_full = torch.full((64, 64), 3.0)
    memory.write(features(), depth_full, Camera.from_fov(64, 64, 90), identity())
    assert memory.read(LATENT, identity()).mask.all()
    patch = torch.tensor([[1.0, 5.0], [5.0, math.inf]])
    assert pool_depth(patch, 2).item() == 5.0


def test_save_load_round_trip_is_bit_exact(tmp_path):
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, merge="closest")
    for i in range(3):
        memory.write(features(i), 2 + torch.rand(8, 8), LATENT, translated(x=0.3 * i))
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    loaded = LatentSpatialMemory.load(path)
    assert loaded.config() == memory.config()
    for pose in (identity(), translated(x=0.45, z=-0.5)):
        a, b = memory.read(LATENT, pose), loaded.read(LATENT, pose)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.mask, b.mask) and torch.equal(a.depth, b.depth)
    # And it continues identically.
    for m in (memory, loaded):
        m.write(features(9), torch.full((8, 8), 2.5), LATENT, translated(x=1.0))
    assert torch.equal(memory.read(LATENT, identity()).latents, loaded.read(LATENT, identity()).latents)
    assert memory.stats() == loaded.stats()


def test_corrupt_files_give_clear_errors(tmp_path):
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    memory.write(features(), torch.full((8, 8), 3.0), LATENT, identity())
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(MemoryFileError, match="truncated or corrupted"):
        LatentSpatialMemory.load(truncated)

    tampered = tmp_path / "tampered.safetensors"
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    tampered.write_bytes(bytes(flipped))
    with pytest.raises(MemoryFileError, match="checksum"):
        LatentSpatialMemory.load(tampered)

    old = tmp_path / "old.safetensors"
    version = f'\\"version\\": {FORMAT_VERSION}'.encode()
    assert version in data
    old.write_bytes(data.replace(version, b'\\"version\\": 0'))
    with pytest.raises(MemoryFileError, match="version"):
        LatentSpatialMemory.load(old)

    with pytest.raises(MemoryFileError, match="does not exist"):
        LatentSpatialMemory.load(tmp_path / "missing.safetensors")
    assert path.read_bytes() == data  # a failed load never touches the file


def test_bad_inputs_raise_clear_errors():
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05)
    with pytest.raises(ValueError, match="channels"):
        memory.write(torch.zeros(3, 8, 8), torch.ones(8, 8), LATENT, identity())
    with pytest.raises(ValueError, match="NaN"):
        memory.write(features(), torch.full((8, 8), float("nan")), LATENT, identity())
    nan_pose = identity()
    nan_pose[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        memory.read(LATENT, nan_pose)
    with pytest.raises(ValueError, match="farther than"):
        memory.write(features(), torch.full((8, 8), 1e9), LATENT, identity())


def test_image_depth_lifts_a_corner_pixel_onto_the_surface_it_mostly_shows():
    """A latent pixel mostly covered by an L-shaped corner whose gap holds its centre lands on the corner."""
    image = Camera.from_fov(64, 64, 90)
    depth = torch.full((64, 64), 4.0)
    depth[24:32, 24:27] = 2.0  # within latent pixel (3, 3): the left three columns ...
    depth[24:27, 27:32] = 2.0  # ... and the top three rows: 39 of 64 pixels, not the centre
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.01)
    memory.write(features(), depth, LATENT, identity())
    points = memory.stored_points().double()
    near = points[points[:, 2] < 3.0]
    assert near.shape[0] == 1 and near[0, 2].item() == pytest.approx(2.0)
    u, v = (near[0, :2] / near[0, 2] * image.fx + image.cx).tolist()
    assert depth[int(v), int(u)] == 2.0, "the lifted point must see the corner, not the wall behind the gap"


def test_chunk_culling_never_changes_what_a_read_returns(tmp_path):
    """Culling is conservative: coarse chunks read exactly what one-brick chunks read."""
    generator = torch.Generator().manual_seed(7)
    memories = [LatentSpatialMemory(CHANNELS, voxel_size=0.1, num_worlds=2, chunk_size=size, max_bricks_per_world=300)
                for size in (8, 1)]
    rigs = [CameraRig(x, 0.0, z, yaw=yaw) for x, z, yaw in
            [(0.0, 0.0, 0.0), (-3.0, 1.0, 2.0), (2.0, -4.0, -1.0), (-1.0, -2.0, 3.0), (5.0, 3.0, 0.7)]]
    poses = torch.stack([torch.from_numpy(rig.c2w()) for rig in rigs])
    for step, pose in enumerate(poses):
        depth = 1.0 + 4.0 * torch.rand(2, 1, 8, 8, generator=generator)
        latents = torch.randn(2, 1, CHANNELS, 8, 8, generator=generator)
        for memory in memories:
            memory.write(latents, depth, LATENT, pose.expand(2, 1, 4, 4))
            if step == 3:
                memory.clear([1])

    def reads(memory):
        return memory.read(LATENT, poses[None].expand(2, -1, -1, -1))

    coarse, fine = reads(memories[0]), reads(memories[1])
    assert coarse.mask.any() and memories[0].stats()["bricks"] == memories[1].stats()["bricks"]
    assert torch.equal(coarse.mask, fine.mask) and torch.equal(coarse.latents, fine.latents)
    path = tmp_path / "memory.safetensors"
    memories[0].save(path)
    loaded = reads(LatentSpatialMemory.load(path))
    assert torch.equal(loaded.latents, coarse.latents) and torch.equal(loaded.mask, coarse.mask)


def test_entries_freed_by_clearing_a_world_are_reused():
    """Episode after episode in the same batch slot, the entry pool does not grow."""
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, num_worlds=2)
    depth = torch.full((2, 1, 8, 8), 3.0)
    for episode in range(4):
        memory.write(torch.randn(2, 1, CHANNELS, 8, 8), depth, LATENT, identity().expand(2, 1, 4, 4))
        if episode == 0:
            pool, held = memory.entries_in_use, memory.stats()["bytes"]
        memory.clear([1])
    assert memory.entries_in_use == pool and memory.stats()["bytes"] == held
    assert memory.entries_per_world().tolist() == [64, 0]
    assert memory.read(LATENT, identity().expand(2, 1, 4, 4)).mask[1].sum() == 0


def test_a_full_memory_evicts_in_batches_not_on_every_write():
    """Over the bound, eviction frees down to 7/8 of it, so the next small writes need none."""
    memory = LatentSpatialMemory(CHANNELS, voxel_size=0.05, brick_size=2, max_bricks_per_world=80)
    depth = torch.full((8, 8), 3.0)
    memory.write(features(0), depth, LATENT, translated(x=0.0))  # 64 bricks, one per latent pixel
    memory.write(features(1), depth, LATENT, translated(x=10.0))  # 128 wanted > 80: evict down to 70
    assert memory.stats()["bricks"] == 70
    few = torch.zeros(8, 8, dtype=torch.bool)
    few[0] = True  # 8 new bricks: 78 <= 80, nothing evicted
    memory.write(features(2), depth, LATENT, translated(x=20.0), keep=few)
    assert memory.stats()["bricks"] == 78
    assert memory.read(LATENT, translated(x=0.0)).mask.sum() == 6, "the 6 survivors of the first view stay"


def test_eviction_never_reuses_a_brick_the_same_write_is_filling(tmp_path):
    """A write that overfills the bound evicts older bricks only: its own entries stay where they belong."""
    camera = Camera.from_fov(16, 16, 90.0)
    memory = LatentSpatialMemory(4, voxel_size=0.05, max_bricks_per_world=64, merge="latest")
    generator = torch.Generator().manual_seed(0)
    for x in (0.0, 0.1, 0.3, 0.6, 1.2, 2.0):
        pose = torch.eye(4, dtype=torch.float64)
        pose[0, 3] = x
        latents = torch.randn(1, 1, 4, 16, 16, generator=generator)
        memory.write(latents, torch.full((1, 1, 16, 16), 2.0), camera, pose[None, None])
    read = memory.read(camera, pose[None, None])
    assert read.mask.all()
    torch.testing.assert_close(read.latents, latents.to(read.latents.dtype), atol=1e-2, rtol=0)
    memory.save(tmp_path / "m.safetensors")  # the file check refuses entries outside their brick
    LatentSpatialMemory.load(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="max_bricks_per_world must be an integer >= 64"):
        LatentSpatialMemory(4, max_bricks_per_world=10)


def test_the_same_cell_of_many_worlds_hashes_to_many_slots():
    """A key's home slot depends on its world bits too: when it did not, the same brick of 64 worlds shared
    one home slot and every lookup walked a probe chain as long as the number of worlds."""
    from mirage_env.memory.keys import KeyTable, pack
    from mirage_env.memory.keys_kernels import _home

    table = KeyTable(capacity=4096, device=torch.device("cpu"))
    coords = torch.tensor([[32768, 32770, 32767]]).expand(64, 3)
    keys = pack(torch.arange(64), coords)
    homes = KeyTable._hash(keys) & table.mask
    assert homes.unique().numel() >= 48  # 64 random homes among 8192 slots: ~63.8 distinct
    assert homes.tolist() == [int(_home(k)) & table.mask for k in keys.numpy()]  # the kernels probe the same slots
    table.insert(keys, torch.arange(64))
    assert table.lookup(keys).tolist() == list(range(64))


def test_torch_lookups_follow_probe_sequences_longer_than_one_batch_of_probes(monkeypatch):
    """KeyTable.lookup on the torch path reads the first slots of every key at once and follows the longer
    probe sequences one slot at a time: keys sharing one home slot, more of them than one batch reads, are
    all found, and absent keys (also sharing it, or not) are not."""
    from mirage_env import compiled
    from mirage_env.memory import keys as keys_module
    from mirage_env.memory.keys import KeyTable

    monkeypatch.setenv(compiled.KERNELS_ENV, "0")
    table = KeyTable(capacity=64, device=torch.device("cpu"))
    candidates = torch.arange(1, 200_000, dtype=torch.int64)
    homes = KeyTable._hash(candidates) & table.mask
    crowded = candidates[homes == 5]
    assert crowded.numel() > keys_module._PROBES + 4
    stored, absent = crowded[: keys_module._PROBES + 3], crowded[keys_module._PROBES + 3:][:2]
    others = candidates[(homes > 40) & (homes < 50)][:20]
    table.insert(torch.cat([stored, others]), torch.arange(stored.numel() + others.numel()))
    queries = torch.cat([stored, others, absent, torch.tensor([10**12, 10**13])])
    expected = list(range(stored.numel() + others.numel())) + [-1] * 4
    assert table.lookup(queries).tolist() == expected
