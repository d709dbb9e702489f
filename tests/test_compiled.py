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
    """Every observation, the generated latents, depth, the memory's read and the whole memory after each step."""
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
                    "entries": world.memory.entries_per_world().numpy().copy(), **memory_state(world.memory)})
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


def test_the_kernels_threads_follow_torchs_thread_count(monkeypatch):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(compiled, "_matched_threads", {})
    before = numba.get_num_threads()  # restored after, so the real record of matched counts stays true
    numba.set_num_threads(1)  # as if numba had been left at another count than torch's
    try:
        with torch_threads(1):
            assert not compiled.parallel_kernels()
        with torch_threads(2):
            assert compiled.parallel_kernels()
            assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        numba.set_num_threads(before)

def test_a_kernel_that_cannot_load_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "1")
    monkeypatch.setattr(compiled, "_broken", None)
    with pytest.warns(RuntimeWarning, match="torch path"):
        compiled.disable_kernels("test: compiler missing")
    assert not compiled.kernels_enabled("cpu")
    env = MirageEnv(image_size=32)
    env.reset(seed=0)
    env.step(0)  # runs on the torch path, no error


def test_a_kernel_module_that_cannot_be_imported_turns_the_kernels_off_with_one_warning(monkeypatch):
    monkeypatch.setenv(compiled.KERNELS_ENV, "1")
    monkeypatch.setattr(compiled, "_broken", None)
    assert compiled.kernel_module("mirage_env.memory.lift_kernels") is compiled.kernel_module("mirage_env.memory.lift_kernels")
    with pytest.warns(RuntimeWarning, match="torch path.*no_such_kernels"):
        assert compiled.kernel_module("mirage_env.no_such_kernels") is None
    assert not compiled.kernels_enabled("cpu")


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

    monkeypatch.setattr(procedural_kernels, "front", broken)
    env = MirageEnv(image_size=32)
    with pytest.warns(RuntimeWarning, match="torch path"):
        observation = env.reset(seed=1)[0]
    np.testing.assert_array_equal(observation["rgb"], expected)


def memory_state(memory) -> dict[str, np.ndarray]:
    """Everything a memory holds, storage beyond what is in use included (capacities, hash tables, free lists)."""
    index, pool = memory._index, memory._pool
    held = {name: value for name, value in memory.state_tensors(copy=True).items()}
    held |= {"pool.features": pool.features, "pool.points": pool.points, "pool.depth": pool.observed_depth,
             "pool.origins": pool.origins, "pool.last_write": pool.last_write, "table.keys": index.table.keys,
             "table.values": index.table.values, "chunk.keys": index.chunks.keys, "chunk.members": index.chunks.members,
             "chunk.member_bits": index.chunks.member_bits,
             "entry_of": index.entry_of, "occupancy": index.occupancy, "brick.last_write": index.last_write}
    assert_occupancy_matches_entries(index)
    state = {name: value.detach().clone().view(torch.int16) if value.dtype == torch.bfloat16 else value.detach().clone()
             for name, value in held.items()}
    return {name: value.numpy() for name, value in state.items()} | {
        "in_use": np.array([index.in_use, pool.in_use, index.step])}


