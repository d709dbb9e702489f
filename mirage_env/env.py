"""The Gymnasium environment: camera motion in, generated frames out."""

from __future__ import annotations

import copy
import functools
import os
import threading
from typing import Any

import gymnasium as gym
import numpy as np

from .batch import AgentBatch, Snapshot, generator_from_state, validate_options
from .config import EnvConfig
from .memory import load_state, save_state
from .memory.fileformat import StateCheck
from .world import World

RESET_OPTIONS = ("image", "prompt", "depth")


# ---------------------------------------------------------------------- shared by the three envs
# (thread guard, world files, snapshots; MirageVectorEnv and MirageParallelEnv use them too)


class ExclusiveUse:
    """One thread at a time in an env's stateful calls (step, reset, save, load, snapshot, restore, fork).

    An env is not thread-safe: two threads stepping one env would interleave memory
    writes and counters silently. So a second thread entering while another is inside
    gets a RuntimeError at once (it never waits: waiting would hide the bug). The thread
    inside may re-enter (a call that makes another). Copies (``fork``) get a guard of their own.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._lock = threading.RLock()

    def __enter__(self) -> ExclusiveUse:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"this {self.owner} is in use by another thread: an env is stepped, reset, saved, loaded and "
                f"snapshotted by one thread at a time; give each thread its own env (env.fork()) or serialise the "
                f"calls with a lock of your own"
            )
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict) -> ExclusiveUse:
        return ExclusiveUse(self.owner)

    def __reduce__(self):
        return ExclusiveUse, (self.owner,)


def check_render_map(render_map, render_mode) -> bool:
    if not isinstance(render_map, bool):
        raise ValueError(f"render_map must be True or False, got {render_map!r}")
    if render_map and render_mode is None:
        raise ValueError('render_map=True draws the map in render(); it needs a render_mode ("rgb_array")')
    return render_map


def exclusive(method):
    """Run an env method under the env's :class:`ExclusiveUse` guard (``self._exclusive``)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._exclusive:
            return method(self, *args, **kwargs)

    return guarded


def snapshot_check() -> StateCheck:
    return StateCheck("snapshot", fix="restore a snapshot taken by snapshot() of an env made alike, unchanged")


def save_snapshot(path: str | os.PathLike, snapshot: Snapshot) -> None:
    """Write ``snapshot`` as a world file (atomically; see :func:`mirage_env.memory.save_state`)."""
    save_state(path, kind="world", config=snapshot.config, tensors=snapshot.tensors, extra={"extra": snapshot.extra})


def read_snapshot(path: str | os.PathLike) -> tuple[Snapshot, StateCheck]:
    """A world file as a Snapshot (its format, version and checksum verified) and the check that names it."""
    meta, tensors = load_state(path, kind="world")
    return Snapshot(config=meta.get("config"), extra=meta.get("extra", {}), tensors=tensors,
                    version=meta["version"]), StateCheck(path)


def checked_env_fields(snapshot: Snapshot, env_name: str, fields: tuple[str, ...], check: StateCheck) -> dict:
    """``snapshot.extra``, checked to be a ``env_name``'s: its own ``fields`` present, nothing unknown."""
    extra = check.mapping(snapshot.extra, "extra")
    saved_by = extra.get("env", env_name)  # files from before "env" was saved come from MirageEnv
    if saved_by != env_name:
        check.fail("extra.env", f"is {saved_by!r}: the state is a {saved_by}'s, not a {env_name}'s",
                   f"load it into a {saved_by} made alike")
    unknown = sorted(set(extra) - {"env", *fields, *AgentBatch.STATE_KEYS})
    if unknown:
        check.fail(f"extra.{unknown[0]}", f"is not state of a {env_name}")
    missing = sorted(set(fields) - set(extra))
    if missing:
        check.fail(f"extra.{missing[0]}", "is missing")
    return extra


def optional_generator(state, field: str, check: StateCheck) -> np.random.Generator | None:
    return None if state is None else generator_from_state(state, field, check)


def fork_env(env):
    """A deep copy of ``env`` that shares its world model's weights but holds its own per-world model state.

    The model is copied shallowly and given a copy of its ``state_dict()`` (what a world file
    holds of it), so the two envs step independently; everything else is deep-copied.
    """
    model = env.world.model
    twin = copy.copy(model)
    twin.load_state_dict({name: value.clone() for name, value in model.state_dict().items()})
    return copy.deepcopy(env, {id(model): twin})


# ---------------------------------------------------------------------- the env


