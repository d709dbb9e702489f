"""Nothing lost, nothing let in: validated world files, all-or-nothing loads, atomic saves,
snapshots and forks, and one thread at a time per env."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mirage_env.memory.fileformat as fileformat
from mirage_env.env import MirageEnv
from mirage_env.geometry import Move
from mirage_env.memory import LatentSpatialMemory, MemoryFileError, load_state, save_state
from mirage_env.multi_agent import MirageParallelEnv
from mirage_env.vector import MirageVectorEnv

MOVES = [Move.FORWARD, Move.TURN_RIGHT, Move.FORWARD]
LATER = [Move.FORWARD, Move.TURN_LEFT, Move.STRAFE_LEFT]


def make(**options):
    return MirageEnv(**{"max_episode_steps": 50, "image_size": 32, **options})


def played(seed=0, moves=MOVES, **options):
    env = make(**options)
    env.reset(seed=seed)
    for move in moves:
        env.step(move)
    return env


def assert_same(step_a, step_b):
    (obs_a, *rest_a), (obs_b, *rest_b) = step_a, step_b
    assert obs_a.keys() == obs_b.keys()
    for key in obs_a:
        assert np.array_equal(obs_a[key], obs_b[key]), key
    assert rest_a == rest_b


def same_steps(a, b, moves=LATER):
    """Both envs (or ``a`` and the recorded steps ``b``) give identical observations, rewards, flags and infos."""
    for i, move in enumerate(moves):
        assert_same(a.step(move), b[i] if isinstance(b, list) else b.step(move))
    return True


def read_raw(path):
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["mirage_env"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return meta, tensors


def rewrite(path, out, edit):
    """Copy a world file with ``edit(meta, tensors)`` applied and its checksum recomputed (an edit that
    the checksum cannot catch: only validation can)."""
    meta, tensors = read_raw(path)
    edit(meta, tensors)
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "kind", "config", "sha256")}
    save_state(out, kind=meta["kind"], config=meta.get("config"), tensors=tensors, extra=extra)
    return out


def temp_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp") or name.startswith(".tmp"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A world file of a pointnav episode (the task has state) mid-way."""
    path = tmp_path_factory.mktemp("saved") / "world.safetensors"
    played(seed=3, task="pointnav").save_world(path)
    return path


@pytest.fixture(scope="module")
def untouched():
    """The steps ``LATER`` of an env that no load touched (the twin of every env a load refuses)."""
    env = played(seed=11, task="pointnav")
    return [env.step(move) for move in LATER]


# ----------------------------------------------------------------------------- tampered files


def _set(tensor_name, index, value):
    def edit(meta, tensors):
        tensors[tensor_name][index] = value
    return edit


def _duplicate_key(meta, tensors):
    tensors["memory.brick_keys"][1] = tensors["memory.brick_keys"][0]


def _entry_in_two_voxels(meta, tensors):
    entry_of = tensors["memory.entry_of"]
    stored, empty = torch.nonzero(entry_of >= 0)[0], torch.nonzero(entry_of < 0)[0]
    entry_of[tuple(empty)] = entry_of[tuple(stored)]


def _config(*keys, value=None, delete=False):
    def edit(meta, tensors):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        if delete:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value(node[keys[-1]]) if callable(value) else value
    return edit


def _retype(name, dtype):
    def edit(meta, tensors):
        tensors[name] = tensors[name].to(dtype)
    return edit


def _drop(name):
    def edit(meta, tensors):
        del tensors[name]
    return edit