def assert_bits_match(words: np.ndarray, flags: np.ndarray) -> None:
    """Bit k % 64 of word k // 64 of each row is set exactly where ``flags[row, k]``, and no bit beyond."""
    words = words.view(np.uint64)
    k = np.arange(flags.shape[1])
    bits = (words[:, k // 64] >> (k % 64).astype(np.uint64)) & np.uint64(1)
    np.testing.assert_array_equal(bits.astype(bool), flags)
    if flags.shape[1] % 64:
        assert (words[:, -1] >> np.uint64(flags.shape[1] % 64) == 0).all()


def assert_occupancy_matches_entries(index) -> None:
    """A brick's occupancy bits are set exactly where its voxels hold an entry, a chunk's member bits where it
    has a brick (whichever path kept them)."""
    assert_bits_match(index.occupancy.numpy(), index.entry_of.numpy() >= 0)
    assert_bits_match(index.chunks.member_bits.numpy(), index.chunks.members.numpy() >= 0)


@pytest.mark.parametrize("merge,feature_dtype,bound", [("first", torch.float16, 64), ("closest", torch.bfloat16, 64),
                                                       ("latest", torch.float32, 64), ("first", torch.float16, 4096)])
@pytest.mark.parametrize("threads", [1, 2])
def test_memory_writes_and_reads_are_bit_exact_with_the_torch_path(monkeypatch, merge, feature_dtype, bound, threads):
    # Two worlds, latent- and image-resolution depth, sub-batches, a bound small enough to evict (64) or
    # one that lets the compiled allocation place new bricks in room already there (4096), a pool
    # that grows: the write and read kernels against the torch code, whole memories compared.
    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    image = Camera.from_fov(32, 32, 90)
    latent = image.scaled(1 / 8)
    poses = loop_poses(12, 2)  # (12, 2, 4, 4)

    def run(kernels: bool):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        generator = torch.Generator().manual_seed(3)
        memory = LatentSpatialMemory(6, voxel_size=0.07, num_worlds=2, merge=merge, feature_dtype=feature_dtype,
                                     max_bricks_per_world=bound)
        out = []
        for step, segment in enumerate(poses):
            shifted = segment.clone()
            shifted[:, 1, 3] += 0.01 * step  # the second world a little lower each step: new voxels, merges
            both = torch.stack([segment, shifted])
            image_resolution = step % 2 == 0
            camera = image if image_resolution else latent
            depth = torch.stack([room_depth(camera, pose) for pose in both])
            if step % 3 == 0:
                depth[:, :, :2] = torch.inf  # sky: not written
            latents = torch.randn(2, 2, 6, 4, 4, generator=generator)
            keep = torch.rand(2, 2, 4, 4, generator=generator) > 0.2
            if step % 4 == 3:  # a sub-batch: world 1 only
                memory.write(latents[1:], depth[1:], latent, both[1:], keep=keep[1:], worlds=[1])
            else:
                memory.write(latents, depth, latent, both, keep=keep)
            read = memory.read(latent, both)
            out.append({"read_latents": read.latents.numpy(), "read_mask": read.mask.numpy(),
                        "read_depth": read.depth.numpy(), "read_points": read.points.numpy(),
                        **memory_state(memory)})
        return out

    with torch_threads(threads):
        fast, oracle = run(True), run(False)
    assert_same(fast, oracle)


@pytest.mark.parametrize("brick_size,horizon", [(2, None), (5, None), (4, 3)])
def test_the_read_kernel_reads_what_the_torch_read_reads_after_any_change(monkeypatch, brick_size, horizon):
    # One memory, read by both paths after every kind of change to which voxels hold entries: writes
    # (with a horizon, the torch write and its expiry), a save and load, clearing one world; bricks of
    # 8 and 125 voxels (one and two occupancy words).
    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    latent = Camera.from_fov(8, 8, 90)
    poses = loop_poses(10, 1)[:, 0]
    generator = torch.Generator().manual_seed(4)
    memory = LatentSpatialMemory(5, voxel_size=0.1, num_worlds=2, brick_size=brick_size, horizon=horizon)

    def read_both(memory, views):
        out = []
        for kernels in (True, False):
            monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
            read = memory.read(latent, views)
            out.append([read.latents.numpy(), read.mask.numpy(), read.depth.numpy(), read.points.numpy()])
        for fast, oracle in zip(*out):
            np.testing.assert_array_equal(fast, oracle)
        assert_occupancy_matches_entries(memory._index)
        return out[0][1].sum()

    hits = 0
    for step, pose in enumerate(poses):
        both = torch.stack([pose, poses[(step + 3) % len(poses)]])[:, None]
        monkeypatch.setenv(compiled.KERNELS_ENV, "1")
        memory.write(torch.randn(2, 1, 5, 8, 8, generator=generator), torch.stack([room_depth(latent, p) for p in both]),
                     latent, both)
        hits += read_both(memory, both)
    loaded = LatentSpatialMemory.from_state(memory.config(), memory.state_tensors(copy=True))
    hits += read_both(loaded, both)
    loaded.clear(worlds=[0])
    read_both(loaded, both)
    assert hits > 0


def test_writes_of_any_input_kind_and_bad_inputs_give_what_the_torch_path_gives(monkeypatch):
    # The compiled write takes float64 CPU poses and float32 depth as they come; anything else (float32
    # poses, float64 or numpy depth, latents that need grad, fp16 latents) goes through the same checks and
    # conversions as the torch path. Bad inputs raise the same errors and change nothing.
    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    image = Camera.from_fov(32, 32, 90)
    latent = image.scaled(1 / 8)
    poses = loop_poses(6, 2)[:, :, None]  # (6, 2, 1, 4, 4): two frames, one world

    def run(kernels: bool):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        generator = torch.Generator().manual_seed(5)
        memory = LatentSpatialMemory(4, voxel_size=0.08)
        out = []
        for step, segment in enumerate(poses):
            segment = segment[:, 0]  # (2, 4, 4)
            camera = image if step % 2 else latent
            depth = room_depth(camera, segment)
            latents = torch.randn(2, 4, 4, 4, generator=generator)
            kind = step % 6
            if kind == 1:
                segment = segment.to(torch.float32)
            elif kind == 2:
                depth = depth.to(torch.float64).numpy()
            elif kind == 3:
                latents = latents.to(torch.float16)
            elif kind == 4:
                latents = latents.requires_grad_()
            elif kind == 5:
                depth = depth.numpy()
            before = memory_state(memory)
            for bad in ({"depth": torch.full_like(torch.as_tensor(depth), float("nan"))},
                        {"depth": torch.zeros(3, 5, 5)}, {"poses": segment[:1]}):
                arguments = {"latents": latents, "depth": depth, "camera": latent, "poses": segment} | bad
                with pytest.raises((ValueError, RuntimeError)) as error:
                    memory.write(**arguments)
                out.append({"error": np.array(f"{error.type.__name__}: {error.value}")})
                assert_same([memory_state(memory)], [before])
            memory.write(latents, depth, latent, segment, keep=torch.rand(2, 4, 4, generator=generator) > 0.3)
            read = memory.read(latent, segment)
            out.append({"read_latents": read.latents.numpy(), "read_mask": read.mask.numpy(), **memory_state(memory)})
        return out

    fast, oracle = run(True), run(False)
    assert_same(fast, oracle)


def test_selection_gives_the_value_a_sort_puts_there():
    from mirage_env.memory.lift_kernels import kth_smallest

    rng = np.random.default_rng(0)
    for trial in range(2000):
        n = int(rng.integers(1, 80))
        values = rng.choice([0.5, 1.0, 2.0, np.inf, 3.25], n) if trial % 2 else rng.random(n)
        values = values.astype(np.float32)
        if trial % 7 == 0:
            values[rng.integers(0, n)] = np.nan
        k = int(rng.integers(0, n))
        np.testing.assert_array_equal(kth_smallest(values.copy(), k), np.sort(values)[k])


def test_the_kernels_world_to_camera_poses_are_torchs():
    from mirage_env.geometry import invert_pose, poses_from_rigs
    from mirage_env.memory.raster_kernels import world_to_camera_one

    rng = np.random.default_rng(1)
    rigs = np.concatenate([rng.normal(0, 30, (20000, 3)), rng.uniform(-np.pi, np.pi, (20000, 3))], 1)
    c2w = poses_from_rigs(rigs)
    c2w[:100, :3, 3] = 0.0  # zero translations: signed zeros must match too
    expected = invert_pose(torch.from_numpy(c2w)).to(torch.float32).numpy()
    got = np.stack([world_to_camera_one(pose) for pose in c2w])
    np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_pose_kernel_passes_exactly_the_poses_check_pose_passes(dtype):
    from mirage_env.geometry import check_pose, poses_from_rigs
    from mirage_env.memory.shape_kernels import rigid_and_finite

    rng = np.random.default_rng(3)
    rigs = np.concatenate([rng.normal(0, 30, (3000, 3)), rng.uniform(-np.pi, np.pi, (3000, 3))], 1)
    poses = poses_from_rigs(rigs).astype(dtype)
    for k, pose in enumerate(poses):  # spoil most of them, a little or a lot, near check_pose's tolerance
        kind = k % 6
        where = (rng.integers(0, 4), rng.integers(0, 4))
        if kind == 1:
            pose[where] = rng.choice([np.nan, np.inf, -np.inf])
        elif kind in (2, 3):
            column = rng.integers(0, 4)
            limit = 2e-5 if column == 3 else 1e-5
            pose[3, column] += rng.choice([-1, 1]) * limit * rng.choice([0.5, 0.999999, 1.0, 1.000001, 2.0])
        elif kind == 4:
            pose[3, rng.integers(0, 4)] = np.nextafter(pose[3, 3], np.inf)
    answers = []
    for pose in poses:
        try:
            check_pose(torch.from_numpy(pose))
            expected = True
        except ValueError:
            expected = False
        answers.append(expected)
        assert rigid_and_finite(pose.reshape(1, 16)) == expected
    assert 0.2 < np.mean(answers) < 0.9  # both answers are exercised
    assert rigid_and_finite(poses[np.array(answers)].reshape(-1, 16))
    assert not rigid_and_finite(poses.reshape(-1, 16))


@pytest.mark.parametrize("scene", ["indoor", "outdoor"])
def test_the_collision_kernel_blocks_exactly_the_moves_the_numpy_code_blocks(monkeypatch, scene):
    from mirage_env.backends.procedural import ProceduralWorldModel

    model = ProceduralWorldModel(image_size=(16, 16), scene=scene)
    model.start(torch.eye(4, dtype=torch.float64).expand(4, 1, 4, 4), [torch.Generator().manual_seed(s) for s in range(4)])
    rng = np.random.default_rng(2)
    n = 4000
    worlds = rng.integers(0, 4, n)
    start = rng.uniform(-6, 6, (n, 3)) * [1, 0.3, 1]
    step = rng.normal(0, 0.3, (n, 3)) * (rng.random((n, 1)) > 0.1)  # a tenth stand still
    step[rng.random(n) < 0.2, 0] = 0.0  # moves along one axis only: a slab test's degenerate case
    end = start + step
    answers = {}
    for kernels in (True, False):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        answers[kernels] = model.blocked(torch.from_numpy(worlds), start, end, 0.3).numpy()
    np.testing.assert_array_equal(answers[True], answers[False])
    assert 0.05 < answers[True].mean() < 0.95  # both kinds of answer are exercised


def test_a_memory_copied_pickled_cleared_or_loaded_between_compiled_writes_stays_the_torch_paths(monkeypatch):
    # The compiled path keeps numpy views of storage and scratch between calls. A deep copy or a pickle
    # must make views of its own tensors (a copied view would write into the original's memory or a
    # detached array), and clear, load and pool growth must renew them: each memory below takes the
    # same writes on both paths, through every one of those, and ends equal to the oracle.
    import copy
    import pickle

    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    image = Camera.from_fov(32, 32, 90)
    latent = image.scaled(1 / 8)
    poses = loop_poses(8, 2)  # (8, 2, 4, 4)

    def run(kernels: bool):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        generator = torch.Generator().manual_seed(9)
        memory = LatentSpatialMemory(6, voxel_size=0.06, num_worlds=2)
        out, parents = [], []
        for step, segment in enumerate(poses):
            both = torch.stack([segment, segment.flip(0)])
            camera = image if step % 2 else latent
            depth = torch.stack([room_depth(camera, pose) for pose in both])
            memory.write(torch.randn(2, 2, 6, 4, 4, generator=generator), depth, latent, both,
                         keep=torch.rand(2, 2, 4, 4, generator=generator) > 0.1)
            read = memory.read(latent, both)
            out.append({"read_latents": read.latents.numpy(), "read_points": read.points.numpy(),
                        "entries": memory.entries_per_world().numpy(), **memory_state(memory)})
            parent = memory
            if step == 1:
                memory = copy.deepcopy(memory)
            elif step == 2:
                memory = pickle.loads(pickle.dumps(memory))
            elif step == 3:
                memory.clear(worlds=[1])
            elif step == 4:
                memory = LatentSpatialMemory.from_state(memory.config(), memory.state_tensors(copy=True))
            elif step == 5:
                memory.clear()
            if memory is not parent:
                parents.append((parent, memory_state(parent)))
        for parent, before in parents:  # what the copies took changed nothing of what they were copied from
            assert_same([memory_state(parent)], [before])
        return out

    fast, oracle = run(True), run(False)
    assert_same(fast, oracle)


def test_the_write_kernels_float16_rounding_is_torchs():
    # Float32 latents are rounded to a float16 pool inside the write kernel: to nearest, ties to even,
    # overflow to inf, subnormals, signed zeros, exactly as torch rounds (checked offline on every
    # float32 but NaN; here every rounding boundary and a million random bit patterns).
    from numba import njit

    from mirage_env.memory.write_kernels import half_bits

    @njit(cache=False)
    def convert(bits):
        out = np.empty(bits.shape[0], np.int16)
        for i in range(bits.shape[0]):
            out[i] = half_bits(np.int64(bits[i]))
        return out

    rng = np.random.default_rng(0)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)]
    edges = halves.view(np.uint32)[:, None] + np.arange(-2, 3, dtype=np.int64)[None]  # around every half
    ties = (halves.view(np.uint32).astype(np.int64) + (1 << 12))[:, None] + np.arange(-1, 2)[None]  # midpoints
    bits = np.concatenate([edges.ravel(), ties.ravel(), rng.integers(0, 1 << 32, 1 << 20),
                           np.array([0x477FEFFF, 0x477FF000, 0x477FF001, 0x7F800000, 0xFF800000, 0x80000000])])
    bits = (bits % (1 << 32)).astype(np.uint32)
    bits = bits[~np.isnan(bits.view(np.float32))]
    expected = torch.from_numpy(bits.view(np.float32)).to(torch.float16).view(torch.int16).numpy()
    np.testing.assert_array_equal(convert(bits), expected)