class MirageEnv(gym.Env):
    """A camera in a world generated by a video world model with latent spatial memory.

    ## Description
    Each step moves the camera, then the world model generates the next segment of
    video along the motion, conditioned on its latent spatial memory projected onto
    the new cameras; what the segment shows (minus sky, far and moving content) is
    written back to memory. An agent that returns to a place finds it as it left it.
    The default world model is procedural (rooms with pillars, boxes and a moving
    object, or an outdoor scene with sky) and runs fast on any CPU; ``backend="wan"``
    uses Wan2.2 through diffusers from a local checkpoint.

    ## Action Space
    ``action_type="discrete"`` (default): ``Discrete(9)``

    | value | meaning |
    |---|---|
    | 0 | stay |
    | 1 | forward (``motion.step_metres``, on the ground plane) |
    | 2 | backward |
    | 3 | strafe left |
    | 4 | strafe right |
    | 5 | turn left (``motion.turn_degrees`` about world up) |
    | 6 | turn right |
    | 7 | look up (``motion.look_degrees``, pitch clamped) |
    | 8 | look down |

    ``action_type="continuous"``: ``Box(-1, 1, (6,), float32)`` velocity
    (forward, right, up, yaw rate, pitch rate, roll rate), scaled by ``motion``.

    A translation (discrete or continuous, any direction) whose path comes nearer than
    ``collision_distance`` to a wall or object is refused: the camera stays put, turns
    still apply, ``info["collided"]`` is True. A backend without geometry (Wan) can only
    check moves with a forward part, against the depth straight ahead.

    ## Observation Space
    ``Dict`` with the keys chosen by ``observations`` (plus task entries):

    | key | shape | dtype | range |
    |---|---|---|---|
    | rgb | (H, W, 3) | uint8 | [0, 255], the last generated frame |
    | pose | (6,) | float32 | x, y, z (metres, world = first camera, up = -y), yaw, pitch, roll (rad) |
    | depth | (h, w) | float32 | z-depth at latent resolution, inf = sky |
    | latent | (C, h, w) | float32 | the generator's latent of the last frame |

    ## Rewards
    From the task: ``explore`` rewards newly seen surface (memory growth, as a fraction
    of a frame); ``pointnav`` and ``returnhome`` are described in their modules.

    ## Starting State
    The camera starts at the world origin facing +z; the scene is drawn from the seed.

    ## Episode End
    - Termination: the task's terminal condition (e.g. reaching a PointNav goal).
    - Truncation: ``max_episode_steps`` steps.

    ## Arguments
    ``task`` (a name from ``mirage_env.tasks.TASKS`` or a Task instance; default
    "explore") and any option of :class:`mirage_env.config.EnvConfig` as a keyword:
    ``task_options``, ``render_mode`` ("rgb_array"); world: ``backend`` ("procedural" | "wan"), ``image_size`` (int or
    (height, width)), ``checkpoint`` (wan), ``backend_options``; memory: ``use_memory``
    (False: ablation, the generator ignores memory), ``memory_horizon`` (int K >= 1:
    ablation, short-term memory on the same model: only what the last K steps wrote to
    memory or were shown from it is read; None: full memory), ``voxel_size``,
    ``memory_options``; agent: ``action_type``, ``frames_per_step`` (latent frames per
    step; None: the world model's segment length if it has one, else 1),
    ``max_episode_steps``, ``observations``, ``motion`` (MotionConfig or dict),
    ``collision_distance``; ``render_map=True``: ``render()`` returns the frame with a top-down map of
    memory beside it (:mod:`mirage_env.topdown`). A misspelt option raises ``ValueError`` naming the closest
    valid one. ``config=EnvConfig(...)`` gives them all at once (keywords override it);
    ``world=`` a prebuilt ``World``.

    Reset options: ``image`` (HxWx3 uint8 array or path) and ``prompt`` (str) start a
    world from a picture, ``depth`` (HxW z-depth of that picture) gives it its scale
    (backends that support it: wan).

    ## Saving, snapshots and threads
    ``save_world(path)`` / ``load_world(path)``: the world and the episode in one
    safetensors file, written atomically; a load validates every field and either
    succeeds or leaves the env as it was (``MemoryFileError`` naming the field).
    ``snapshot()`` / ``restore(snapshot)``: the same state in memory, for planning (restore,
    replay the same actions: the same frames, bit for bit); ``fork()``: an independent copy
    that diverges without touching this env. The same holds for ``MirageVectorEnv`` and
    ``MirageParallelEnv``. One thread at a time: a second thread calling ``step``, ``reset``,
    ``save_world``, ``load_world``, ``snapshot``, ``restore`` or ``fork`` while another is
    inside gets a ``RuntimeError``; give each thread its own env (``fork()``).

    ## Example
    >>> import gymnasium as gym, mirage_env
    >>> env = gym.make("Mirage/Explore-v0")
    >>> observation, info = env.reset(seed=0)
    >>> observation["rgb"].shape
    (64, 64, 3)
    >>> envs = gym.make_vec("Mirage/Explore-v0", num_envs=8, vectorization_mode="vector_entry_point")
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, task=None, *, config: EnvConfig | None = None, world: World | None = None,
                 render_map: bool = False, **options):
        self.config = EnvConfig.from_options({"task": task, **options} if task is not None else options, base=config)
        self.render_mode = self.config.render_mode
        self.render_map = check_render_map(render_map, self.render_mode)
        self.world, self.task, self.batch = self.config.build(num_worlds=1, world=world)
        self.action_space = self.batch.action_space
        self.observation_space = self.batch.observation_space
        self.metadata = dict(self.metadata)
        self._needs_reset = True
        self._exclusive = ExclusiveUse(type(self).__name__)

    @exclusive
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = validate_options(options, RESET_OPTIONS)
        conditioning = [options] if options else None
        world_seed = int(self.np_random.integers(2**62))
        self.batch.reset_worlds([0], [world_seed], conditioning=conditioning)
        self._needs_reset = False
        observation = {k: v[0] for k, v in self.batch.observe(np.array([0])).items()}
        return observation, self.batch.reset_infos(np.array([0]))[0]

    @exclusive
    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (and again after an episode ends)")
        observations, reward, terminated, truncated, infos = self.batch.step([action], labels=["the action"])
        if terminated[0] or truncated[0]:
            self._needs_reset = True
        observation = {k: v[0] for k, v in observations.items()}
        return observation, float(reward[0]), bool(terminated[0]), bool(truncated[0]), infos[0]

    def render(self):
        """The last frame (H, W, 3) uint8; with ``render_map=True`` the frame and the top-down map
        of memory beside it, (H, 2 W, 3) (``render_mode="rgb_array"``)."""
        if self.render_mode != "rgb_array":
            return None
        frame = self.batch.last_frames[0].copy()
        if not self.render_map:
            return frame
        return np.concatenate([frame, self.top_down_map(frame.shape[:2])], axis=1)

    def top_down_map(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """A bird's-eye map of what the world remembers, the camera and the task's goal on it,
        (H, W, 3) uint8 (default: the frame's size); see :mod:`mirage_env.topdown`."""
        from .topdown import TopDownMap, batch_map

        return batch_map(self.batch, 0, TopDownMap(size=tuple(size or self.batch.last_frames[0].shape[:2])))

    def step_frames(self) -> np.ndarray:
        """Every frame the last step generated, (F, H, W, 3) uint8 (for videos); the last is ``rgb``."""
        return self.batch.crop(self.batch.last_step.frames[0].cpu().numpy())

    # ------------------------------------------------------------------ persistence and snapshots

    @exclusive
    def save_world(self, path: str | os.PathLike) -> None:
        """Save the world and the episode (memory, RNGs, camera, task) to one safetensors file.

        Atomic: a temporary file of this writer's own is fsynced and renamed over ``path``, so
        a reader sees the old file or the new one and concurrent savers leave one whole save.
        """
        save_snapshot(path, self.batch.snapshot(self._env_state(), copy=False))

    @exclusive
    def load_world(self, path: str | os.PathLike) -> None:
        """Resume a world saved by ``save_world``; the episode continues bit-for-bit.

        Every field of the file is validated before anything changes: a file that fails
        (a :class:`~mirage_env.memory.MemoryFileError` naming the field) leaves the env as it was.
        """
        self._restore(*read_snapshot(path))

    @exclusive
    def snapshot(self) -> Snapshot:
        """The env's whole state in memory, as ``save_world`` would write it: memory, RNGs, camera,
        task, the generator's tail and per-world state. For planning: snapshot, try actions, restore."""
        return self.batch.snapshot(self._env_state())

    @exclusive
    def restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot`` (of this env, or of one made alike): the same actions then give the
        same observations, bit for bit. Checked as a file is; a refused snapshot changes nothing."""
        self._restore(snapshot, snapshot_check())

    @exclusive
    def fork(self) -> MirageEnv:
        """An independent copy of this env mid-episode, that diverges without touching this one.

        It shares the world model's weights (read-only), not its per-world state.
        """
        return fork_env(self)

    def _env_state(self) -> dict:
        np_random = self._np_random.bit_generator.state if self._np_random is not None else None
        return {"env": "MirageEnv", "np_random": np_random, "needs_reset": self._needs_reset}

    def _restore(self, snapshot: Snapshot, check: StateCheck) -> None:
        extra = checked_env_fields(snapshot, "MirageEnv", ("np_random", "needs_reset"), check)
        np_random = optional_generator(extra["np_random"], "extra.np_random", check)
        needs_reset = check.boolean(extra["needs_reset"], "extra.needs_reset")
        self.world = self.batch.prepare_restore(snapshot, check).commit()
        self._np_random, self._np_random_seed = np_random, (None if np_random is None else -1)
        self._needs_reset = needs_reset


def registered_env(**options) -> MirageEnv:
    """The entry point of the registered ids (``gym.make("Mirage/...")``).

    ``gym.make(id, max_episode_steps=N)`` never passes N to the env: it wraps the env
    in a ``TimeLimit`` of N (500 by default, the registered value, which
    ``env.spec.max_episode_steps`` shows). So an env made this way has no limit of
    its own unless one is given as an option, and the wrapper's N is the one limit.
    """
    options.setdefault("max_episode_steps", None)
    return MirageEnv(**options)


registered_env.metadata = MirageEnv.metadata  # gym.make reads the entry point's render modes