TAMPERED = {
    "nan feature": (_set("memory.features", (0, 0), float("nan")), r"memory\.features holds NaN"),
    "nan point": (_set("memory.points", (2, 1), float("nan")), r"memory\.points holds NaN"),
    "negative brick key": (_set("memory.brick_keys", 0, -7), r"memory\.brick_keys holds keys"),
    "duplicate brick key": (_duplicate_key, r"memory\.brick_keys holds duplicate keys"),
    "entry in two voxels": (_entry_in_two_voxels, r"memory\.entry_of holds duplicate entry indices"),
    "changed voxel size": (_config("config", "memory", "voxel_size", value=lambda v: 2 * v),
                           r"memory\.points has \d+ stored point\(s\) outside the voxel .* voxel_size="),
    "features of another dtype": (_retype("memory.features", torch.float32),
                                  r"memory\.features must be float16 of shape"),
    "feature_dtype not a dtype": (_config("config", "memory", "feature_dtype", value="tensor"),
                                  r"config\.memory\.feature_dtype must be one of"),
    "clock of another dtype": (_retype("memory.write_clock", torch.int32), r"memory\.write_clock must be int64"),
    "huge capacity tensor": (_set("memory.capacity", slice(None), 1 << 30), r"memory\.capacity is \[1073741824"),
    "huge brick_size": (_config("config", "memory", "brick_size", value=4096),
                        r"config\.memory\.brick_size must be an integer in \[1, 32\]"),
    "huge num_worlds": (_config("config", "num_worlds", value=10**9), r"config\.num_worlds is 1000000000"),
    "bool num_worlds": (_config("config", "num_worlds", value=True), r"config\.num_worlds must be an integer"),
    "missing memory config": (_config("config", "memory", delete=True), r"config\.memory is missing"),
    "missing config field": (_config("config", "memory", "merge", delete=True), r"config\.memory\.merge is missing"),
    "unknown config field": (_config("config", "memory", "colour", value=1), r"config\.memory\.colour is not a field"),
    "missing rng": (_drop("rng.0"), r"rng\.0 is missing"),
    "garbage rng": (_set("rng.0", slice(None), 0), r"rng\.0"),
    "missing tail": (_drop("tail.latents"), r"tail\.latents is missing"),
    "nan tail pose": (_set("tail.poses", (0, 0, 0, 3), float("nan")), r"tail\.poses holds NaN"),
    "started without segments": (_set("segments_generated", 0, 0), r"segments_generated disagrees with started"),
    "nan scene": (_set("model.room_lo", (0, 0), float("nan")), r"model\.room_lo holds NaN"),
    "model state of another shape": (_retype("model.box_lo", torch.float64), r"model\.box_lo must be float32"),
    "unknown tensor": (lambda meta, tensors: tensors.update(surprise=torch.zeros(1)), r"surprise is not a tensor"),
    "nan rig": (_set("extra.batch.rigs", (0, 0), float("nan")), r"extra\.batch\.rigs holds NaN"),
    "negative steps": (_set("extra.batch.steps", 0, -3), r"extra\.batch\.steps holds negative"),
    "missing frames": (_drop("extra.batch.last_frames"), r"extra\.batch\.last_frames is missing"),
    "frames of another size": (lambda meta, tensors: tensors.update({"extra.batch.last_frames": torch.zeros(
        1, 16, 16, 3, dtype=torch.uint8)}), r"extra\.batch\.last_frames must be uint8 of shape \(1, 32, 32, 3\)"),
    "nan task goal": (_set("extra.task.goals", (0, 0), float("nan")), r"extra\.task\.goals holds NaN"),
    "agent rng state": (_config("extra", "rngs", value=lambda rngs: [{**rngs[0], "uinteger": -1}]),
                        r"extra\.rngs\[0\]\.uinteger"),
    "missing agent rngs": (_config("extra", "rngs", delete=True), r"extra\.rngs must list"),
    "needs_reset not a bool": (_config("extra", "needs_reset", value="no"), r"extra\.needs_reset must be true or false"),
    "other task": (_config("extra", "task", value="explore"), r"extra\.task .* make a matching env first"),
    "other env": (_config("extra", "env", value="MirageVectorEnv"), r"extra\.env is 'MirageVectorEnv'"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_an_edited_world_file_with_a_recomputed_checksum_is_refused_naming_the_field_and_the_env_is_unchanged(
        saved, untouched, tmp_path, case):
    edit, message = TAMPERED[case]
    bad = rewrite(saved, tmp_path / "edited.safetensors", edit)
    env = played(seed=11, task="pointnav")
    with pytest.raises(MemoryFileError, match=message) as error:
        env.load_world(bad)
    assert str(bad) in str(error.value)
    assert same_steps(env, untouched)  # nothing of the file got in: it steps as its untouched twin


def test_the_untouched_file_loads_and_resumes_exactly(saved):
    expected = played(seed=3, task="pointnav")
    resumed = played(seed=11, task="pointnav", moves=[])
    resumed.load_world(saved)
    assert same_steps(resumed, expected)


def test_a_huge_capacity_is_refused_before_anything_is_allocated(saved, tmp_path):
    bad = rewrite(saved, tmp_path / "huge.safetensors", _set("memory.capacity", slice(None), 1 << 40))
    assert bad.stat().st_size < 1 << 20
    env = played(seed=1, task="pointnav", moves=[])
    started = time.perf_counter()
    with pytest.raises(MemoryFileError, match=r"memory\.capacity is \[1099511627776"):
        env.load_world(bad)
    assert time.perf_counter() - started < 5  # refused, not allocated (2**40 bricks would not fit anyway)


def test_metadata_edited_without_recomputing_the_checksum_fails_the_checksum(saved, untouched, tmp_path):
    meta, tensors = read_raw(saved)
    meta["config"]["memory"]["voxel_size"] *= 2  # the old sha256 stays
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={"mirage_env": json.dumps(meta)})
    env = played(seed=11, task="pointnav")
    with pytest.raises(MemoryFileError, match="failed its checksum: its tensors or metadata were changed"):
        env.load_world(edited)
    assert same_steps(env, untouched)


def test_a_model_that_refuses_the_saved_state_keeps_its_own_and_the_env_is_unchanged(saved, untouched):
    env = played(seed=11, task="pointnav")
    model, calls = env.world.model, []

    def picky(state):  # refuses the file's state, takes its own back
        calls.append(state)
        if len(calls) == 1:
            raise ValueError("this model only loads fresh worlds")
        type(model).load_state_dict(model, state)

    model.load_state_dict = picky
    with pytest.raises(MemoryFileError, match=r"model\.\* is refused by the world model .*only loads fresh worlds"):
        env.load_world(saved)
    del model.load_state_dict
    assert len(calls) == 2 and same_steps(env, untouched)


def test_a_version_4_world_file_still_loads(tmp_path, monkeypatch):
    env = played(seed=5)
    snapshot = env.snapshot()
    monkeypatch.setattr(fileformat, "FORMAT_VERSION", 4)  # as written before the metadata was checksummed
    extra = {k: v for k, v in snapshot.extra.items() if k != "env"}
    save_state(tmp_path / "v4.safetensors", kind="world", config=snapshot.config, tensors=snapshot.tensors,
               extra={"extra": extra})
    monkeypatch.undo()
    meta, _ = load_state(tmp_path / "v4.safetensors", kind="world")
    assert meta["version"] == 4
    resumed = played(seed=8, moves=[])
    resumed.load_world(tmp_path / "v4.safetensors")
    assert same_steps(resumed, env)


def test_memory_files_are_validated_too(tmp_path):
    memory = played(seed=2).world.memory
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    assert torch.equal(LatentSpatialMemory.load(path).stored_points(), memory.stored_points())
    bad = rewrite(path, tmp_path / "bad.safetensors", _config("config", "voxel_size", value=lambda v: v / 3))
    with pytest.raises(MemoryFileError, match=r"bad\.safetensors: memory\.points .* outside the voxel"):
        LatentSpatialMemory.load(bad)
    bad = rewrite(path, tmp_path / "bad.safetensors", _config("config", "chunk_size", value=10**6))
    with pytest.raises(MemoryFileError, match=r"config\.chunk_size must be an integer in \[1, 64\]"):
        LatentSpatialMemory.load(bad)


# ----------------------------------------------------------------------------- saves


def test_a_failed_save_leaves_the_old_file_whole_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "world.safetensors"
    env = played(seed=1)
    env.save_world(path)
    before = path.read_bytes()
    env.step(Move.FORWARD)

    def refuse(*args):
        raise OSError(28, "No space left on device")

    for broken in ("fsync", "replace"):
        with monkeypatch.context() as patch:
            patch.setattr(os, broken, refuse)
            with pytest.raises(OSError, match="No space left"):
                env.save_world(path)
        assert path.read_bytes() == before and temp_files(tmp_path) == [], broken
    env.save_world(path)
    assert path.read_bytes() != before and temp_files(tmp_path) == []


_KILLED_SAVE = """
import os, signal, sys, torch
from mirage_env.memory import save_state
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed once the new file is written, before the rename
save_state(sys.argv[1], kind="world", config={}, tensors={"x": torch.ones(1 << 16)})
"""


def test_a_save_killed_mid_way_leaves_the_old_file_whole_and_no_temporary_file(tmp_path):
    path = tmp_path / "world.safetensors"
    played(seed=1, moves=[]).save_world(path)
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []  # the new file was anonymous until complete


def test_the_next_save_removes_temporary_files_of_writers_that_died(tmp_path):
    path = tmp_path / "world.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".{path.name}.{socket.gethostname()}.{int(dead.stdout)}.abc.tmp"
    live = tmp_path / f"{fileformat._temp_prefix(path)}mine.tmp"  # this process's: perhaps another thread's save
    orphan.write_bytes(b"half a save")
    live.write_bytes(b"in progress")
    played(seed=1, moves=[]).save_world(path)
    assert not orphan.exists() and live.exists()


def test_threads_saving_to_one_path_leave_one_whole_save_and_readers_never_see_a_torn_file(tmp_path):
    path = tmp_path / "world.safetensors"
    envs = [played(seed=1), played(seed=2)]
    digests = set()
    for env in envs:
        env.save_world(path)
        digests.add(load_state(path, kind="world")[0]["sha256"])
    stop, failures = threading.Event(), []

    def save(env):
        for _ in range(15):
            env.save_world(path)

    def read():
        while not stop.is_set():
            try:
                assert load_state(path, kind="world")[0]["sha256"] in digests
            except Exception as error:  # noqa: BLE001 - reported below
                failures.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=save, args=(env,)) for env in envs]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert failures == []
    assert load_state(path, kind="world")[0]["sha256"] in digests
    assert temp_files(tmp_path) == []