def test_latents_with_nan_inf_and_out_of_range_values_are_stored_as_the_torch_path_stores_them(monkeypatch):
    # NaN is left to torch's conversion (the kernel hands it back before changing anything); inf,
    # values beyond float16's range and below its smallest subnormal are rounded by the kernel.
    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    latent = Camera.from_fov(8, 8, 90)
    poses = loop_poses(4, 1)[:, 0]
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 7e4, 65519.0, 65520.0,
                             -1e-8, 3e-8, 6e-8, 1e-40])

    def run(kernels: bool):
        monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
        generator = torch.Generator().manual_seed(2)
        memory = LatentSpatialMemory(len(specials), voxel_size=0.1)
        out = []
        for step, pose in enumerate(poses):
            latents = torch.randn(1, len(specials), 8, 8, generator=generator) * 10
            if step % 2 == 0:  # with NaN: the kernel gives the conversion back to torch
                latents[0, :, 2, 3] = specials
            else:
                latents[0, :, 2, 3] = specials.nan_to_num(nan=0.5)
            memory.write(latents, room_depth(latent, pose[None]), latent, pose[None])
            out.append(memory_state(memory))
        return out

    fast, oracle = run(True), run(False)
    assert_same(fast, oracle)


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("bound,horizon", [(64, None), (4096, None), (4096, 2)])
def test_entries_gained_is_what_entries_per_world_changed_by_in_the_last_write(monkeypatch, kernels, bound, horizon):
    # Eviction (a bound of 64 bricks) and expiry (a horizon) take entries away within a write; a
    # sub-batch leaves other worlds alone; a write that raises changes nothing; clear and load start at zero.
    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    monkeypatch.setenv(compiled.KERNELS_ENV, "1" if kernels else "0")
    image = Camera.from_fov(32, 32, 90)
    latent = image.scaled(1 / 8)
    poses = loop_poses(10, 2)
    generator = torch.Generator().manual_seed(6)
    memory = LatentSpatialMemory(3, voxel_size=0.05, num_worlds=2, max_bricks_per_world=bound, horizon=horizon)
    assert memory.entries_gained().tolist() == [0, 0]
    changes = []
    for step, segment in enumerate(poses):
        both = torch.stack([segment, segment.flip(0)])
        camera = image if step % 2 else latent
        depth = torch.stack([room_depth(camera, pose) for pose in both])
        latents = torch.randn(2, 2, 3, 4, 4, generator=generator)
        before = memory.entries_per_world()
        if step % 3 == 2:
            memory.write(latents[1:], depth[1:], latent, both[1:], worlds=[1])
        else:
            memory.write(latents, depth, latent, both)
        gained = memory.entries_gained()
        assert gained.dtype == torch.int64
        torch.testing.assert_close(gained, memory.entries_per_world() - before, rtol=0, atol=0)
        changes.append(gained)
        with pytest.raises(ValueError):
            memory.write(latents, torch.full_like(depth, float("nan")), latent, both)
        torch.testing.assert_close(memory.entries_gained(), gained, rtol=0, atol=0)
    if bound == 64:  # eviction outweighed what some writes added
        assert any((c < 0).any() for c in changes)
    assert copy_of(memory).entries_gained().tolist() == gained.tolist()
    loaded = LatentSpatialMemory.from_state(memory.config(), memory.state_tensors(copy=True))
    assert loaded.entries_gained().tolist() == [0, 0]
    memory.clear()
    assert memory.entries_gained().tolist() == [0, 0]


