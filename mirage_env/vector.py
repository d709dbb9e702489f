"""A natively batched Gymnasium VectorEnv: N worlds, one generator call per step.

A world model is expensive per call and cheap per extra batch item, so the N
sub-environments are not N envs in a loop: they are N worlds of one ``World``
(one memory holding all of them), driven by one ``AgentBatch``. Every step is
one batched memory read, one batched generation and one batched memory write.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from .batch import Snapshot, validate_options
from .config import EnvConfig
from .env import RESET_OPTIONS
from .memory.fileformat import StateCheck
from .persistence import ExclusiveUse, Persistent, checked_env_fields, exclusive, optional_generator
from .world import World

__all__ = ["MirageVectorEnv"]


class MirageVectorEnv(Persistent, VectorEnv):
    """N independent Mirage worlds stepped together: the batched form of ``MirageEnv``.

    ## Description
    Sub-environment ``i`` is world ``i`` of one batched ``World``; one ``step``
    moves every camera, then reads memory, generates and writes memory for all N
    worlds in one call each. Sub-environment ``i`` behaves exactly as a
    ``MirageEnv`` with the same arguments and the same seed: same frames, rewards,
    terminations and truncations, episode after episode (bit for bit with the
    procedural model; with Wan up to the rounding of batched kernels, see
    ``mirage_env.backends.base``).

    ## Action Space
    ``single_action_space`` is ``MirageEnv``'s: ``Discrete(9)`` (see the move table
    in ``MirageEnv``; 0 stay, 1 forward, 2 backward, 3/4 strafe left/right, 5/6
    turn left/right, 7/8 look up/down) or ``Box(-1, 1, (6,), float32)``.
    ``action_space`` batches it: ``MultiDiscrete([9] * N)`` or ``Box(-1, 1, (N, 6))``.
    Actions of the wrong shape, outside the space, or NaN raise ``ValueError``.

    ## Observation Space
    ``single_observation_space`` is ``MirageEnv``'s ``Dict`` (``rgb`` (H, W, 3)
    uint8, ``pose`` (6,) float32, optionally ``depth`` and ``latent``, plus task
    entries); ``observation_space`` stacks every entry along a leading axis of N.

    ## Rewards
    From the task, per sub-environment, as in ``MirageEnv`` (float64 array (N,)).

    ## Starting State
    Each camera starts at its world's origin facing +z; each scene is drawn from
    that sub-environment's seed.

    ## Episode End and autoreset
    Termination (the task's terminal condition) and truncation
    (``max_episode_steps``) are per sub-environment. ``metadata["autoreset_mode"]``
    is ``AutoresetMode.SAME_STEP``: the step on which sub-environment ``i`` ends
    returns its reward, ``terminated`` / ``truncated`` flags and, in place of its
    last observation, the first observation of its next episode (already reset,
    with a new world drawn from its generator). The last observation and info
    of the ended episode are in ``infos["final_obs"][i]`` (an object array,
    ``None`` elsewhere) and ``infos["final_info"]`` (a dict of arrays), masked by
    ``infos["_final_obs"]`` / ``infos["_final_info"]``; the top-level info of
    ``i`` on that step is its reset info. SAME_STEP because every step then
    advances every world by one segment in one call; NEXT_STEP would spend a
    generator call on a world only to throw it away. It is also what
    Stable-Baselines3 expects (``mirage_env.agents.sb3.MirageSB3VecEnv``).

    ## Seeding
    ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i``; ``reset(seed=[s0,
    s1, ...])`` with ``s_i`` (as ``SyncVectorEnv``). Each sub-environment keeps its
    own generator and draws its world seeds from it the way ``MirageEnv`` does, so
    autoresets stay reproducible and match a single env reset again without a seed.

    ## Info
    A dict of arrays with a ``_key`` boolean mask per key (Gymnasium's vector
    convention): ``memory_entries`` (of the sub-environment's world),
    ``memory_bytes`` (the batched memory as a whole), ``memory_hit``,
    ``collided``, ``path_length`` and the task's measures.

    ## Arguments
    ``num_envs`` (N) and every ``MirageEnv`` argument (``task``, ``config``, any
    :class:`mirage_env.config.EnvConfig` option as a keyword, e.g. ``memory_horizon``
    K: every world reads only what its last K segments wrote or saw), and ``world``
    (a prebuilt ``World`` with ``num_worlds == num_envs``). One task instance
    serves all N worlds (tasks are batched).

    Reset options: ``image`` / ``prompt`` (as ``MirageEnv``, for every world being
    reset) and ``reset_mask`` (bool array (N,)): reset only those sub-environments.

    ## Example
    >>> import gymnasium as gym, mirage_env
    >>> envs = gym.make_vec("Mirage/Explore-v0", num_envs=4, vectorization_mode="vector_entry_point")
    >>> observations, infos = envs.reset(seed=0)
    >>> observations["rgb"].shape
    (4, 64, 64, 3)
    >>> observations, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
    >>> rewards.shape
    (4,)
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15, "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, task=None, *, config: EnvConfig | None = None,
                 world: World | None = None, **options):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.num_envs = int(num_envs)
        self.config = EnvConfig.from_options({"task": task, **options} if task is not None else options, base=config)
        self.render_mode = self.config.render_mode
        # One task instance serves all N worlds: tasks are batched over agents.
        self.world, self.task, self.batch = self.config.build(num_worlds=self.num_envs, world=world)
        self.single_action_space = self.batch.action_space
        self.single_observation_space = self.batch.observation_space
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.metadata = dict(self.metadata)
        # One generator per sub-environment, drawn from exactly as MirageEnv draws from its np_random.
        self._env_rngs: list[np.random.Generator | None] = [None] * self.num_envs
        self._needs_reset = True
        self._exclusive = ExclusiveUse("MirageVectorEnv")

    # ------------------------------------------------------------------ reset / step

    @exclusive
    def reset(self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None):
        seeds = self._seeds_for(seed)
        options = validate_options(options, (*RESET_OPTIONS, "reset_mask"))
        mask = self._reset_mask(options.pop("reset_mask", None))
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            super().reset(seed=int(seed))  # the vector-level np_random, for wrappers that use it
        envs = np.flatnonzero(mask)
        for i in envs:
            if seeds[i] is not None or self._env_rngs[i] is None:
                self._env_rngs[i], _ = seeding.np_random(seeds[i])
        self._reset_envs(envs, conditioning=[options] * len(envs) if options else None)
        self._needs_reset = False
        infos: dict[str, Any] = {}
        for i, info in zip(envs, self.batch.reset_infos(envs)):
            infos = self._add_info(infos, info, int(i))
        return self.batch.observe(np.arange(self.num_envs)), infos

    @exclusive
    def step(self, actions):
        if self._needs_reset:
            raise RuntimeError("call reset() before step()")
        observations, rewards, terminated, truncated, step_infos = self.batch.step(actions, "sub-environment")
        ended = np.flatnonzero(terminated | truncated)
        infos: dict[str, Any] = {}
        if ended.size:
            final = {key: value[ended] for key, value in observations.items()}
            for j, i in enumerate(ended):
                final_obs = {key: value[j] for key, value in final.items()}
                infos = self._add_info(infos, {"final_obs": final_obs, "final_info": step_infos[i]}, int(i))
            self._reset_envs(ended)
            for key, value in self.batch.observe(ended).items():
                observations[key][ended] = value
            for i, info in zip(ended, self.batch.reset_infos(ended)):
                step_infos[i] = info
        batched = None if ended.size else _batched_infos(step_infos)
        if batched is not None:
            return observations, rewards, terminated, truncated, batched
        for i, info in enumerate(step_infos):
            infos = self._add_info(infos, info, i)
        return observations, rewards, terminated, truncated, infos

    def render(self) -> tuple[np.ndarray, ...] | None:
        """The last frame of every sub-environment (``render_mode="rgb_array"``), as SyncVectorEnv returns them."""
        if self.render_mode == "rgb_array":
            return tuple(self.batch.last_frames.copy())
        return None

    # ------------------------------------------------------------------ persistence (Persistent)

    def _env_state(self) -> dict:
        return {
            "env": "MirageVectorEnv",
            "env_rngs": [None if rng is None else rng.bit_generator.state for rng in self._env_rngs],
            "np_random": None if self._np_random is None else self._np_random.bit_generator.state,
            "needs_reset": self._needs_reset,
        }

    def _restore(self, snapshot: Snapshot, check: StateCheck) -> None:
        extra = checked_env_fields(snapshot, "MirageVectorEnv", ("env_rngs", "np_random", "needs_reset"), check)
        env_rngs = extra["env_rngs"]
        if not isinstance(env_rngs, list) or len(env_rngs) != self.num_envs:
            check.fail("extra.env_rngs", f"must list one generator state (or null) per sub-environment ({self.num_envs})")
        env_rngs = [optional_generator(state, f"extra.env_rngs[{i}]", check) for i, state in enumerate(env_rngs)]
        np_random = optional_generator(extra["np_random"], "extra.np_random", check)
        needs_reset = check.boolean(extra["needs_reset"], "extra.needs_reset")
        self.world = self.batch.prepare_restore(snapshot, check).commit()
        self._env_rngs = env_rngs
        self._np_random, self._np_random_seed = np_random, (None if np_random is None else -1)
        self._needs_reset = needs_reset

    # ------------------------------------------------------------------ helpers

    def _reset_envs(self, envs: np.ndarray, conditioning: list[dict] | None = None) -> None:
        world_seeds = [int(self._env_rngs[i].integers(2**62)) for i in envs]
        self.batch.reset_worlds(envs, world_seeds, conditioning=conditioning)

    def _seeds_for(self, seed) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + i for i in range(self.num_envs)]
        seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"seed as a list needs one entry per sub-environment ({self.num_envs}), got {len(seeds)}")
        for s in seeds:
            if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0):
                raise ValueError(f"seeds must be non-negative integers or None, got {seeds}")
        return [None if s is None else int(s) for s in seeds]

    def _reset_mask(self, mask) -> np.ndarray:
        if mask is None:
            return np.ones(self.num_envs, dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != (self.num_envs,) or mask.dtype != np.bool_ or not mask.any():
            raise ValueError(f"options['reset_mask'] must be a bool array of shape ({self.num_envs},) with at least "
                             f"one True, got {mask!r}")
        if self._needs_reset and not mask.all():
            raise RuntimeError("the first reset() must reset every sub-environment; drop reset_mask")
        return mask


_SCALARS = (int, float, bool)


def _batched_infos(infos: list[dict]) -> dict[str, np.ndarray] | None:
    """What ``VectorEnv._add_info`` makes of ``infos`` (one per sub-environment, in order), built a key at a
    time rather than an entry at a time; None unless every info has the same keys with scalar values (then
    call ``_add_info``): an entry at a time is (sub-environments x keys) small numpy writes per step."""
    first = infos[0]
    keys = list(first)
    types = [type(first[key]) for key in keys]
    if not all(kind in _SCALARS or issubclass(kind, np.number) for kind in types):
        return None
    if any(list(info) != keys for info in infos):
        return None
    out: dict[str, np.ndarray] = {}
    for key, kind in zip(keys, types):
        out[key] = np.array([info[key] for info in infos], dtype=kind)
        out["_" + key] = np.ones(len(infos), dtype=np.bool_)
    return out