_SAVER = """
import sys, torch
from mirage_env.memory import save_state
seed = int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[3])):
    save_state(sys.argv[1], kind="world", config={"writer": seed}, tensors={"x": torch.full((1 << 16,), seed)})
"""


def test_processes_saving_to_one_path_leave_one_whole_save_and_no_temporary_file(tmp_path):
    path = tmp_path / "world.safetensors"
    digests = set()
    for seed in (1, 2):  # what each writer writes, every time
        save_state(tmp_path / "expected", kind="world", config={"writer": seed},
                   tensors={"x": torch.full((1 << 16,), seed)})
        digests.add(load_state(tmp_path / "expected", kind="world")[0]["sha256"])
    os.unlink(tmp_path / "expected")
    savers = [subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(seed), "20"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for seed in (1, 2)]
    for saver in savers:
        assert saver.stdout.readline().strip() == "ready"
    for saver in savers:  # both start saving at once
        saver.stdin.write("go\n")
        saver.stdin.flush()
    while any(saver.poll() is None for saver in savers):
        if path.exists():  # never torn: always one whole save, whose checksum holds
            assert load_state(path, kind="world")[0]["sha256"] in digests
        time.sleep(0.002)  # leave the writers the CPU
    assert [saver.wait() for saver in savers] == [0, 0]
    assert load_state(path, kind="world")[0]["sha256"] in digests
    assert temp_files(tmp_path) == []