def copy_of(memory):
    import copy

    return copy.deepcopy(memory)


@pytest.mark.parametrize("threads", [1, 2])
def test_reads_of_some_worlds_in_any_order_are_the_torch_paths(monkeypatch, threads):
    # The read kernel visits each view's own world's chunks (grouped once per read), not every chunk:
    # sub-batches, reordered worlds and a world named twice (as on the torch path, only its last
    # place in the batch reads it) must give the torch read, view for view.
    from mirage_env.baselines.memory_bench import loop_poses, room_depth
    from mirage_env.geometry import Camera
    from mirage_env.memory import LatentSpatialMemory

    latent = Camera.from_fov(8, 8, 90)
    poses = loop_poses(6, 3)  # (6, 3, 4, 4)
    generator = torch.Generator().manual_seed(1)
    monkeypatch.setenv(compiled.KERNELS_ENV, "1")
    memory = LatentSpatialMemory(4, voxel_size=0.1, num_worlds=3)
    for segment in poses:
        memory.write(torch.randn(3, 1, 4, 8, 8, generator=generator),
                     torch.stack([room_depth(latent, pose[None]) for pose in segment]), latent, segment[:, None])
    with torch_threads(threads):
        for worlds in ([2, 0], [1], [2, 1, 0], [1, 1], [0, 2, 0]):
            views = poses[1:3, worlds].transpose(0, 1)  # two frames each
            reads = []
            for kernels in ("1", "0"):
                monkeypatch.setenv(compiled.KERNELS_ENV, kernels)
                read = memory.read(latent, views, worlds=worlds)
                reads.append([read.latents.numpy(), read.mask.numpy(), read.depth.numpy(), read.points.numpy()])
            for fast, oracle in zip(*reads):
                np.testing.assert_array_equal(fast, oracle)
            assert reads[0][1][-1].any()


def test_the_write_kernels_voxel_order_is_a_stable_argsort():
    # Winners come out in ascending (brick slot, voxel) order with a voxel's samples in their order,
    # as torch.unique sorts; the kernel's counting sort (many samples) and argsort (few) must both give it.
    from mirage_env.memory.write_kernels import _voxel_order

    rng = np.random.default_rng(0)
    for trial in range(600):
        voxels_per_brick = int(rng.choice([8, 64, 125]))
        slots = int(rng.integers(1, 300))
        n = int(rng.integers(0, 400)) if trial % 2 else int(rng.integers(0, max(1, slots // 16)))
        slot, local = rng.integers(0, slots, n), rng.integers(0, voxels_per_brick, n)
        if trial % 3 == 0:
            slot = np.sort(slot)  # a frame's samples: runs of one brick
        voxel = slot * voxels_per_brick + local
        np.testing.assert_array_equal(_voxel_order(voxel, slot, local, voxels_per_brick, slots),
                                      np.argsort(voxel, kind="mergesort"))