# ----------------------------------------------------------------------------- snapshots and forks


def test_a_snapshot_mid_episode_restored_replays_the_same_frames():
    env = played(seed=4, task="pointnav")
    snapshot = env.snapshot()
    first = [env.step(move) for move in LATER]
    for _ in range(2):  # a snapshot can be restored any number of times
        env.restore(snapshot)
        again = [env.step(move) for move in LATER]
        for (obs_a, *rest_a), (obs_b, *rest_b) in zip(first, again):
            assert all(np.array_equal(obs_a[k], obs_b[k]) for k in obs_a) and rest_a == rest_b
    assert snapshot.nbytes > 0


def test_a_snapshot_restores_into_another_env_made_alike():
    env = played(seed=4)
    other = played(seed=9, moves=[])
    other.restore(env.snapshot())
    assert same_steps(other, env)


def test_a_fork_diverges_without_touching_its_parent():
    parent = played(seed=6, task="pointnav")
    fork = parent.fork()
    twin = parent.fork()  # a second copy, to check the first against
    for move in [Move.TURN_LEFT, Move.TURN_LEFT, Move.FORWARD]:
        fork.step(move)
    assert fork.world.memory is not parent.world.memory and fork.world.model is not parent.world.model
    assert same_steps(parent, twin)  # the parent steps as an untouched copy does
    assert same_steps(played(seed=6, task="pointnav", moves=MOVES + LATER).fork(), parent)  # and copies are exact


def test_a_pickled_or_deep_copied_env_continues_as_the_original():
    # The compiled path keeps numpy views of the memory's and the model's tensors; a copy must
    # make its own, or it steps on views of memory it does not own.
    import copy
    import pickle

    env = played(seed=3)
    pickled, deep = pickle.loads(pickle.dumps(env)), copy.deepcopy(env)
    for move in [Move.FORWARD, Move.TURN_LEFT, Move.FORWARD, Move.STRAFE_RIGHT, Move.TURN_RIGHT, Move.FORWARD] * 3:
        expected = env.step(move)
        for copied in (pickled, deep):
            got = copied.step(move)
            assert all(np.array_equal(expected[0][k], got[0][k]) for k in expected[0]) and expected[1:] == got[1:]


def test_a_restored_snapshot_that_was_edited_is_refused_and_changes_nothing():
    env = played(seed=7)
    twin = env.fork()
    snapshot = env.snapshot()
    snapshot.tensors["memory.features"][0, 0] = float("nan")
    with pytest.raises(MemoryFileError, match=r"snapshot: memory\.features holds NaN"):
        env.restore(snapshot)
    assert same_steps(env, twin)


def test_vector_and_multi_agent_envs_snapshot_restore_save_and_load(tmp_path):
    vector = MirageVectorEnv(3, max_episode_steps=20, image_size=32)
    vector.reset(seed=0)
    actions = [np.array([1, 5, 1]), np.array([6, 1, 1]), np.array([1, 1, 7])]
    vector.step(actions[0])
    snapshot = vector.snapshot()
    first = [vector.step(a) for a in actions]
    vector.restore(snapshot)
    vector.save_world(tmp_path / "vector.safetensors")
    loaded = MirageVectorEnv(3, max_episode_steps=20, image_size=32)
    loaded.load_world(tmp_path / "vector.safetensors")
    for env in (vector.fork(), vector, loaded):
        for (obs_a, rew_a, *_), action in zip(first, actions):
            obs_b, rew_b, *_ = env.step(action)
            assert np.array_equal(obs_a["rgb"], obs_b["rgb"]) and np.array_equal(rew_a, rew_b)

    team = MirageParallelEnv(n_agents=2, max_episode_steps=20, image_size=32)
    team.reset(seed=0)
    moves = [{"camera_0": 1, "camera_1": 5}, {"camera_0": 6, "camera_1": 1}]
    snapshot = team.snapshot()
    first = [team.step(m) for m in moves]
    team.save_world(tmp_path / "team.safetensors")
    team.restore(snapshot)
    again = [team.step(m) for m in moves]
    assert all(np.array_equal(a[0]["camera_1"]["rgb"], b[0]["camera_1"]["rgb"]) and a[1] == b[1]
               for a, b in zip(first, again))
    apart = MirageParallelEnv(n_agents=2, max_episode_steps=20, shared_memory=False, image_size=32)
    with pytest.raises(MemoryFileError, match=r"config\.num_worlds is 1, this env has 2 world\(s\)"):
        apart.load_world(tmp_path / "team.safetensors")
    with pytest.raises(MemoryFileError, match=r"extra\.env is 'MirageParallelEnv'"):
        vector.load_world(tmp_path / "team.safetensors")


# ----------------------------------------------------------------------------- threads


def _hold_inside_step(env):
    """Make ``env``'s next World step wait (inside env.step) until released; returns (entered, release)."""
    entered, release = threading.Event(), threading.Event()
    world_step = env.world._advance  # what an env's step calls (World.step without the pose checks)

    def slow_step(*args, **kwargs):
        entered.set()
        release.wait(timeout=30)
        return world_step(*args, **kwargs)

    env.world._advance = slow_step
    return entered, release


@pytest.mark.parametrize("kind", ["single", "vector", "multi"])
def test_an_env_used_from_a_second_thread_while_one_is_inside_raises(kind):
    if kind == "single":
        env, action = played(seed=0), Move.FORWARD
    elif kind == "vector":
        env, action = MirageVectorEnv(2, image_size=32), np.array([1, 1])
        env.reset(seed=0)
    else:
        env, action = MirageParallelEnv(n_agents=2, image_size=32), {"camera_0": 1, "camera_1": 1}
        env.reset(seed=0)
    entered, release = _hold_inside_step(env)
    first = threading.Thread(target=env.step, args=(action,))
    first.start()
    assert entered.wait(timeout=30)
    try:
        for call in (lambda: env.step(action), lambda: env.reset(seed=1), env.snapshot, env.fork):
            with pytest.raises(RuntimeError, match="in use by another thread"):
                call()
    finally:
        release.set()
        first.join()
    env.step(action)  # free again once the first thread is out


def test_one_env_may_be_stepped_from_different_threads_in_turn():
    env = played(seed=0)
    twin = env.fork()
    for move in LATER:
        thread = threading.Thread(target=env.step, args=(move,))
        thread.start()
        thread.join()
        twin.step(move)
    assert same_steps(env, twin)
